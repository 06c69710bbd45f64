"""DVC stage scripts: read params.yaml, call minigpt, write outputs, log to MLflow."""

#!/usr/bin/env bash
# Idempotent developer/CI setup for minigpt.
#
#   bash scripts/setup.sh          # create .venv, install, prefetch the tokenizer
#
# Order matters: torch is installed first with an exact pin, because an unpinned
# `torch` (which is what `pip install -e .` would ask for) resolves to a
# multi-GB CUDA build; with 2.13.0 (CPU) already present, `torch>=2.4` in
# pyproject.toml is satisfied and pip downloads nothing more for it.
#
# A second run is cheap: the stamp file .venv/.minigpt-setup holds a sha256 of
# pyproject.toml + this script; when it matches (and torch is still installed)
# the installs are skipped. Set MINIGPT_FORCE_SETUP=1 to reinstall anyway.
#
# Environment: PYTHON (interpreter used to create the venv, default python3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Nothing we run should phone home.
export DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true
export PIP_DISABLE_PIP_VERSION_CHECK=1

TORCH_PIN="torch==2.13.0"
VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.minigpt-setup"

log() { printf 'setup: %s\n' "$*" >&2; }

want_hash() {
    # Hash of the inputs that decide what gets installed (content, not mtime,
    # so a fresh clone or a `git checkout` does not trigger reinstalls).
    cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1
}

installed_ok() {
    # Cheap check (~0.1 s) instead of `import torch` (~1.5 s on 2 cores); the full
    # import is done once, before the stamp is written.
    "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as md
import importlib.util as u
assert u.find_spec("torch") and u.find_spec("tiktoken")
md.version("minigpt")
EOF
}

if [[ ! -x "$PY" ]]; then
    PYTHON="${PYTHON:-python3}"
    log "creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

want="$(want_hash)"
if [[ "${MINIGPT_FORCE_SETUP:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && installed_ok; then
    # Refresh the stamp's mtime so Makefile rules that depend on it stay satisfied.
    touch "$STAMP"
else
    rm -f "$STAMP"
    log "installing $TORCH_PIN (CPU build)"
    "$PY" -m pip install "$TORCH_PIN"
    log "installing minigpt (editable) with the pipeline, team and dev extras"
    "$PY" -m pip install -e '.[pipeline,team,interop,dev]'
    "$PY" -c 'import torch, tiktoken, minigpt; print("setup: torch", torch.__version__)' >&2
    printf '%s\n' "$want" > "$STAMP.tmp"
    mv -f "$STAMP.tmp" "$STAMP"
fi

# Always make sure the verified tokenizer file is cached (instant when it is).
tok_path="$("$PY" -m minigpt.tokenizer --prefetch)"
log "tokenizer ranks file: $tok_path"
log "ready ($VENV)"

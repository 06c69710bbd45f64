"""minigpt: a GPT-2-style language model trained from scratch."""

__version__ = "0.1.0"

from __future__ import annotations

from pathlib import Path

# The embedded demo checkpoint, shipped inside the package: a tiny random K2-architecture model in
# K2's on-disk format (INT4 routed experts, tiktoken tokenizer, chat_template.jinja).
DEFAULT_CHECKPOINT_NAME = "k2-tiny"


def default_checkpoint_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / DEFAULT_CHECKPOINT_NAME

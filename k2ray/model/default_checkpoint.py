from __future__ import annotations

from pathlib import Path

# The checkpoints shipped inside the package, in K2's on-disk format (INT4 routed experts, tiktoken
# tokenizer, chat_template.jinja). k2-demo, the default, is a tiny K2-architecture model trained to think,
# answer, call tools and search (k2ray/demo); k2-tiny is random (k2ray.model.tiny_checkpoint), for tests.
DEMO_CHECKPOINT_NAME = "k2-demo"
TINY_CHECKPOINT_NAME = "k2-tiny"
DEFAULT_CHECKPOINT_NAME = DEMO_CHECKPOINT_NAME


def embedded_checkpoint_dir(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / name


def default_checkpoint_dir() -> Path:
    """What `make serve`, `k2ray serve` and `LLM()` load when no model is named."""
    return embedded_checkpoint_dir(DEFAULT_CHECKPOINT_NAME)


def tiny_checkpoint_dir() -> Path:
    """The random k2-tiny checkpoint the tests and benchmarks run on."""
    return embedded_checkpoint_dir(TINY_CHECKPOINT_NAME)

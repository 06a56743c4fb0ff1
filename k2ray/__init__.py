"""k2ray: serve Kimi K2 Thinking on Ray Serve.

Public names are imported lazily so `import k2ray` stays cheap for the CLI and the router.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from k2ray.sampling_params import SamplingParams

if TYPE_CHECKING:
    from k2ray.engine.llm import LLM

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from k2ray.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'k2ray' has no attribute {name!r}")

"""streampage: a paged-KV-cache LLM serving engine that streams tokens over WebSockets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streampage.outputs import CompletionOutput, RequestOutput
from streampage.sampling_params import SamplingParams

if TYPE_CHECKING:
    from streampage.engine.async_engine import AsyncEngine
    from streampage.llm import LLM

__all__ = ["LLM", "AsyncEngine", "CompletionOutput", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    # The engines pull in torch and transformers; import them only when asked for.
    if name == "LLM":
        from streampage.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from streampage.engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(name)

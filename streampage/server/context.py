"""What every connection of one server shares: the engine, the options, metrics, admission, the phase."""

from __future__ import annotations

import enum
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from streampage.outputs import EngineStats, RequestOutput
from streampage.sampling_params import SamplingParams
from streampage.server.admission import Admission
from streampage.server.config import ServerConfig
from streampage.server.metrics import ServerMetrics


class EngineClient(Protocol):
    """The part of `streampage.engine.async_engine.AsyncEngine` the server uses (tests pass a fake)."""

    max_model_len: int
    model_name: str

    def encode_prompt(self, *, prompt: str | None = None, messages: list[dict] | None = None,
                      prompt_token_ids: list[int] | None = None) -> list[int]: ...

    def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    @property
    def stats(self) -> EngineStats: ...

    @property
    def errored(self) -> bool: ...

    async def wait_until_dead(self) -> BaseException: ...

    async def shutdown(self) -> None: ...


class Phase(enum.Enum):
    LOADING = "loading"  # listening, the model is not loaded yet: only plain HTTP answers
    SERVING = "serving"
    DRAINING = "draining"  # SIGTERM: in-flight requests finish, new ones are refused
    FAILED = "failed"  # the engine died; the process is about to exit non-zero


@dataclass
class ServingContext:
    config: ServerConfig
    metrics: ServerMetrics
    admission: Admission
    engine: EngineClient | None = None  # set once the model is loaded
    phase: Phase = Phase.LOADING
    loading_status: str = "starting"
    connections: int = 0  # open sockets
    live_requests: int = 0  # between response.create and its response.done or error, all sockets
    _connection_ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def next_connection_id(self) -> str:
        """A server-unique prefix for the engine request ids of one connection."""
        return f"c{next(self._connection_ids)}"

    def server_gauges(self) -> dict[str, float]:
        return {"connections": self.connections, "server_live_requests": self.live_requests,
                "server_queued_requests": self.admission.queued_requests,
                "server_queued_prompt_tokens": self.admission.queued_prompt_tokens}

    def engine_stats(self) -> EngineStats | None:
        return self.engine.stats if self.engine is not None else None

    @property
    def max_prompt_tokens(self) -> int:
        assert self.engine is not None
        limit = self.config.max_prompt_tokens
        return self.engine.max_model_len if limit is None else min(limit, self.engine.max_model_len)

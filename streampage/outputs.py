"""What the engine hands back to users: completions, per-request outputs, and refusals."""

from __future__ import annotations

from dataclasses import dataclass, field

# One generated position's log-probabilities: {token_id: logprob}, holding the chosen token and the
# top-N alternatives (the chosen token may or may not be among the top N).
TokenLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    """One choice of a request. In streamed outputs `text`, `token_ids` and `logprobs` hold only what is
    new since the previous output of the same request (deltas); `LLM.generate` returns whole texts."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "timeout" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.monotonic) of one request's milestones; None until reached."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt: str | None = None
    metrics: RequestMetrics | None = None


class RequestRejected(ValueError):
    """A request refused before it was accepted. `code` is a wire-protocol error code
    (`prompt_too_long`, `invalid_param`, ...) and `param` the offending field, when there is one."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class EngineDeadError(RuntimeError):
    """The engine core failed; every live request fails with it and the server must restart."""


@dataclass
class EngineStats:
    """A snapshot of the engine core, published after every step (metrics, readiness, the pool picture).

    Block states partition the GPU pool: every block is exactly one of used (held by live sequences;
    `shared` of them by more than one), cached (free, but still holding a prefix the cache can serve),
    or empty (free, no prefix). So `used + cached + empty == total` and `free == cached + empty`.
    """

    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_shared: int = 0
    kv_blocks_cached: int = 0
    kv_blocks_empty: int = 0
    cpu_blocks_total: int = 0
    cpu_blocks_used: int = 0
    block_size: int = 16
    num_preemptions_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    cached_prompt_tokens_total: int = 0
    steps_total: int = 0

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_cached + self.kv_blocks_empty

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

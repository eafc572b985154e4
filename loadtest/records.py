"""One request as the client saw it: when it was due, when it left, and every chunk that came back.

Times are `time.perf_counter()` seconds. Latencies are measured from `scheduled_at`, the moment the
request was due to be sent, so time spent waiting in the client (a concurrency cap, a late event loop,
a WebSocket handshake) counts against the server's latency as a user would feel it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

CLIENT = "client"          # measured traffic: the summary is computed over these
DISTURBER = "disturber"    # scenario traffic that misbehaves on purpose: reported apart


@dataclass
class RequestRecord:
    request_id: str
    prompt_len: int
    max_tokens: int
    scheduled_at: float
    role: str = CLIENT
    sent_at: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    done_at: float | None = None
    error: str | None = None            # why it failed; None once done means success
    usage_output_tokens: int | None = None
    server_prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    seq_gaps: int = 0                   # deltas whose `seq` skipped ahead (lost frames)

    def add_chunk(self, at: float, tokens: int) -> None:
        self.chunk_times.append(at)
        self.chunk_tokens.append(tokens)

    def finish(self, at: float, error: str | None = None) -> None:
        """Close the record once; the first error wins (a timeout is not overwritten by the close)."""
        if self.done_at is not None:
            return
        self.done_at = at
        self.error = error or (None if self.chunk_times else "no_tokens")

    @property
    def succeeded(self) -> bool:
        return self.done_at is not None and self.error is None

    @property
    def output_tokens(self) -> int:
        """The server's own count when it gave one, else the tokens counted on the stream."""
        if self.usage_output_tokens is not None:
            return self.usage_output_tokens
        return sum(self.chunk_tokens)

    @property
    def input_tokens(self) -> int:
        return self.server_prompt_tokens if self.server_prompt_tokens is not None else self.prompt_len

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.scheduled_at

    @property
    def e2el(self) -> float:
        """Until the last token chunk (as vLLM measures it), not the closing frame."""
        return self.chunk_times[-1] - self.scheduled_at

    @property
    def tpot(self) -> float | None:
        if self.output_tokens <= 1:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [later - earlier for earlier, later in pairwise(self.chunk_times)]

    def to_json(self, origin: float) -> dict[str, Any]:
        """Plain data with times in seconds after `origin` (the start of the run)."""
        def rel(t: float | None) -> float | None:
            return None if t is None else t - origin
        return {
            "request_id": self.request_id, "role": self.role,
            "prompt_len": self.prompt_len, "max_tokens": self.max_tokens,
            "scheduled_at": rel(self.scheduled_at), "sent_at": rel(self.sent_at), "done_at": rel(self.done_at),
            "chunk_times": [t - origin for t in self.chunk_times], "chunk_tokens": self.chunk_tokens,
            "success": self.succeeded, "error": self.error, "output_tokens": self.output_tokens,
            "server_prompt_tokens": self.server_prompt_tokens, "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason, "seq_gaps": self.seq_gaps,
        }

"""The global queue: how many accepted requests (and prompt tokens) may wait for their first token.

A request enters the queue when the server hands it to the engine and leaves it at its first token
(or when it ends without one). Past either limit a new request is refused with `server_overloaded`
and a `retry_after_ms` hint: the recent average time a request spent queued.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# Weight of the newest observation in the moving average of queue waits.
_EWMA_WEIGHT = 0.2
_RETRY_AFTER_MS_BOUNDS = (100, 30_000)
_RETRY_AFTER_MS_UNKNOWN = 1000


class QueueFull(Exception):
    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


@dataclass
class QueueTicket:
    """One request's place in the queue; `leave()` is idempotent."""

    admission: Admission
    prompt_tokens: int
    entered: float
    left: bool = False

    def leave(self) -> None:
        if not self.left:
            self.left = True
            self.admission.release(self)


class Admission:
    def __init__(self, max_requests: int, max_prompt_tokens: int) -> None:
        self.max_requests = max_requests
        self.max_prompt_tokens = max_prompt_tokens
        self.queued_requests = 0
        self.queued_prompt_tokens = 0
        self._average_wait_ms: float | None = None

    def enter(self, prompt_tokens: int) -> QueueTicket:
        """Take a place in the queue or raise QueueFull naming the limit that is reached."""
        if self.queued_requests + 1 > self.max_requests:
            raise QueueFull(f"the server queue holds {self.queued_requests} requests; at most "
                            f"{self.max_requests}", self.retry_after_ms())
        if self.queued_prompt_tokens + prompt_tokens > self.max_prompt_tokens and self.queued_requests:
            # An empty queue admits any prompt the other limits allow, so a large prompt cannot
            # be refused forever.
            raise QueueFull(f"the server queue holds {self.queued_prompt_tokens} prompt tokens; with "
                            f"{prompt_tokens} more it would pass {self.max_prompt_tokens}",
                            self.retry_after_ms())
        self.queued_requests += 1
        self.queued_prompt_tokens += prompt_tokens
        return QueueTicket(self, prompt_tokens, time.monotonic())

    def release(self, ticket: QueueTicket) -> None:
        self.queued_requests -= 1
        self.queued_prompt_tokens -= ticket.prompt_tokens
        waited_ms = (time.monotonic() - ticket.entered) * 1000
        previous = self._average_wait_ms
        self._average_wait_ms = waited_ms if previous is None else (
            _EWMA_WEIGHT * waited_ms + (1 - _EWMA_WEIGHT) * previous)

    def retry_after_ms(self) -> int:
        if self._average_wait_ms is None:
            return _RETRY_AFTER_MS_UNKNOWN
        low, high = _RETRY_AFTER_MS_BOUNDS
        return int(min(max(self._average_wait_ms, low), high))

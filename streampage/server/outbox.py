"""One connection's outgoing frames, waiting for its writer.

Producers (the reader, the per-request tasks) never wait: they append and go on. The outbox is
bounded in bytes. While the client lags, a new delta joins its choice's previous delta if that one is
still waiting (up to MERGE_LIMIT_BYTES), so a slow client gets fewer, larger frames. Each sent frame
takes one `seq`, assigned when the writer takes it, so seqs stay gapless per choice. Past the byte
limit the outbox gives up: it drops everything and calls `on_overflow` (the session then cancels the
client's requests and closes the socket with 1008).

Ordering invariant: a request queues only deltas between its `response.created` and its
`response.done`, so moving a delta's text into an earlier waiting delta of the same choice never
reorders it against the request's other frames.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from streampage.server.protocol import delta_frame

# Rough byte costs of a delta frame's parts, for the buffer bound (exactness does not matter).
_DELTA_OVERHEAD = 96
_TOKEN_ID_BYTES = 8
_LOGPROB_ENTRY_BYTES = 48
# A waiting delta takes no more merges past this size, so merged frames stay far below the message
# size limits of clients (websockets' default is 1 MiB); the next delta starts a new frame.
MERGE_LIMIT_BYTES = 1 << 16


class DeltaOwner(Protocol):
    """A request whose deltas go through the outbox; `next_seq[i]` is choice i's next seq."""

    request_id: str
    next_seq: list[int]


@dataclass(eq=False)
class _PendingDelta:
    owner: DeltaOwner
    index: int
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] | None = None
    logprobs: list[dict[str, Any]] | None = None
    size: int = _DELTA_OVERHEAD

    def add(self, text: str, token_ids: list[int] | None, logprobs: list[dict[str, Any]] | None) -> int:
        """Append one delta; return the bytes it adds."""
        self.texts.append(text)
        added = len(text)
        if token_ids is not None:
            self.token_ids = (self.token_ids or []) + token_ids
            added += _TOKEN_ID_BYTES * len(token_ids)
        if logprobs is not None:
            self.logprobs = (self.logprobs or []) + logprobs
            added += sum(_LOGPROB_ENTRY_BYTES * (1 + len(e["top_logprobs"])) for e in logprobs)
        self.size += added
        return added

    def render(self) -> bytes:
        seq = self.owner.next_seq[self.index]
        self.owner.next_seq[self.index] = seq + 1
        return delta_frame(self.owner.request_id, self.index, seq, "".join(self.texts), self.token_ids,
                           self.logprobs)


class Outbox:
    def __init__(self, limit_bytes: int, on_overflow: Callable[[], None]) -> None:
        self.limit_bytes = limit_bytes
        self.on_overflow = on_overflow
        self.merged_deltas = 0  # deltas that joined a waiting one (observability, tests)
        self._queue: deque[bytes | _PendingDelta] = deque()
        self._waiting: dict[tuple[DeltaOwner, int], _PendingDelta] = {}
        self._bytes = 0
        self._ready = asyncio.Event()
        self._accepting = True
        self._finishing = False

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def put(self, frame: bytes) -> None:
        if self._accepting:
            self._queue.append(frame)
            self._grew(len(frame))

    def put_delta(self, owner: DeltaOwner, index: int, text: str, token_ids: list[int] | None,
                  logprobs: list[dict[str, Any]] | None) -> None:
        if not self._accepting:
            return
        key = (owner, index)
        pending = self._waiting.get(key)
        if pending is None or pending.size >= MERGE_LIMIT_BYTES:
            pending = self._waiting[key] = _PendingDelta(owner, index)
            self._queue.append(pending)
            self._bytes += _DELTA_OVERHEAD
        else:
            self.merged_deltas += 1
        self._grew(pending.add(text, token_ids, logprobs))

    async def get(self) -> bytes | None:
        """The next frame to send; None once the outbox is finished and empty, or discarded."""
        while not self._queue:
            if self._finishing or not self._accepting:
                return None
            self._ready.clear()
            await self._ready.wait()
        item = self._queue.popleft()
        if isinstance(item, bytes):
            self._bytes -= len(item)
            return item
        key = (item.owner, item.index)
        if self._waiting.get(key) is item:
            del self._waiting[key]
        self._bytes -= item.size
        return item.render()

    def finish(self) -> None:
        """Take no more frames; `get` hands out what is queued, then None."""
        self._accepting = False
        self._finishing = True
        self._ready.set()

    def discard(self) -> None:
        """Drop everything queued and take no more frames."""
        self._accepting = False
        self._queue.clear()
        self._waiting.clear()
        self._bytes = 0
        self._ready.set()

    def _grew(self, added: int) -> None:
        self._bytes += added
        if self._bytes > self.limit_bytes:
            self.discard()
            self.on_overflow()
        else:
            self._ready.set()

"""`AsyncEngine`: the asyncio face of the engine core, which runs in its own process.

The event loop never blocks on the core: a sender thread writes requests to the pipe, a receiver
thread reads the core's per-step batches and hands each to the loop in one callback, where the
output processor detokenizes every request's news and feeds its stream. Streams are unbounded
queues, so the core never waits for a slow consumer (the server applies back-pressure per socket).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import subprocess
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from streampage.config import EngineConfig
from streampage.engine.core_process import CoreInfo, decode_deltas, start_core
from streampage.engine.llm_engine import freeze_long_lived_objects
from streampage.engine.output_processor import OutputProcessor
from streampage.model.loader import load_tokenizer
from streampage.outputs import EngineDeadError, EngineStats, RequestOutput, RequestRejected
from streampage.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class _Stream:
    """One request's outputs on their way to its consumer: a deque, and the consumer's future while it
    waits. Every request gets an item per step, and asyncio.Queue's bookkeeping per put and get cost
    more than the rest of the hand-over."""

    __slots__ = ("_loop", "_waiter", "items")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.items: deque[RequestOutput | BaseException] = deque()
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        self.items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # cancelled with its consumer
                waiter.set_result(None)

    async def wait(self) -> None:
        """Until an item is there."""
        while not self.items:
            self._waiter = self._loop.create_future()
            await self._waiter


class AsyncEngine:
    def __init__(self) -> None:
        raise TypeError("use `await AsyncEngine.start(config)`")

    @classmethod
    async def start(cls, config: EngineConfig, *, on_status: Callable[[str], None] | None = None,
                    core_main: tuple[str, Sequence[str]] | None = None) -> AsyncEngine:
        """Spawn the core, load the model there, and return once it serves. `core_main`: the module
        whose main() runs the core and its arguments (`start_core`), for benchmarks."""
        self = cls.__new__(cls)
        self._loop = asyncio.get_running_loop()
        self._streams: dict[str, _Stream] = {}
        self._stats = EngineStats()
        self._closing = False
        self._dead: asyncio.Future[BaseException] = self._loop.create_future()
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._process, self._conn = start_core(config) if core_main is None else start_core(config, *core_main)
        ready: asyncio.Future[CoreInfo] = self._loop.create_future()
        self._on_status = on_status
        self._ready = ready
        threading.Thread(target=self._receive, name="streampage-core-rx", daemon=True).start()
        threading.Thread(target=self._send, name="streampage-core-tx", daemon=True).start()
        info = await ready
        self.info = info
        self.limits = info.limits
        self.max_model_len = info.limits.max_model_len
        self.model_name = info.model_dir
        self.tokenizer = load_tokenizer(info.model_dir)
        self._processor = OutputProcessor(self.tokenizer)
        # A stalled event loop also stalls the core, through the pipe.
        freeze_long_lived_objects()
        return self

    # ---- requests ----------------------------------------------------------------------------

    def encode_prompt(self, *, prompt: str | None = None, messages: list[dict] | None = None,
                      prompt_token_ids: list[int] | None = None) -> list[int]:
        """Token ids of exactly one prompt form (text, chat messages through the template, or ids)."""
        given = [name for name, value in (("prompt", prompt), ("messages", messages),
                                          ("prompt_token_ids", prompt_token_ids)) if value is not None]
        if len(given) != 1:
            raise RequestRejected("invalid_param", "give exactly one of prompt, messages, prompt_token_ids "
                                  f"(got {', '.join(given) or 'none'})", "prompt")
        if prompt_token_ids is not None:
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_token_ids):
                raise RequestRejected("invalid_param", "prompt_token_ids must be a list of integers",
                                      "prompt_token_ids")
            return list(prompt_token_ids)
        if messages is not None:
            return self._encode_chat(messages)
        if not isinstance(prompt, str):
            raise RequestRejected("invalid_param", "prompt must be a string", "prompt")
        return self.tokenizer.encode(prompt)

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise RequestRejected("invalid_param", "messages must be a non-empty list", "messages")
        for message in messages:
            if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                    or not isinstance(message.get("content"), str)):
                raise RequestRejected("invalid_param", "each message needs a string role and content", "messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template rejects the conversation (e.g. roles out of order)
            raise RequestRejected("invalid_param", f"the chat template refused the messages: {exc}",
                                  "messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream a request: first an output with no tokens (accepted), then deltas, the last finished."""
        if self._dead.done():
            raise EngineDeadError("the engine core has failed")
        if request_id in self._streams:
            raise RequestRejected("duplicate_request_id", f"request_id {request_id!r} is already live", "request_id")
        self.limits.check(prompt_token_ids, params)
        stream = self._streams[request_id] = _Stream(self._loop)
        arrival = time.monotonic()
        self._processor.add(request_id, None, prompt_token_ids, params, arrival)
        self._outbox.put(("add", request_id, prompt_token_ids, params, arrival))
        try:
            while True:
                if not stream.items:
                    await stream.wait()
                item = stream.items.popleft()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if self._streams.pop(request_id, None) is not None and self._processor.drop(request_id):
                self._outbox.put(("abort", [request_id]))  # the consumer walked away mid-stream

    async def abort(self, request_id: str) -> None:
        """End a live request; the core frees its blocks before its next step. Idempotent."""
        if request_id in self._streams:
            self._outbox.put(("abort", [request_id]))

    # ---- state -------------------------------------------------------------------------------

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def errored(self) -> bool:
        return self._dead.done()

    async def wait_until_dead(self) -> BaseException:
        return await asyncio.shield(self._dead)

    async def shutdown(self) -> None:
        self._closing = True
        self._outbox.put(("shutdown",))
        self._outbox.put(None)
        try:
            await asyncio.to_thread(self._process.wait, 10)
        except subprocess.TimeoutExpired:
            self._process.kill()
        self._fail_all(EngineDeadError("the engine was shut down"))

    # ---- the pipe ------------------------------------------------------------------------------

    def _send(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send(message)
            except OSError:
                return

    def _receive(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                code = self._process.poll()
                self._loop.call_soon_threadsafe(self._on_dead, f"the engine core exited (code {code})")
                return
            self._loop.call_soon_threadsafe(self._on_message, message)

    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "step":
            self._stats = message[2]
            self._on_step(decode_deltas(message[1]))
        elif kind == "accepted":
            for request_id, cached in message[1]:
                stream = self._streams.get(request_id)
                state = self._processor.requests.get(request_id)
                if stream is not None and state is not None:
                    stream.put(RequestOutput(request_id, state.prompt_token_ids, [],
                                                          num_cached_tokens=cached, metrics=state.metrics))
        elif kind == "idle":
            self._stats = message[1]
        elif kind == "rejected":
            _, request_id, code, text, param = message
            stream = self._streams.get(request_id)
            self._processor.drop(request_id)
            if stream is not None:
                stream.put(RequestRejected(code, text, param))
        elif kind == "status":
            log.info("engine core: %s", message[1])
            if self._on_status is not None:
                self._on_status(message[1])
        elif kind == "ready":
            self._ready.set_result(message[1])
        elif kind == "error":
            self._on_dead(f"the engine core failed:\n{message[1]}")

    def _on_step(self, deltas: list) -> None:
        outputs, stopped = self._processor.process(deltas, time.monotonic())
        if stopped:
            self._outbox.put(("abort", stopped))
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put(output)

    def _on_dead(self, reason: str) -> None:
        if self._dead.done() or self._closing:
            return
        error = EngineDeadError(reason)
        log.error("%s", reason)
        self._dead.set_result(error)
        if not self._ready.done():
            self._ready.set_exception(error)
        self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put(error)

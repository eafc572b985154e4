"""A deterministic stand-in for `streampage.engine.async_engine.AsyncEngine`, for the server's tests.

It keeps the interface's promises: refusals raise `RequestRejected` at the first `__anext__`; the first
output carries no tokens; later outputs carry one new token per choice; the last has every
finish_reason; `abort` frees the blocks at once and the stream then ends with "abort"; `kill` makes
every live stream raise `EngineDeadError` and resolves `wait_until_dead`.

Token i of choice c for a prompt is `token_id(prompt, i, c)`; its text is `token_text(token_id)`, so
tests can predict every stream. Blocks: a request holds ceil((prompt + max_tokens) / block_size)
blocks from admission to its end; requests that do not fit wait (num_waiting).

    python tests/fake_engine.py --port 8000     # a server on the fake engine (manual browser checks)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from streampage.outputs import (
    CompletionOutput,
    EngineDeadError,
    EngineStats,
    RequestMetrics,
    RequestOutput,
    RequestRejected,
)
from streampage.sampling_params import SamplingParams

VOCAB_SIZE = 1000


def token_id(prompt: list[int], i: int, choice: int = 0) -> int:
    return (sum(prompt) + 31 * i + 7 * choice) % VOCAB_SIZE


def token_text(token: int) -> str:
    return f" w{token}"


@dataclass(eq=False)
class _Live:
    blocks: int = 0
    aborted: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class FakeEngine:
    model_name = "fake"
    tokenizer = None

    def __init__(self, *, max_model_len: int = 2048, num_blocks: int = 1024, block_size: int = 16,
                 token_delay: float = 0.002, text_repeat: int = 1) -> None:
        self.max_model_len = max_model_len
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.token_delay = token_delay
        self.text_repeat = text_repeat  # each token's text repeated: big frames for back-pressure tests
        self.free_blocks = num_blocks
        self.live: dict[str, _Live] = {}
        self.aborted: list[str] = []
        self.started: list[str] = []
        self.paused = False
        self._waiting = 0
        self._blocks_freed = asyncio.Event()
        self._death: asyncio.Future[BaseException] | None = None
        self._steps = 0
        self._prompt_tokens = 0
        self._generated = 0

    # --- the AsyncEngine interface -------------------------------------------------------------------

    def encode_prompt(self, *, prompt: str | None = None, messages: list[dict] | None = None,
                      prompt_token_ids: list[int] | None = None) -> list[int]:
        if sum(x is not None for x in (prompt, messages, prompt_token_ids)) != 1:
            raise RequestRejected("invalid_param", "give exactly one prompt form", "prompt")
        if prompt_token_ids is not None:
            for token in prompt_token_ids:
                if token >= VOCAB_SIZE:
                    raise RequestRejected("invalid_param", f"token id {token} is not below the vocabulary "
                                          f"size {VOCAB_SIZE}", "prompt_token_ids")
            return list(prompt_token_ids)
        if messages is not None:
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        assert prompt is not None
        return [ord(c) % VOCAB_SIZE for c in prompt]

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        self._refuse_if_never_fits(prompt_token_ids, params)
        if self.errored:
            raise EngineDeadError("the fake engine is dead")
        if request_id in self.live:
            raise RuntimeError(f"request id {request_id!r} is already live in the engine")
        live = self.live[request_id] = _Live()
        self.started.append(request_id)
        metrics = RequestMetrics(arrival_time=time.monotonic())
        try:
            await self._allocate(live, self._blocks_for(prompt_token_ids, params))
            metrics.first_scheduled_time = time.monotonic()
            self._prompt_tokens += len(prompt_token_ids)
            yield RequestOutput(request_id, prompt_token_ids, [], metrics=metrics)
            async for output in self._decode(request_id, live, prompt_token_ids, params, metrics):
                yield output
        finally:
            self._free(live)
            del self.live[request_id]

    async def abort(self, request_id: str) -> None:
        live = self.live.get(request_id)
        if live is None or live.aborted:
            return
        live.aborted = True
        self.aborted.append(request_id)
        self._free(live)
        live.wake.set()

    @property
    def stats(self) -> EngineStats:
        used = self.num_blocks - self.free_blocks
        running = sum(1 for live in self.live.values() if live.blocks)
        return EngineStats(num_running=running, num_waiting=self._waiting, kv_blocks_total=self.num_blocks,
                           kv_blocks_used=used, kv_blocks_empty=self.free_blocks, block_size=self.block_size,
                           prompt_tokens_total=self._prompt_tokens, generation_tokens_total=self._generated,
                           steps_total=self._steps)

    @property
    def errored(self) -> bool:
        return self._death is not None and self._death.done()

    async def wait_until_dead(self) -> BaseException:
        return await self._death_future()

    async def shutdown(self) -> None:
        for request_id in list(self.live):
            await self.abort(request_id)

    # --- test controls -------------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop producing tokens (a stuck step loop) until resume()."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        for live in self.live.values():
            live.wake.set()

    def kill(self, reason: str = "injected failure") -> None:
        """The core dies: every live stream raises EngineDeadError."""
        future = self._death_future()
        if not future.done():
            future.set_result(EngineDeadError(reason))
        for live in self.live.values():
            live.wake.set()
        self._blocks_freed.set()

    # --- internals -----------------------------------------------------------------------------------

    def _death_future(self) -> asyncio.Future[BaseException]:
        if self._death is None:
            self._death = asyncio.get_running_loop().create_future()
        return self._death

    def _blocks_for(self, prompt: list[int], params: SamplingParams) -> int:
        return math.ceil((len(prompt) + params.max_tokens) / self.block_size)

    def _refuse_if_never_fits(self, prompt: list[int], params: SamplingParams) -> None:
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise RequestRejected("prompt_too_long", f"prompt ({len(prompt)} tokens) + max_tokens "
                                  f"({params.max_tokens}) > max_model_len ({self.max_model_len})", "prompt")
        if self._blocks_for(prompt, params) > self.num_blocks:
            raise RequestRejected("prompt_too_long", "the request needs more KV blocks than the pool has",
                                  "prompt")

    async def _allocate(self, live: _Live, blocks: int) -> None:
        self._waiting += 1
        try:
            while self.free_blocks < blocks and not live.aborted:
                self._raise_if_dead()
                self._blocks_freed.clear()
                await self._blocks_freed.wait()
            self._raise_if_dead()
        finally:
            self._waiting -= 1
        if not live.aborted:
            live.blocks = blocks
            self.free_blocks -= blocks

    def _free(self, live: _Live) -> None:
        self.free_blocks += live.blocks
        live.blocks = 0
        self._blocks_freed.set()

    async def _decode(self, request_id: str, live: _Live, prompt: list[int], params: SamplingParams,
                      metrics: RequestMetrics) -> AsyncIterator[RequestOutput]:
        n = params.n
        finished: list[str | None] = [None] * n
        for i in range(params.max_tokens):
            await self._tick(live)
            if live.aborted:
                break
            outputs = []
            for c in range(n):
                if finished[c] is not None:
                    continue
                token = token_id(prompt, i, c)
                if token in params.stop_token_ids:
                    finished[c] = "stop"
                elif i == params.max_tokens - 1:
                    finished[c] = "length"
                logprobs = None if params.logprobs is None else [{token: -0.5, (token + 1) % VOCAB_SIZE: -1.5}]
                outputs.append(CompletionOutput(c, token_text(token) * self.text_repeat, [token], logprobs,
                                                finish_reason=finished[c]))
            self._generated += len(outputs)
            metrics.first_token_time = metrics.first_token_time or time.monotonic()
            done = all(reason is not None for reason in finished)
            yield RequestOutput(request_id, prompt, outputs, finished=done, metrics=metrics)
            if done:
                return
        reasons = [reason or "abort" for reason in finished]
        metrics.finished_time = time.monotonic()
        yield RequestOutput(request_id, prompt, [CompletionOutput(c, finish_reason=r) for c, r in enumerate(reasons)],
                            finished=True, metrics=metrics)

    async def _tick(self, live: _Live) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.wake.wait(), self.token_delay)
        while self.paused and not live.aborted and not self.errored:
            live.wake.clear()
            await live.wake.wait()
        self._raise_if_dead()
        if not live.aborted:
            live.wake.clear()  # a resume() wakes one tick, not all the following ones
        self._steps += 1

    def _raise_if_dead(self) -> None:
        if self.errored:
            raise EngineDeadError("the fake engine is dead")


def main() -> int:
    """Serve the fake engine (for trying the browser page without a model)."""
    from streampage.server.config import ServerConfig
    from streampage.server.lifecycle import configure_logging, run_server

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token-delay", type=float, default=0.05)
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    args = parser.parse_args()
    configure_logging("info")

    async def serve() -> int:
        config = ServerConfig(port=args.port, drain_timeout=args.drain_timeout)
        engine = FakeEngine(token_delay=args.token_delay)

        def announce(server) -> None:
            print(f"PORT {server.port}", flush=True)

        return await run_server(config, engine=engine, on_listening=announce)

    return asyncio.run(serve())


if __name__ == "__main__":
    raise SystemExit(main())

"""One request of one connection: from `response.create` to its one `response.done` (or one `error`).

Life of a request:

    registered --encode, limits, queue, engine accepts--> accepted --engine stream ends--> done
        \\--refused (error frame)                           \\--ended early: cancel, timeout, drain,
                                                               disconnect, engine failure

Exactly-once: `run` sends one `error` and nothing else if the request is refused before the engine
accepts it; otherwise one `response.created` right after acceptance and one `response.done` in its
`finally`. Ending early never skips the engine: it aborts the engine request (which frees its blocks
at once) and the stream then ends on its own; only an engine failure or a shutdown that cannot wait
cancels the task itself (`force_end`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from streampage.outputs import CompletionOutput, EngineDeadError, RequestOutput, RequestRejected
from streampage.server import protocol
from streampage.server.admission import QueueFull, QueueTicket
from streampage.server.context import EngineClient, ServingContext
from streampage.server.outbox import Outbox
from streampage.server.protocol import CreateRequest, ErrorCode, ProtocolError

logger = logging.getLogger(__name__)

# Why the server ended a request early -> (response.done status, finish_reason of unfinished choices).
ENDINGS = {
    "cancel": ("cancelled", "abort"),
    "disconnect": ("cancelled", "abort"),  # nobody reads it; it names the metrics label
    "slow_client": ("cancelled", "abort"),
    "timeout": ("incomplete", "timeout"),
    "drain": ("incomplete", "abort"),
    "error": ("failed", "error"),
}
NATURAL_ENDS = ("stop", "length")


class RequestStream:
    def __init__(self, request: CreateRequest, engine_request_id: str, ctx: ServingContext,
                 outbox: Outbox, on_end: Callable[[RequestStream], None]) -> None:
        self.request = request
        self.request_id = request.request_id
        self.engine_request_id = engine_request_id
        self.ctx = ctx
        self.outbox = outbox
        self.on_end = on_end
        self.received = time.monotonic()
        n = request.params.n
        self.next_seq = [0] * n  # the outbox assigns seqs as frames leave
        self.finish_reasons: list[str | None] = [None] * n
        self.end_reason: str | None = None  # why the server ends it early; the first reason wins
        self.submitted = False  # engine.generate was called
        self.accepted = False  # the engine yielded its first output
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self._last_token = [0.0] * n
        self._ticket: QueueTicket | None = None
        self._abort_tasks: set[asyncio.Task[None]] = set()
        self._forced = False
        self._timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def engine(self) -> EngineClient:
        assert self.ctx.engine is not None
        return self.ctx.engine

    def start(self) -> None:
        timeout = self.request.timeout_s or self.ctx.config.max_request_timeout
        self._timer = asyncio.get_running_loop().call_later(timeout, self.request_abort, "timeout")
        self.task = asyncio.create_task(self.run(), name=f"request {self.engine_request_id}")

    def request_abort(self, reason: str) -> None:
        """End early for `reason` (the first reason wins); tell the engine if it has the request."""
        first = self.end_reason is None
        if first:
            self.end_reason = reason
        if first and self.submitted:
            self._abort_in_engine()

    def _abort_in_engine(self) -> None:
        task = asyncio.create_task(self._abort())
        self._abort_tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._abort_tasks.discard)

    async def _abort(self) -> None:
        try:
            await self.engine.abort(self.engine_request_id)
        except EngineDeadError:
            pass  # a dead engine holds no blocks to free
        except Exception:
            logger.exception("aborting %s in the engine failed", self.engine_request_id)

    def force_end(self, reason: str) -> None:
        """End now without waiting for the engine (it failed, or shutdown cannot wait)."""
        self.request_abort(reason)
        if self.task is not None and not self.task.done():
            self._forced = True
            self.task.cancel()

    async def run(self) -> None:
        try:
            outputs, first = await self._accept()
        except ProtocolError as exc:
            self._refuse(exc)
            return
        except asyncio.CancelledError:
            if not self._forced:
                raise
            self._refuse(_forced_refusal(self.end_reason))
            return
        except Exception:
            logger.exception("request %s failed before the engine accepted it", self.engine_request_id)
            self._refuse(ProtocolError(ErrorCode.INTERNAL_ERROR, "the server failed to start this request"))
            return
        try:
            self._on_output(first)
            if self.end_reason is not None:
                # Asked to end while the engine was accepting it: an abort sent then may have come
                # before the engine knew the request, so send one now that it surely does.
                self._abort_in_engine()
            await self._stream(outputs)
        except asyncio.CancelledError:
            if not self._forced:
                raise
        except EngineDeadError:
            self.request_abort("error")
        except Exception:
            logger.exception("request %s failed", self.engine_request_id)
            self.request_abort("error")
        finally:
            await self._close_stream(outputs)
            self._finish()

    async def _accept(self) -> tuple[AsyncIterator[RequestOutput], RequestOutput]:
        """Encode, check limits, take a queue place and wait for the engine to accept; then send
        response.created (the last step, so nothing after acceptance can fail here)."""
        prompt_ids = self._encode()
        try:
            self._ticket = self.ctx.admission.enter(len(prompt_ids))
        except QueueFull as exc:
            raise ProtocolError(ErrorCode.SERVER_OVERLOADED, str(exc),
                                retry_after_ms=exc.retry_after_ms) from None
        outputs = self.engine.generate(prompt_ids, self.request.params, self.engine_request_id)
        self.submitted = True
        if self.end_reason is not None:
            # Ended before it reached the engine: this abort task runs once the anext below has
            # started the engine's stream, and so reaches an engine that knows the request.
            self._abort_in_engine()
        try:
            first = await anext(outputs)
        except RequestRejected as exc:
            raise ProtocolError(exc.code, str(exc), param=exc.param) from None
        except EngineDeadError:
            raise ProtocolError(ErrorCode.INTERNAL_ERROR, "the engine failed") from None
        self.accepted = True
        self.outbox.put(protocol.created_frame(self.request_id, self.prompt_tokens, first.num_cached_tokens))
        return outputs, first

    def _encode(self) -> list[int]:
        # Tokenizing runs on the event loop (the engine's tokenizer promises no thread safety); its
        # cost is bounded by --max-message-bytes.
        request = self.request
        try:
            prompt_ids = self.engine.encode_prompt(prompt=request.prompt, messages=request.messages,
                                                   prompt_token_ids=request.prompt_token_ids)
        except RequestRejected as exc:
            raise ProtocolError(exc.code, str(exc), param=exc.param) from None
        field = request.prompt_field
        if not prompt_ids:
            raise ProtocolError(ErrorCode.INVALID_PARAM, f"{field} encodes to no tokens", param=field)
        limit = self.ctx.max_prompt_tokens
        if len(prompt_ids) > limit:
            raise ProtocolError(ErrorCode.PROMPT_TOO_LONG,
                                f"{field} has {len(prompt_ids)} tokens; at most {limit}", param=field)
        self.prompt_tokens = len(prompt_ids)
        return prompt_ids

    async def _stream(self, outputs: AsyncIterator[RequestOutput]) -> None:
        async for output in outputs:
            self._on_output(output)

    def _on_output(self, output: RequestOutput) -> None:
        now = time.monotonic()
        self.cached_tokens = max(self.cached_tokens, output.num_cached_tokens)
        if output.metrics is not None and output.metrics.first_scheduled_time is not None:
            self.first_scheduled = self.first_scheduled or output.metrics.first_scheduled_time
        for completion in output.outputs:
            if completion.finish_reason is not None:
                self.finish_reasons[completion.index] = completion.finish_reason
            if completion.token_ids:
                self._on_tokens(completion, now)

    def _on_tokens(self, completion: CompletionOutput, now: float) -> None:
        metrics = self.ctx.metrics
        count = len(completion.token_ids)
        self.completion_tokens += count
        if self.first_token is None:
            self.first_token = now
            metrics.time_to_first_token.observe(now - self.received)
            self._leave_queue()
        elif self._last_token[completion.index]:
            metrics.observe_token_gap(now - self._last_token[completion.index], count)
        self._last_token[completion.index] = now
        wants_ids = self.request.return_token_ids
        top_n = self.request.params.logprobs
        if not (completion.text or wants_ids or top_n is not None):
            return  # only held-back bytes of a character: nothing to show yet
        logprobs = None
        if top_n is not None and completion.logprobs is not None:
            logprobs = protocol.wire_logprobs(completion.token_ids, completion.logprobs, top_n)
        self.outbox.put_delta(self, completion.index, completion.text,
                              completion.token_ids if wants_ids else None, logprobs)

    def _refuse(self, error: ProtocolError) -> None:
        error.request_id = self.request_id
        self._leave_queue()
        self._cancel_timer()
        self.ctx.metrics.requests_rejected.labels(reason=error.code).inc()
        self.outbox.put(protocol.error_frame(error))
        self.on_end(self)

    def _finish(self) -> None:
        """Send the one response.done: status and finish reasons from how the request ended."""
        self._leave_queue()
        self._cancel_timer()
        status, reasons = self._outcome()
        now = time.monotonic()
        usage = protocol.Usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)
        queued_until = self.first_scheduled or self.first_token or now
        timing = protocol.Timing(
            queued_ms=max(0.0, queued_until - self.received) * 1000,
            ttft_ms=None if self.first_token is None else (self.first_token - self.received) * 1000,
            total_ms=(now - self.received) * 1000)
        self.ctx.metrics.e2e_request_latency.observe(now - self.received)
        self.ctx.metrics.request_success.labels(finish_reason=reasons[0]).inc()
        self.outbox.put(protocol.done_frame(self.request_id, status, reasons, usage, timing))
        self.on_end(self)

    def _outcome(self) -> tuple[str, list[str]]:
        engine_reasons = self.finish_reasons
        if all(reason in NATURAL_ENDS for reason in engine_reasons):
            return "completed", [str(r) for r in engine_reasons]
        # Ended early: choices that finished on their own keep their reason.
        # An end the server did not ask for (the engine aborted on its own) is incomplete.
        status, early = ENDINGS.get(self.end_reason or "", ("incomplete", "abort"))
        return status, [r if r in NATURAL_ENDS else early for r in engine_reasons]

    async def _close_stream(self, outputs: AsyncIterator[RequestOutput]) -> None:
        if not all(reason is not None for reason in self.finish_reasons):
            # The stream broke off (an error, or a forced end): make sure the engine lets it go.
            self.end_reason = self.end_reason or "error"
            self._abort_in_engine()
        aclose = getattr(outputs, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()

    def _leave_queue(self) -> None:
        if self._ticket is not None:
            self._ticket.leave()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _forced_refusal(reason: str | None) -> ProtocolError:
    if reason == "error":
        return ProtocolError(ErrorCode.INTERNAL_ERROR, "the engine failed")
    return ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")

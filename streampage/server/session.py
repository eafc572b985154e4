"""One WebSocket connection: a reader that dispatches messages, one writer fed by a bounded outbox,
and the connection's live requests keyed by the client's request_id.

The reader never waits on the engine: it validates, registers and starts a task per request, then
reads on. The writer is the only code that waits on the socket; nothing else ever does, so a slow
client slows nobody but itself (and is dropped with 1008 once its outbox overflows).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from streampage.server import protocol
from streampage.server.context import Phase, ServingContext
from streampage.server.outbox import Outbox
from streampage.server.protocol import CancelRequest, CreateRequest, ErrorCode, Ping, ProtocolError
from streampage.server.request_stream import RequestStream

logger = logging.getLogger(__name__)

# Ids of requests that ended lately: a cancel racing a request's end is not an unknown id.
_RECENTLY_ENDED = 1024


class Session:
    def __init__(self, ws: ServerConnection, ctx: ServingContext) -> None:
        self.ws = ws
        self.ctx = ctx
        self.connection_id = ctx.next_connection_id()
        self.outbox = Outbox(ctx.config.client_buffer_bytes, self._on_overflow)
        self.live: dict[str, RequestStream] = {}
        self._recently_ended: OrderedDict[str, None] = OrderedDict()
        self._limits = protocol.RequestLimits(ctx.config.max_message_bytes, ctx.config.max_output_tokens,
                                              ctx.config.max_request_timeout)
        self._writer: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Serve until the socket closes; then abort what the connection still runs."""
        self._writer = asyncio.create_task(self._write(), name=f"writer {self.connection_id}")
        try:
            await self._read()
        finally:
            self.outbox.discard()
            await self.end_requests("disconnect", self.ctx.config.close_timeout)
            self._writer.cancel()
            if self._closing is not None:
                await self._closing

    async def end_requests(self, reason: str, grace: float) -> None:
        """Abort every live request for `reason`; force the ones still running after `grace` seconds."""
        streams = list(self.live.values())
        for stream in streams:
            stream.request_abort(reason)
        tasks = [s.task for s in streams if s.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for stream in streams:
            if stream.task in pending:
                stream.force_end(reason)
        if pending:
            await asyncio.wait(pending)

    async def close(self, code: int, reason: str) -> None:
        """Send what is queued (done frames included) within the close timeout, then close with `code`."""
        self.outbox.finish()
        if self._writer is not None:
            try:
                async with asyncio.timeout(self.ctx.config.close_timeout):
                    await asyncio.shield(self._writer)
            except TimeoutError:
                self._writer.cancel()
        await self._close_socket(code, reason)

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in self.ws:
                if self._closing is None:
                    self._dispatch(raw)

    def _dispatch(self, raw: str | bytes) -> None:
        try:
            message = protocol.parse_message(raw, self._limits)
        except ProtocolError as exc:
            self._send_error(exc)
            return
        if isinstance(message, CreateRequest):
            self._create(message)
        elif isinstance(message, CancelRequest):
            self._cancel(message)
        elif isinstance(message, Ping):
            self.outbox.put(protocol.pong_frame(message.event_id))

    def _create(self, request: CreateRequest) -> None:
        request_id = request.request_id
        if self.ctx.phase is not Phase.SERVING:
            self._send_error(ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down",
                                           request_id=request_id))
        elif request_id in self.live:
            self._send_error(ProtocolError(ErrorCode.DUPLICATE_REQUEST_ID,
                                           f"request {request_id!r} is still running on this connection",
                                           param="request_id", request_id=request_id))
        elif len(self.live) >= self.ctx.config.max_requests_per_connection:
            self._send_error(ProtocolError(
                ErrorCode.TOO_MANY_REQUESTS,
                f"this connection runs {len(self.live)} requests; at most "
                f"{self.ctx.config.max_requests_per_connection}", request_id=request_id))
        else:
            stream = RequestStream(request, f"{self.connection_id}:{request_id}", self.ctx, self.outbox,
                                   self._ended)
            self.live[request_id] = stream
            self.ctx.live_requests += 1
            self._recently_ended.pop(request_id, None)
            stream.start()

    def _cancel(self, cancel: CancelRequest) -> None:
        stream = self.live.get(cancel.request_id)
        if stream is not None:
            stream.request_abort("cancel")  # the first reason wins: a second cancel does nothing
        elif cancel.request_id not in self._recently_ended:
            self._send_error(ProtocolError(ErrorCode.UNKNOWN_REQUEST_ID,
                                           f"no live request {cancel.request_id!r} on this connection",
                                           param="request_id", request_id=cancel.request_id))

    def _ended(self, stream: RequestStream) -> None:
        if self.live.get(stream.request_id) is stream:
            del self.live[stream.request_id]
            self.ctx.live_requests -= 1
        self._recently_ended[stream.request_id] = None
        if len(self._recently_ended) > _RECENTLY_ENDED:
            self._recently_ended.popitem(last=False)

    def _send_error(self, error: ProtocolError) -> None:
        self.ctx.metrics.requests_rejected.labels(reason=error.code).inc()
        self.outbox.put(protocol.error_frame(error))

    async def _write(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while (frame := await self.outbox.get()) is not None:
                await self.ws.send(frame, text=True)

    def _on_overflow(self) -> None:
        if self._closing is not None:
            return
        logger.warning("connection %s fell more than %d bytes behind; closing it (1008)",
                       self.connection_id, self.ctx.config.client_buffer_bytes)
        self.ctx.metrics.slow_client_disconnects.inc()
        for stream in self.live.values():
            stream.request_abort("slow_client")
        if self._writer is not None:
            # It may wait in send() for a full socket buffer; the frame it sends is already written
            # out whole, so stopping it cannot cut a frame.
            self._writer.cancel()
        self._closing = asyncio.create_task(self._close_socket(CloseCode.POLICY_VIOLATION, "client too slow"))

    async def _close_socket(self, code: int, reason: str) -> None:
        # ws.close() waits for the peer to read our close frame; a peer that reads nothing would hold
        # it forever, so past the close timeout the TCP connection is dropped.
        try:
            async with asyncio.timeout(self.ctx.config.close_timeout):
                await self.ws.close(code, reason)
        except TimeoutError:
            self.ws.transport.abort()

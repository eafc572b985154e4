"""The WebSocket server and its plain HTTP endpoints on one port: handshake checks, HTTP routes,
one `Session` per socket, and the drain / fail / close steps the lifecycle drives."""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from streampage.server.admission import Admission
from streampage.server.auth import HandshakeGuard, select_subprotocol
from streampage.server.config import ServerConfig
from streampage.server.context import EngineClient, Phase, ServingContext
from streampage.server.endpoints import STREAM_PATH, Endpoints, text
from streampage.server.metrics import ServerMetrics
from streampage.server.session import Session

logger = logging.getLogger("streampage.server")

_DRAIN_POLL_SECONDS = 0.05


class StreamServer:
    """One listening socket: WebSocket sessions at /v1/stream, plain HTTP everywhere else."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        admission = Admission(config.max_queued_requests, config.max_queued_prompt_tokens)
        self.ctx = ServingContext(config, ServerMetrics(), admission)
        self.ctx.metrics.watch(self.ctx.engine_stats, self.ctx.server_gauges)
        self.guard = HandshakeGuard(config.api_key, config.allowed_origins)
        self.endpoints = Endpoints(self.ctx)
        self.sessions: set[Session] = set()
        self.stop_requested = asyncio.Event()
        self._hurry = False  # a second stop request cuts the drain short
        self._server: Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def listen(self) -> None:
        """Listen at once, so /healthz and /readyz answer while the model loads."""
        self._server = await serve(
            self._handle, self.config.host, self.config.port,
            process_request=self._process_request,
            select_subprotocol=lambda _connection, offered: select_subprotocol(offered),
            # Frames up to twice the limit are read and answered with an error; larger ones close 1009.
            max_size=2 * self.config.max_message_bytes,
            close_timeout=self.config.close_timeout,
            # Deflating every small delta frame costs CPU the step loop needs; tokens compress poorly.
            compression=None,
        )
        logger.info("listening on %s:%d (WebSocket at %s)", self.config.host, self.port, STREAM_PATH)

    def attach(self, engine: EngineClient) -> None:
        self.ctx.engine = engine
        self.ctx.phase = Phase.SERVING

    def request_stop(self) -> None:
        if self.stop_requested.is_set():
            self._hurry = True
        self.stop_requested.set()

    async def drain(self, timeout: float) -> None:
        """Refuse new work, give in-flight requests `timeout` seconds, end the rest as incomplete,
        and close every socket with 1001."""
        self.ctx.phase = Phase.DRAINING
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.ctx.live_requests and loop.time() < deadline and not self._hurry:
            await asyncio.sleep(_DRAIN_POLL_SECONDS)
        if self.ctx.live_requests:
            logger.info("drain deadline: ending %d requests as incomplete", self.ctx.live_requests)
        await asyncio.gather(*(s.end_requests("drain", self.config.close_timeout) for s in self.sessions))
        await self.close(CloseCode.GOING_AWAY, "server shutting down")

    async def fail(self) -> None:
        """The engine died: fail every live request at once and close every socket with 1011."""
        self.ctx.phase = Phase.FAILED
        await asyncio.gather(*(s.end_requests("error", 0) for s in self.sessions))
        await self.close(CloseCode.INTERNAL_ERROR, "engine failed")

    async def close(self, code: int = CloseCode.GOING_AWAY, reason: str = "") -> None:
        await asyncio.gather(*(s.close(code, reason) for s in list(self.sessions)))
        if self._server is not None:
            self._server.close(close_connections=True, code=code, reason=reason)
            await self._server.wait_closed()

    def _process_request(self, _connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path != STREAM_PATH:
            return self.endpoints.handle(request.method, path)
        refusal = self.guard.refusal(request.headers)
        if refusal is not None:
            status, reason = refusal
            return self._refuse_upgrade(status, reason)
        if self.ctx.phase is not Phase.SERVING:
            return self._refuse_upgrade(HTTPStatus.SERVICE_UNAVAILABLE, self.ctx.phase.value)
        # Sockets still in their handshake are not counted, so a burst may pass the limit by a few.
        if len(self.sessions) >= self.config.max_connections:
            return self._refuse_upgrade(HTTPStatus.SERVICE_UNAVAILABLE,
                                        f"the server has {len(self.sessions)} connections; at most "
                                        f"{self.config.max_connections}")
        return None

    def _refuse_upgrade(self, status: HTTPStatus, reason: str) -> Response:
        self.ctx.metrics.requests_rejected.labels(reason=f"http_{status.value}").inc()
        return text(status, reason + "\n")

    async def _handle(self, ws: ServerConnection) -> None:
        session = Session(ws, self.ctx)
        self.sessions.add(session)
        self.ctx.connections += 1
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self.ctx.connections -= 1

"""Plain HTTP on the WebSocket port: health, readiness, metrics, a JSON snapshot and the browser page."""

from __future__ import annotations

import email.utils
from dataclasses import asdict
from http import HTTPStatus
from importlib import resources
from typing import Any

import orjson
from websockets.datastructures import Headers
from websockets.http11 import Response

from streampage.server.context import Phase, ServingContext
from streampage.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

STREAM_PATH = "/v1/stream"
_PAGE = resources.files("streampage.server").joinpath("static/index.html")


def respond(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),
        ("Content-Length", str(len(body))),
        ("Content-Type", content_type),
        ("Cache-Control", "no-store"),
    ])
    return Response(status.value, status.phrase, headers, body)


def text(status: HTTPStatus, body: str) -> Response:
    return respond(status, body.encode(), "text/plain; charset=utf-8")


class Endpoints:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx
        self._page = _PAGE.read_bytes()
        self._routes = {"/healthz": self.healthz, "/readyz": self.readyz, "/metrics": self.metrics,
                        "/v1/stats": self.stats, "/": self.page, "/index.html": self.page}

    def handle(self, method: str, path: str) -> Response:
        route = self._routes.get(path)
        if route is None:
            return text(HTTPStatus.NOT_FOUND, f"no such endpoint; the WebSocket is at {STREAM_PATH}\n")
        if method != "GET":
            return text(HTTPStatus.METHOD_NOT_ALLOWED, "only GET is served\n")
        return route()

    def healthz(self) -> Response:
        return text(HTTPStatus.OK, "ok\n")

    def readyz(self) -> Response:
        phase = self.ctx.phase
        if phase is Phase.SERVING:
            return text(HTTPStatus.OK, "ready\n")
        detail = f": {self.ctx.loading_status}" if phase is Phase.LOADING else ""
        return text(HTTPStatus.SERVICE_UNAVAILABLE, f"{phase.value}{detail}\n")

    def metrics(self) -> Response:
        return respond(HTTPStatus.OK, self.ctx.metrics.render(), METRICS_CONTENT_TYPE)

    def stats(self) -> Response:
        return respond(HTTPStatus.OK, orjson.dumps(stats_snapshot(self.ctx)), "application/json")

    def page(self) -> Response:
        return respond(HTTPStatus.OK, self._page, "text/html; charset=utf-8")


def stats_snapshot(ctx: ServingContext) -> dict[str, Any]:
    """What the browser page draws: the phase, the server's queue and the engine's block pool."""
    engine = ctx.engine
    snapshot: dict[str, Any] = {
        "phase": ctx.phase.value,
        "model": engine.model_name if engine is not None else None,
        "server": ctx.server_gauges(),
    }
    if engine is not None:
        stats = engine.stats
        snapshot["engine"] = {**asdict(stats), "kv_blocks_free": stats.kv_blocks_free,
                              "kv_usage": stats.kv_usage}
    return snapshot

"""The streampage.v1 WebSocket client: streams on connections, one socket each or multiplexed.

A `StreamConnection` owns one socket and one reader task; the reader stamps every frame with
`perf_counter()` as soon as it is read and routes it by `request_id` to its `Stream`. Scenarios use
the same pieces to misbehave on purpose (stall the reader, cancel, drop the socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from time import perf_counter
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from loadtest.backends import BackendConfig, BackendUnavailable
from loadtest.records import RequestRecord
from loadtest.workloads import RequestSpec

SUBPROTOCOL = "streampage.v1"
SLOW_READER_RCVBUF = 4096   # bytes: small enough that a stalled reader pushes back on the server soon


class Stream:
    """The client side of one request: folds its frames into the record."""

    def __init__(self, record: RequestRecord, watch_tokens: int = 0) -> None:
        self.record = record
        self.tokens = 0
        self.finished = asyncio.Event()
        self.reached = asyncio.Event()    # set once `watch_tokens` tokens arrived (or the stream ended)
        self._watch_tokens = watch_tokens
        self._next_seq = 0

    def on_frame(self, frame: dict[str, Any], now: float) -> None:
        kind = frame.get("type")
        if kind == "response.output_text.delta":
            self._on_delta(frame, now)
        elif kind == "response.created":
            self.record.server_prompt_tokens = frame.get("prompt_tokens")
            self.record.cached_tokens = frame.get("cached_tokens")
        elif kind == "response.done":
            self._on_done(frame, now)
        elif kind == "error":
            self.end(now, f"error:{(frame.get('error') or {}).get('code')}")

    def end(self, now: float, error: str | None = None) -> None:
        self.record.finish(now, error)
        self.finished.set()
        self.reached.set()

    def _on_delta(self, frame: dict[str, Any], now: float) -> None:
        token_ids = frame.get("token_ids")
        count = 1 if token_ids is None else len(token_ids)
        seq = frame.get("seq", self._next_seq)
        self.record.seq_gaps += seq > self._next_seq
        self._next_seq = seq + 1
        if count == 0:
            return
        self.record.add_chunk(now, count)
        self.tokens += count
        if self._watch_tokens and self.tokens >= self._watch_tokens:
            self.reached.set()

    def _on_done(self, frame: dict[str, Any], now: float) -> None:
        usage = frame.get("usage") or {}
        self.record.usage_output_tokens = usage.get("completion_tokens")
        choices = frame.get("choices") or [{}]
        self.record.finish_reason = choices[0].get("finish_reason")
        status = frame.get("status")
        self.end(now, None if status == "completed" else f"status:{status}")


class StreamConnection:
    """One socket, its reader task, and the streams live on it."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._streams: dict[str, Stream] = {}
        self._reading = asyncio.Event()
        self._reading.set()
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, config: BackendConfig, slow_reader: bool = False) -> StreamConnection:
        """Connect; a slow reader gets a tiny receive buffer so that stalling it is felt upstream."""
        options: dict[str, Any] = {}
        if slow_reader:
            options = {"sock": await _small_buffer_socket(config.host, config.port), "max_queue": 1}
        ws = await connect(
            config.url, subprotocols=[SUBPROTOCOL], additional_headers=config.auth_headers,
            compression="deflate" if config.compression else None,
            # The server keeps connections alive; client pings would only add frames to measure around.
            ping_interval=None, proxy=None, **options,
        )
        return cls(ws)

    @property
    def closed(self) -> bool:
        return self.reader.done()

    async def submit(self, payload: dict[str, Any], stream: Stream) -> None:
        self._streams[payload["request_id"]] = stream
        stream.record.sent_at = perf_counter()
        try:
            await self._ws.send(orjson.dumps(payload), text=True)
        except ConnectionClosed as exc:
            self._streams.pop(payload["request_id"], None)
            stream.end(perf_counter(), _disconnect_reason(exc))

    async def cancel(self, request_id: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(orjson.dumps({"type": "response.cancel", "request_id": request_id}), text=True)

    def forget(self, request_id: str) -> None:
        """Stop routing frames to a request the caller gave up on (late frames are dropped)."""
        self._streams.pop(request_id, None)

    async def stall(self, seconds: float) -> None:
        """Stop reading the socket for a while, as a client that stops consuming would."""
        self._reading.clear()
        try:
            await asyncio.sleep(seconds)
        finally:
            self._reading.set()

    def abort(self) -> None:
        """Drop the TCP connection without a closing handshake, as a vanished client does."""
        self._ws.transport.abort()

    async def close(self) -> None:
        await self._ws.close()
        await self.reader

    async def _read(self) -> None:
        reason = "disconnect:reader_stopped"
        try:
            while True:
                await self._reading.wait()
                message = await self._ws.recv()
                self._dispatch(orjson.loads(message), perf_counter())
        except ConnectionClosed as exc:
            reason = _disconnect_reason(exc)
        except orjson.JSONDecodeError:
            reason = "protocol:invalid_json"
            await self._ws.close()
        finally:
            now = perf_counter()
            for stream in self._streams.values():
                stream.end(now, reason)
            self._streams.clear()

    def _dispatch(self, frame: dict[str, Any], now: float) -> None:
        request_id = frame.get("request_id")
        stream = self._streams.get(request_id) if request_id is not None else None
        if stream is None:
            return
        stream.on_frame(frame, now)
        if stream.finished.is_set():
            del self._streams[request_id]


def create_payload(spec: RequestSpec, request_id: str, config: BackendConfig) -> dict[str, Any]:
    """`response.create` with token ids both ways, so lengths and per-delta token counts are exact."""
    return {
        "type": "response.create", "request_id": request_id,
        "prompt_token_ids": spec.prompt_token_ids, "max_tokens": spec.max_tokens,
        "ignore_eos": config.ignore_eos, "temperature": config.temperature, "return_token_ids": True,
    }


async def run_stream(connection: StreamConnection, stream: Stream, payload: dict[str, Any]) -> None:
    """Submit and wait for the end; if the caller gives up (timeout), cancel it on the server."""
    await connection.submit(payload, stream)
    try:
        await stream.finished.wait()
    finally:
        if not stream.finished.is_set():
            connection.forget(payload["request_id"])
            await connection.cancel(payload["request_id"])


def connect_error(exc: Exception) -> str:
    if isinstance(exc, InvalidStatus):
        return f"connect:http_{exc.response.status_code}"
    return f"connect:{type(exc).__name__}"


class WebSocketClient:
    """Runs requests on a shared pool of connections, or on a fresh socket each when the pool is empty."""

    def __init__(self, config: BackendConfig, pool: list[StreamConnection]) -> None:
        self._config = config
        self._pool = itertools.cycle(pool) if pool else None

    async def request(self, spec: RequestSpec, record: RequestRecord) -> None:
        payload = create_payload(spec, record.request_id, self._config)
        if self._pool is not None:
            await run_stream(next(self._pool), Stream(record), payload)
            return
        try:
            connection = await StreamConnection.open(self._config)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            record.finish(perf_counter(), connect_error(exc))
            return
        try:
            await run_stream(connection, Stream(record), payload)
        finally:
            await connection.close()


@asynccontextmanager
async def open_websocket_client(config: BackendConfig) -> AsyncIterator[WebSocketClient]:
    pool: list[StreamConnection] = []
    try:
        pool.extend([await StreamConnection.open(config) for _ in range(config.connections)])
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        for connection in pool:
            await connection.close()
        raise BackendUnavailable(config.url, exc) from exc
    try:
        yield WebSocketClient(config, pool)
    finally:
        for connection in pool:
            await connection.close()


def _disconnect_reason(exc: ConnectionClosed) -> str:
    frame = exc.rcvd or exc.sent
    return f"disconnect:{frame.code if frame else 1006}"


async def _small_buffer_socket(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = (await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM))[0]
    sock = socket.socket(family, kind, proto)
    # The receive buffer must be set before connecting: it fixes the TCP window that is offered.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_READER_RCVBUF)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock

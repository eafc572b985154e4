"""Run a streampage server on the fake engine inside the test's event loop, and talk to it over real
sockets the way clients do: a websockets client, plain HTTP GETs, and /metrics parsed into numbers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from fake_engine import FakeEngine
from websockets.asyncio.client import ClientConnection, connect

from streampage.server.config import ServerConfig
from streampage.server.lifecycle import run_server
from streampage.server.protocol import SUBPROTOCOL
from streampage.server.sd_notify import Notifier
from streampage.server.stream_server import StreamServer

WAIT_S = 10.0  # generous: the CI machine is a shared 2-core box


class Client:
    """A websockets client that files every frame it receives by request_id."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.by_request: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.untagged: list[dict[str, Any]] = []  # frames without a request_id (pongs, some errors)
        self._arrived = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for message in self.ws:
                assert isinstance(message, str), "the server sends text frames only"
                frame = orjson.loads(message)
                self.frames.append(frame)
                if "request_id" in frame:
                    self.by_request[frame["request_id"]].append(frame)
                else:
                    self.untagged.append(frame)
                self._arrived.set()
        self._arrived.set()

    async def send(self, **message: Any) -> None:
        await self.ws.send(orjson.dumps(message).decode())

    async def create(self, request_id: str, **fields: Any) -> None:
        fields.setdefault("prompt", "hello")
        fields.setdefault("max_tokens", 8)
        await self.send(type="response.create", request_id=request_id, **fields)

    async def wait_for(self, condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                if self._reader.done():
                    raise AssertionError("the connection closed while waiting")
                self._arrived.clear()
                await self._arrived.wait()

    async def finished(self, request_id: str, timeout: float = WAIT_S) -> list[dict[str, Any]]:
        """The frames of a request once its last one (response.done or error) arrived."""
        def ended() -> bool:
            frames = self.by_request.get(request_id)
            return bool(frames) and frames[-1]["type"] in ("response.done", "error")
        await self.wait_for(ended, timeout)
        return self.by_request[request_id]

    async def untagged_frame(self, count: int = 1, timeout: float = WAIT_S) -> dict[str, Any]:
        await self.wait_for(lambda: len(self.untagged) >= count, timeout)
        return self.untagged[count - 1]

    async def closed(self, timeout: float = WAIT_S) -> int | None:
        """Wait for the server to close the connection; its close code."""
        async with asyncio.timeout(timeout):
            await self._reader
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


def check_exactly_once(frames: list[dict[str, Any]]) -> dict[str, Any]:
    """One request's frames obey DESIGN.md 7: one error alone, or created, deltas with gapless seqs per
    choice, done. Returns the last frame."""
    types = [f["type"] for f in frames]
    if types[0] == "error":
        assert types == ["error"], types
        return frames[0]
    assert types[0] == "response.created" and types[-1] == "response.done", types
    assert types.count("response.created") == 1 and types.count("response.done") == 1, types
    seqs: dict[int, list[int]] = defaultdict(list)
    for frame in frames[1:-1]:
        assert frame["type"] == "response.output_text.delta", frame
        seqs[frame["index"]].append(frame["seq"])
    for index, got in seqs.items():
        assert got == list(range(len(got))), (index, got)
    return frames[-1]


def streamed_text(frames: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(f["delta"] for f in frames if f["type"] == "response.output_text.delta" and f["index"] == index)


@dataclass
class Harness:
    server: StreamServer
    engine: FakeEngine
    task: asyncio.Task[int]

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    async def connect(self, subprotocols: list[str] | None = None, **kwargs: Any) -> Client:
        ws = await connect(self.url, subprotocols=subprotocols or [SUBPROTOCOL], **kwargs)
        return Client(ws)

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        return await http_get(self.port, path, headers)

    async def metrics(self) -> dict[str, float]:
        status, body = await self.get("/metrics")
        assert status == 200
        return parse_metrics(body.decode())

    async def stop(self) -> int:
        self.server.request_stop()
        return await self.task


@contextlib.asynccontextmanager
async def running_server(engine: FakeEngine | None = None, notifier: Notifier | None = None,
                         **overrides: Any) -> AsyncIterator[Harness]:
    """A server on port 0 in this event loop; stopped (drained) on exit unless the test ended it."""
    engine = engine or FakeEngine()
    overrides.setdefault("drain_timeout", 2.0)
    config = ServerConfig(port=0, **overrides)
    listening: asyncio.Future[StreamServer] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_server(config, engine=engine, on_listening=listening.set_result,
                                          handle_signals=False, notifier=notifier or Notifier(None)))
    await asyncio.wait([listening, task], return_when=asyncio.FIRST_COMPLETED)
    harness = Harness(listening.result(), engine, task)
    try:
        yield harness
    finally:
        if not task.done():
            await harness.stop()


async def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A plain HTTP/1.1 GET; returns (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def parse_metrics(exposition: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value}."""
    values = {}
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


LOAD_TIMEOUT_S = 300


async def start_serve(tmp_path: Path) -> tuple[asyncio.subprocess.Process, int]:
    """`streampage serve` on the demo model (CPU) in a subprocess; returns it once /readyz says 200."""
    env = {**os.environ, "STREAMPAGE_DEMO_MODEL_DIR": str(tmp_path / "demo-model"),
           "STREAMPAGE_DRAIN_TIMEOUT": "0.5"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streampage.cli", "serve", "--port", "0", "--device", "cpu",
        "--num-gpu-blocks", "512", env=env, stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None
    log = []
    async with asyncio.timeout(LOAD_TIMEOUT_S):
        while (line := (await process.stderr.readline()).decode()):
            log.append(line)
            if found := re.search(r"listening on [\d.]+:(\d+)", line):
                port = int(found.group(1))
                break
        else:
            pytest.fail("streampage serve exited before listening:\n" + "".join(log))
        asyncio.get_running_loop().create_task(_drain_pipe(process.stderr))
        while (await http_get(port, "/readyz"))[0] != 200:
            assert process.returncode is None, "streampage serve died while loading"
            await asyncio.sleep(0.2)
    return process, port


async def _drain_pipe(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass

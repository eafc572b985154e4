"""Lifecycle: drain on stop (in-flight requests finish, the rest end incomplete, sockets close 1001,
exit 0), engine death (requests fail, exit 1), sd_notify over a real NOTIFY_SOCKET, and SIGTERM to a
real server process (on the fake engine)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

import orjson
import pytest
from fake_engine import FakeEngine
from server_harness import check_exactly_once, http_get, running_server
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streampage.server.config import ServerConfig
from streampage.server.context import Phase
from streampage.server.lifecycle import run_server
from streampage.server.sd_notify import Notifier

TESTS = Path(__file__).parent


async def test_drain_lets_in_flight_requests_finish_and_refuses_new_work() -> None:
    async with running_server(FakeEngine(token_delay=0.01), drain_timeout=10) as server:
        client = await server.connect()
        await client.create("inflight", max_tokens=40)
        await client.wait_for(lambda: len(client.by_request["inflight"]) >= 2)
        server.server.request_stop()
        await asyncio.sleep(0.05)
        assert await server.get("/readyz") == (503, b"draining\n")
        assert (await server.get("/healthz"))[0] == 200
        await client.create("late", max_tokens=2)
        assert [f["error"]["code"] for f in await client.finished("late")] == ["shutting_down"]
        with pytest.raises(InvalidStatus) as refused:
            await server.connect()
        assert refused.value.response.status_code == 503
        done = check_exactly_once(await client.finished("inflight"))
        assert done["status"] == "completed" and done["usage"]["completion_tokens"] == 40
        assert await client.closed() == 1001
        assert await server.task == 0


async def test_drain_deadline_ends_the_rest_as_incomplete() -> None:
    engine = FakeEngine(token_delay=0.01)
    async with running_server(engine, drain_timeout=0.3) as server:
        client = await server.connect()
        await client.create("endless", max_tokens=100_000 // 100, n=2)
        await client.wait_for(lambda: len(client.by_request["endless"]) >= 2)
        assert await server.stop() == 0
        done = check_exactly_once(await client.finished("endless"))
        assert done["status"] == "incomplete"
        assert done["choices"] == [{"index": 0, "finish_reason": "abort"}, {"index": 1, "finish_reason": "abort"}]
        assert await client.closed() == 1001
        assert engine.free_blocks == engine.num_blocks


async def test_engine_death_fails_live_requests_and_exits_non_zero() -> None:
    engine = FakeEngine(num_blocks=4, token_delay=0.01)
    async with running_server(engine) as server:
        client = await server.connect()
        await client.create("running", max_tokens=50)
        await client.wait_for(lambda: len(client.by_request["running"]) >= 2)
        await client.create("waiting", max_tokens=50)  # no blocks left: not accepted yet
        await asyncio.sleep(0.05)
        engine.kill()
        done = check_exactly_once(await client.finished("running"))
        assert done["status"] == "failed"
        assert done["choices"] == [{"index": 0, "finish_reason": "error"}]
        assert [f["error"]["code"] for f in await client.finished("waiting")] == ["internal_error"]
        assert server.server.ctx.phase is Phase.FAILED
        assert await client.closed() == 1011
        assert await server.task == 1


class NotifyListener:
    """The service manager's end of NOTIFY_SOCKET: a bound unix datagram socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def receive(self, wanted: str, timeout: float = 5.0) -> list[str]:
        """Collect datagrams until one contains `wanted`; all received so far."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while not any(wanted in m for m in self.messages):
                self.messages.append((await loop.sock_recv(self.sock, 4096)).decode())
        return self.messages

    def close(self) -> None:
        self.sock.close()


async def test_sd_notify_status_ready_watchdog_and_stopping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listener = NotifyListener(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 50 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    engine = FakeEngine(token_delay=0.005)
    listening = asyncio.get_running_loop().create_future()

    async def start_engine(on_status) -> FakeEngine:
        on_status("loading weights 40%")
        await asyncio.sleep(0.05)
        return engine

    task = asyncio.create_task(run_server(ServerConfig(port=0), start_engine=start_engine, handle_signals=False,
                                          on_listening=listening.set_result))
    server = await listening
    messages = await listener.receive("READY=1")
    assert "STATUS=loading weights 40%" in messages
    assert "WATCHDOG=1" not in messages, "the watchdog starts after READY=1"
    ready = next(m for m in messages if "READY=1" in m)
    assert ready == f"READY=1\nSTATUS=serving fake on port {server.port}"
    listener.messages.clear()
    await listener.receive("WATCHDOG=1")  # idle and healthy: fed

    ws = await connect(f"ws://127.0.0.1:{server.port}/v1/stream", subprotocols=["streampage.v1"])
    await ws.send(orjson.dumps({"type": "response.create", "request_id": "r", "prompt": "x",
                                "max_tokens": 500}).decode())
    await ws.recv()
    engine.pause()  # work to do and no progress: a wedged step loop
    await asyncio.sleep(0.15)
    listener.messages.clear()
    await asyncio.sleep(0.3)
    with pytest.raises(TimeoutError):
        await listener.receive("WATCHDOG=1", timeout=0.3)
    engine.resume()
    await listener.receive("WATCHDOG=1")
    await ws.close()

    server.request_stop()
    await listener.receive("STOPPING=1")
    assert any(m.startswith("STOPPING=1\nSTATUS=draining") for m in listener.messages)
    assert await task == 0
    listener.close()


async def test_sd_notify_reaches_abstract_namespace_sockets() -> None:
    name = f"streampage-test-{os.getpid()}"
    listener = NotifyListener("\0" + name)
    Notifier("@" + name).ready("up")
    assert await listener.receive("READY=1") == ["READY=1\nSTATUS=up"]
    listener.close()


def test_watchdog_settings_come_from_the_environment() -> None:
    assert Notifier.from_environment({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    assert Notifier.from_environment({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier.from_environment({}).watchdog_interval is None


async def test_without_notify_socket_nothing_is_sent() -> None:
    Notifier.from_environment({}).ready("up")  # no socket, no error


async def start_process(*args: str) -> tuple[asyncio.subprocess.Process, int]:
    process = await asyncio.create_subprocess_exec(sys.executable, str(TESTS / "fake_engine.py"), *args,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    port = int(line.split()[1])
    while (await http_get(port, "/readyz"))[0] != 200:
        await asyncio.sleep(0.02)
    return process, port


async def test_sigterm_to_a_server_process_drains_and_exits_zero() -> None:
    process, port = await start_process("--port", "0", "--token-delay", "0.01", "--drain-timeout", "0.5")
    ws = await connect(f"ws://127.0.0.1:{port}/v1/stream", subprotocols=["streampage.v1"])
    for request_id, max_tokens in (("short", 10), ("long", 100_000 // 100)):
        await ws.send(orjson.dumps({"type": "response.create", "request_id": request_id, "prompt": "hi",
                                    "max_tokens": max_tokens}).decode())
    frames: dict[str, list[dict]] = {"short": [], "long": []}
    while len(frames["long"]) < 3:
        frame = orjson.loads(await ws.recv())
        frames[frame["request_id"]].append(frame)
    process.send_signal(signal.SIGTERM)
    with pytest.raises(ConnectionClosed):
        while True:
            frame = orjson.loads(await ws.recv())
            frames[frame["request_id"]].append(frame)
    assert ws.close_code == 1001
    assert check_exactly_once(frames["short"])["status"] == "completed"
    done = check_exactly_once(frames["long"])
    assert done["status"] == "incomplete" and done["choices"][0]["finish_reason"] == "abort"
    assert await asyncio.wait_for(process.wait(), 10) == 0


async def test_a_second_sigterm_cuts_the_drain_short() -> None:
    process, port = await start_process("--port", "0", "--token-delay", "0.01", "--drain-timeout", "60")
    ws = await connect(f"ws://127.0.0.1:{port}/v1/stream", subprotocols=["streampage.v1"])
    await ws.send(orjson.dumps({"type": "response.create", "request_id": "long", "prompt": "hi",
                                "max_tokens": 1000}).decode())
    await ws.recv()
    process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            last = orjson.loads(message)
    assert last["type"] == "response.done" and last["status"] == "incomplete"
    assert ws.close_code == 1001
    assert await asyncio.wait_for(process.wait(), 10) == 0

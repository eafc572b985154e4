"""Limits and admission: each refused with its code while accepted work finishes; the handshake's
key, origin and subprotocol checks; the plain HTTP endpoints."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from fake_engine import FakeEngine
from server_harness import check_exactly_once, running_server
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from streampage.server.config import ServerConfig
from streampage.server.lifecycle import run_server
from streampage.server.sd_notify import Notifier
from streampage.server.stream_server import StreamServer


async def test_too_many_requests_on_one_connection() -> None:
    async with running_server(FakeEngine(token_delay=0.01), max_requests_per_connection=2) as server:
        client = await server.connect()
        await client.create("a", max_tokens=30)
        await client.create("b", max_tokens=30)
        await client.create("c", max_tokens=30)
        assert [f["error"]["code"] for f in await client.finished("c")] == ["too_many_requests"]
        other = await server.connect()  # the cap is per connection
        await other.create("c", max_tokens=2)
        assert check_exactly_once(await other.finished("c"))["status"] == "completed"
        assert check_exactly_once(await client.finished("a"))["status"] == "completed"
        client.by_request.pop("c")
        await client.create("c", max_tokens=2)
        assert check_exactly_once(await client.finished("c"))["status"] == "completed"


async def test_full_queue_is_server_overloaded_while_accepted_requests_finish() -> None:
    engine = FakeEngine()
    engine.pause()  # no request gets a first token: all stay queued
    async with running_server(engine, max_queued_requests=3, max_queued_prompt_tokens=100) as server:
        client = await server.connect()
        for i in range(3):
            await client.create(f"q{i}", max_tokens=4)
        await client.wait_for(lambda: all(client.by_request[f"q{i}"] for i in range(3)))
        await client.create("over", max_tokens=4)
        error = (await client.finished("over"))[0]
        assert error["error"]["code"] == "server_overloaded"
        assert isinstance(error["error"]["retry_after_ms"], int) and error["error"]["retry_after_ms"] > 0
        engine.resume()
        for i in range(3):
            assert check_exactly_once(await client.finished(f"q{i}"))["status"] == "completed"
        client.by_request.pop("over")
        await client.create("over", max_tokens=4)
        assert check_exactly_once(await client.finished("over"))["status"] == "completed"


async def test_queued_prompt_tokens_are_limited_too() -> None:
    engine = FakeEngine()
    engine.pause()
    async with running_server(engine, max_queued_prompt_tokens=30) as server:
        client = await server.connect()
        await client.create("a", prompt="x" * 20, max_tokens=2)
        await client.wait_for(lambda: bool(client.by_request["a"]))
        await client.create("b", prompt="x" * 20, max_tokens=2)
        error = (await client.finished("b"))[0]
        assert error["error"]["code"] == "server_overloaded" and "prompt tokens" in error["error"]["message"]
        engine.resume()
        assert check_exactly_once(await client.finished("a"))["status"] == "completed"


async def test_oversized_messages_are_refused_and_huge_ones_close_the_socket() -> None:
    async with running_server(max_message_bytes=1000) as server:
        client = await server.connect()
        await client.create("big", prompt="y" * 1500)
        assert [f["error"]["code"] for f in await client.finished("big")] == ["invalid_message"]
        await client.create("multibyte", prompt="é" * 600)  # 600 characters, 1200 bytes
        assert [f["error"]["code"] for f in await client.finished("multibyte")] == ["invalid_message"]
        await client.create("ok", max_tokens=2)
        assert check_exactly_once(await client.finished("ok"))["status"] == "completed"
        await client.create("huge", prompt="z" * 5000)
        assert await client.closed() == 1009


async def test_connections_past_the_limit_get_503() -> None:
    async with running_server(max_connections=2) as server:
        await server.connect()
        await server.connect()
        with pytest.raises(InvalidStatus) as refused:
            await server.connect()
        assert refused.value.response.status_code == 503


KEY = "s3cret-key_1"


@pytest.mark.parametrize(("headers", "subprotocols", "status"), [
    ({}, ["streampage.v1"], 401),
    ({"Authorization": "Bearer wrong"}, ["streampage.v1"], 401),
    ({}, ["streampage.v1", "bearer.wrong"], 401),
    ({"Authorization": f"Basic {KEY}"}, ["streampage.v1"], 401),
    ({"Authorization": f"Bearer {KEY}"}, ["chat"], 400),
    ({"Authorization": f"Bearer {KEY}", "Origin": "http://evil.example"}, ["streampage.v1"], 403),
])
async def test_handshakes_without_the_key_or_from_other_origins_are_refused(headers, subprotocols, status) -> None:
    async with running_server(api_key=KEY) as server:
        origin = headers.pop("Origin", None)
        with pytest.raises(InvalidStatus) as refused:
            await connect(server.url, subprotocols=subprotocols, additional_headers=headers, origin=origin)
        assert refused.value.response.status_code == status
        assert KEY.encode() not in refused.value.response.body


@pytest.mark.parametrize(("headers", "subprotocols", "origin"), [
    ({"Authorization": f"Bearer {KEY}"}, ["streampage.v1"], None),
    ({}, ["streampage.v1", f"bearer.{KEY}"], None),
    ({}, [f"bearer.{KEY}", "streampage.v1"], "http://app.example"),
    ({}, ["streampage.v1", f"bearer.{KEY}"], "SAME"),
])
async def test_the_key_in_a_header_or_a_subprotocol_lets_clients_in(headers, subprotocols, origin) -> None:
    async with running_server(api_key=KEY, allowed_origins=("http://app.example",)) as server:
        if origin == "SAME":
            origin = f"http://127.0.0.1:{server.port}"
        ws = await connect(server.url, subprotocols=subprotocols, additional_headers=headers, origin=origin)
        assert ws.subprotocol == "streampage.v1"  # never the key
        await ws.send(orjson.dumps({"type": "ping", "event_id": "x"}).decode())
        assert orjson.loads(await ws.recv()) == {"type": "pong", "event_id": "x"}
        await ws.close()


async def test_any_origin_when_the_list_says_star() -> None:
    async with running_server(allowed_origins=("*",)) as server:
        ws = await connect(server.url, subprotocols=["streampage.v1"], origin="http://elsewhere.example")
        await ws.close()


async def test_http_endpoints() -> None:
    async with running_server() as server:
        assert await server.get("/healthz") == (200, b"ok\n")
        assert await server.get("/readyz") == (200, b"ready\n")
        status, page = await server.get("/")
        assert status == 200 and b"<html" in page.lower()
        assert (await server.get("/nothing"))[0] == 404
        status, body = await server.get("/metrics")
        assert status == 200
        for name in ("num_requests_running", "num_requests_waiting", "num_requests_swapped", "kv_cache_usage_perc",
                     "kv_blocks_free", "kv_blocks_total", "kv_blocks_used", "kv_blocks_shared", "kv_blocks_cached",
                     "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total",
                     "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                     "e2e_request_latency_seconds_bucket", "connections"):
            assert f"streampage:{name}".encode() in body, name
        client = await server.connect()
        await client.send(type="response.fly")
        await client.untagged_frame()
        await client.create("bad", temperature=-3)
        await client.finished("bad")
        metrics = await server.metrics()
        assert metrics['streampage:requests_rejected_total{reason="unknown_type"}'] == 1
        assert metrics['streampage:requests_rejected_total{reason="invalid_param"}'] == 1


async def test_not_ready_while_loading() -> None:
    loaded = asyncio.Event()
    listening: asyncio.Future[StreamServer] = asyncio.get_running_loop().create_future()

    async def start_engine(on_status) -> FakeEngine:
        on_status("loading weights 40%")
        await loaded.wait()
        return FakeEngine()

    task = asyncio.create_task(run_server(ServerConfig(port=0), start_engine=start_engine, handle_signals=False,
                                          on_listening=listening.set_result, notifier=Notifier(None)))
    server = await listening
    from server_harness import http_get
    await asyncio.sleep(0.05)
    assert await http_get(server.port, "/healthz") == (200, b"ok\n")
    assert await http_get(server.port, "/readyz") == (503, b"loading: loading weights 40%\n")
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"ws://127.0.0.1:{server.port}/v1/stream", subprotocols=["streampage.v1"])
    assert refused.value.response.status_code == 503
    loaded.set()
    while (await http_get(server.port, "/readyz"))[0] != 200:
        await asyncio.sleep(0.01)
    server.request_stop()
    assert await task == 0


async def test_an_engine_that_fails_to_start_exits_non_zero() -> None:
    async def start_engine(on_status) -> FakeEngine:
        raise RuntimeError("no GPU")

    code = await run_server(ServerConfig(port=0), start_engine=start_engine, handle_signals=False,
                            notifier=Notifier(None))
    assert code == 1

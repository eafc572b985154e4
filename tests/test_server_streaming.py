"""Many streams at once on one socket and across sockets; cancel and disconnect return every block."""

from __future__ import annotations

import asyncio

import orjson
from fake_engine import FakeEngine, token_id, token_text
from server_harness import Harness, check_exactly_once, running_server, streamed_text

from streampage.server.metrics import ServerMetrics, TokenGapHistogram


def expected(prompt: str, count: int) -> str:
    ids = [ord(c) for c in prompt]
    return "".join(token_text(token_id(ids, i)) for i in range(count))


async def blocks_in_use(server: Harness) -> float:
    metrics = await server.metrics()
    assert metrics["streampage:kv_blocks_free"] + metrics["streampage:kv_blocks_used"] == \
        metrics["streampage:kv_blocks_total"]
    return metrics["streampage:kv_blocks_used"]


async def test_many_requests_on_one_socket_interleave_and_all_complete() -> None:
    async with running_server(max_requests_per_connection=64) as server:
        client = await server.connect()
        for i in range(40):
            await client.create(f"r{i}", prompt=f"prompt {i}", max_tokens=5 + i % 7)
        for i in range(40):
            frames = await client.finished(f"r{i}")
            assert check_exactly_once(frames)["status"] == "completed"
            assert streamed_text(frames) == expected(f"prompt {i}", 5 + i % 7)
        first_done = client.frames.index(next(f for f in client.frames if f["type"] == "response.done"))
        assert first_done > 40, "streams interleave: the first done comes after other requests' frames"
        assert await blocks_in_use(server) == 0


async def test_many_sockets_stream_at_once() -> None:
    async with running_server() as server:
        clients = await asyncio.gather(*(server.connect() for _ in range(6)))
        for c, client in enumerate(clients):
            for i in range(5):
                await client.create(f"r{i}", prompt=f"socket {c} request {i}", max_tokens=6)
        for c, client in enumerate(clients):
            for i in range(5):
                frames = await client.finished(f"r{i}")
                assert check_exactly_once(frames)["status"] == "completed"
                assert streamed_text(frames) == expected(f"socket {c} request {i}", 6)
        metrics = await server.metrics()
        assert metrics["streampage:connections"] == 6
        assert metrics['streampage:request_success_total{finish_reason="length"}'] == 30
        assert metrics["streampage:time_to_first_token_seconds_count"] == 30
        assert metrics["streampage:e2e_request_latency_seconds_count"] == 30
        assert metrics["streampage:inter_token_latency_seconds_count"] == 30 * 5


async def test_cancel_mid_stream_returns_every_block() -> None:
    async with running_server(FakeEngine(token_delay=0.01)) as server:
        client = await server.connect()
        for i in range(4):
            await client.create(f"long{i}", max_tokens=500)
        await client.wait_for(lambda: all(len(client.by_request[f"long{i}"]) >= 3 for i in range(4)))
        assert await blocks_in_use(server) > 0
        for i in range(4):
            await client.send(type="response.cancel", request_id=f"long{i}")
        for i in range(4):
            assert check_exactly_once(await client.finished(f"long{i}"))["status"] == "cancelled"
        assert await blocks_in_use(server) == 0
        metrics = await server.metrics()
        assert metrics['streampage:request_success_total{finish_reason="abort"}'] == 4
        assert metrics["streampage:server_live_requests"] == 0


async def test_disconnect_mid_stream_aborts_its_requests_and_spares_the_others() -> None:
    engine = FakeEngine(token_delay=0.01)
    async with running_server(engine) as server:
        leaving, staying = await server.connect(), await server.connect()
        for i in range(3):
            await leaving.create(f"l{i}", max_tokens=500)
        await staying.create("s", max_tokens=40)
        await leaving.wait_for(lambda: all(len(leaving.by_request[f"l{i}"]) >= 2 for i in range(3)))
        leaving.ws.transport.abort()  # the TCP connection just drops
        frames = await staying.finished("s")
        assert check_exactly_once(frames)["status"] == "completed"
        assert streamed_text(frames) == expected("hello", 40)

        async def settled() -> None:
            while (await server.metrics())["streampage:connections"] != 1:
                await asyncio.sleep(0.02)
        await asyncio.wait_for(settled(), 5)
        assert sorted(engine.aborted) == sorted(f"{rid}" for rid in engine.started if ":l" in rid)
        assert len(engine.aborted) == 3
        assert await blocks_in_use(server) == 0
        assert (await server.metrics())["streampage:server_live_requests"] == 0


async def test_stats_endpoint_shows_the_block_pool_while_streaming() -> None:
    async with running_server(FakeEngine(token_delay=0.01)) as server:
        client = await server.connect()
        await client.create("r", max_tokens=300)
        await client.wait_for(lambda: len(client.by_request["r"]) >= 2)
        status, body = await server.get("/v1/stats")
        stats = orjson.loads(body)
        assert status == 200 and stats["phase"] == "serving" and stats["model"] == "fake"
        assert stats["engine"]["kv_blocks_used"] == 20  # ceil((5 + 300) / 16)
        assert stats["engine"]["kv_blocks_free"] == stats["engine"]["kv_blocks_total"] - 20
        assert stats["server"]["server_live_requests"] == 1
        await client.send(type="response.cancel", request_id="r")
        await client.finished("r")


def test_token_gap_histogram_counts_like_prometheus_buckets() -> None:
    histogram = TokenGapHistogram((0.01, 0.1))
    histogram.observe(0.01)  # le is inclusive
    histogram.observe(0.05, times=3)
    histogram.observe(5.0)
    assert histogram.counts == [1, 3, 1]
    assert histogram.sum == 0.01 + 0.15 + 5.0
    text = ServerMetrics().render().decode()
    assert 'streampage:inter_token_latency_seconds_bucket{le="+Inf"} 0.0' in text

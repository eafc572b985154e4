"""Slow readers: a client that stops reading gets merged deltas (gapless seqs, the same text), and past
the buffer limit its requests are cancelled and its socket closed with 1008, while others stream on."""

from __future__ import annotations

import asyncio
import socket

import orjson
from fake_engine import FakeEngine, token_id, token_text
from server_harness import Harness, check_exactly_once, running_server, streamed_text
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streampage.server.outbox import MERGE_LIMIT_BYTES

PROMPT_IDS = [ord(c) for c in "hello"]
# Each token's text is repeated this often (about 5 kB a token), so socket buffers fill in a few hundred
# tokens; the reader's small receive buffer keeps the kernel from hiding the lag.
TEXT_REPEAT = 1000


async def stalled_client(server: Harness) -> ClientConnection:
    """A websockets client that reads nothing until the test calls recv(). Both ends of its TCP
    connection get small kernel buffers, so the lag reaches the server's outbox within kilobytes
    whatever the host's TCP autotuning allows."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    ws = await connect(server.url, sock=sock, subprotocols=["streampage.v1"], max_queue=1)
    local_port = sock.getsockname()[1]
    while not (sessions := [s for s in server.server.sessions if s.ws.remote_address[1] == local_port]):
        await asyncio.sleep(0.01)  # the server registers the session just after the handshake
    sessions[0].ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    return ws


async def read_until_closed(ws: ClientConnection) -> list[dict]:
    frames = []
    try:
        async for message in ws:
            frames.append(orjson.loads(message))
    except ConnectionClosed:
        pass
    return frames


async def read_until_done(ws: ClientConnection, request_id: str) -> list[dict]:
    frames = []
    while not frames or frames[-1]["type"] != "response.done":
        frame = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        if frame.get("request_id") == request_id:
            frames.append(frame)
    return frames


async def wait_for_metric(server: Harness, name: str, value: float, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while (await server.metrics()).get(name) != value:
            await asyncio.sleep(0.02)


async def test_a_lagging_client_gets_merged_deltas_with_gapless_seqs_and_the_same_text() -> None:
    engine = FakeEngine(token_delay=0.001, text_repeat=TEXT_REPEAT)
    max_tokens = 1500
    async with running_server(engine, client_buffer_bytes=64 << 20) as server:
        ws = await stalled_client(server)
        await ws.send(orjson.dumps({"type": "response.create", "request_id": "r", "prompt": "hello",
                                    "max_tokens": max_tokens, "return_token_ids": True}).decode())
        async with asyncio.timeout(30):  # the engine finishes while the client reads nothing
            while not engine.started or engine.live:
                await asyncio.sleep(0.02)
        frames = await read_until_done(ws, "r")
        await ws.close()
    check_exactly_once(frames)
    deltas = frames[1:-1]
    tokens = [token_id(PROMPT_IDS, i) for i in range(max_tokens)]
    assert [t for d in deltas for t in d["token_ids"]] == tokens
    assert streamed_text(frames) == "".join(token_text(t) * TEXT_REPEAT for t in tokens)
    assert len(deltas) < max_tokens, "some deltas were merged"
    assert max(len(d["token_ids"]) for d in deltas) > 1
    assert max(len(orjson.dumps(d)) for d in deltas) < 2 * MERGE_LIMIT_BYTES, "merged frames stay small"
    assert frames[-1]["status"] == "completed"


async def test_past_the_buffer_limit_the_slow_client_is_closed_with_1008_and_others_stream_on() -> None:
    engine = FakeEngine(token_delay=0.001, text_repeat=TEXT_REPEAT)
    async with running_server(engine, client_buffer_bytes=256 << 10) as server:
        slow = await stalled_client(server)
        for i in range(2):
            await slow.send(orjson.dumps({"type": "response.create", "request_id": f"s{i}", "prompt": "hello",
                                          "max_tokens": 2000}).decode())
        fast = await server.connect()
        await fast.create("f", max_tokens=1200)
        await wait_for_metric(server, "streampage:slow_client_disconnects_total", 1)
        slow_frames = await read_until_closed(slow)
        assert slow.close_code == 1008
        assert [f["type"] for f in slow_frames[:1]] == ["response.created"]
        fast_frames = await fast.finished("f")
        assert check_exactly_once(fast_frames)["status"] == "completed"
        assert streamed_text(fast_frames) == "".join(token_text(token_id(PROMPT_IDS, i)) * TEXT_REPEAT
                                                     for i in range(1200))
        slow_ids = [rid for rid in engine.started if ":s" in rid]
        assert sorted(engine.aborted) == sorted(slow_ids)
        await wait_for_metric(server, "streampage:connections", 1)
        metrics = await server.metrics()
        assert metrics["streampage:kv_blocks_used"] == 0
        assert metrics["streampage:server_live_requests"] == 0

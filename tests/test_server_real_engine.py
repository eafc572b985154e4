"""`streampage serve` as a subprocess on the built-in demo model (CPU), with the real engine.

SIGTERM mid-stream must give the documented ending: a request that finishes within --drain-timeout
completes, the rest get `response.done` with status "incomplete" (finish_reason "abort"), the socket
closes with 1001 and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import orjson
import pytest
from server_harness import check_exactly_once, start_serve
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.slow

async def test_sigterm_mid_stream_drains_then_exits_zero(tmp_path: Path) -> None:
    process, port = await start_serve(tmp_path)
    try:
        ws = await connect(f"ws://127.0.0.1:{port}/v1/stream", subprotocols=["streampage.v1"])
        for request_id, max_tokens in (("short", 2), ("long", 3000)):
            await ws.send(orjson.dumps({"type": "response.create", "request_id": request_id, "prompt": "Hello",
                                        "max_tokens": max_tokens, "ignore_eos": True}).decode())
        frames: dict[str, list[dict]] = {"short": [], "long": []}
        while not any(f["type"] == "response.output_text.delta" for f in frames["long"]):
            frame = orjson.loads(await asyncio.wait_for(ws.recv(), 60))
            frames[frame["request_id"]].append(frame)
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                frame = orjson.loads(message)
                frames[frame["request_id"]].append(frame)
        assert ws.close_code == 1001
        assert check_exactly_once(frames["short"])["status"] == "completed"
        done = check_exactly_once(frames["long"])
        assert done["status"] == "incomplete" and done["choices"][0]["finish_reason"] == "abort"
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

"""The browser page in headless Chromium (Debian's package), driven over the DevTools protocol: it
connects with a key, streams a reply, runs a second request at once, cancels it, and draws the pool."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import tempfile
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from fake_engine import FakeEngine, token_id, token_text
from server_harness import running_server
from websockets.asyncio.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# In CI (.ci/run installs it) a missing browser is a failure, not a skip.
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="chromium is not installed (apt-get install chromium)")

KEY = "browser-key"
PROMPT = "Tell me about paged attention."


class DevTools:
    """The few DevTools calls the test needs, on one page target."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.ws.send(orjson.dumps({"id": call_id, "method": method, "params": params}).decode())
        while True:
            reply = orjson.loads(await self.ws.recv())
            if reply.get("id") == call_id:
                assert "error" not in reply, reply
                return reply["result"]

    async def eval(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = 15) -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        async with asyncio.timeout(timeout):
            while not (value := await self.eval(expression)):
                await asyncio.sleep(0.05)
        return value


@asynccontextmanager
async def chromium_page() -> AsyncIterator[DevTools]:
    with tempfile.TemporaryDirectory() as profile:
        process = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            port = await _devtools_port(process)
            targets = await asyncio.to_thread(_json, f"http://127.0.0.1:{port}/json/list")
            page = next(t for t in targets if t["type"] == "page")
            async with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
                yield DevTools(ws)
        finally:
            process.kill()
            await process.wait()


async def _devtools_port(process: asyncio.subprocess.Process) -> int:
    assert process.stderr is not None
    async with asyncio.timeout(60):
        while line := (await process.stderr.readline()).decode():
            if found := re.search(r"DevTools listening on ws://[\d.]+:(\d+)/", line):
                asyncio.get_running_loop().create_task(_drain(process.stderr))
                return int(found.group(1))
    raise AssertionError("chromium did not start its DevTools endpoint")


def _json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return orjson.loads(response.read())


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def test_the_page_streams_a_reply_runs_another_at_once_and_cancels_it() -> None:
    async with asyncio.timeout(120):
        await drive_the_page()


async def drive_the_page() -> None:
    engine = FakeEngine(token_delay=0.02)
    async with running_server(engine, api_key=KEY) as server, chromium_page() as page:
        await page.call("Page.navigate", url=f"http://127.0.0.1:{server.port}/")
        await page.until("document.readyState === 'complete' && !!document.getElementById('connect')")
        await page.eval(f"document.getElementById('key').value = {orjson.dumps(KEY).decode()}")
        await page.eval("document.getElementById('connect').click()")
        await page.until("document.getElementById('status').dataset.state === 'open'")

        await page.eval("document.getElementById('max-tokens').value = '12'; "
                        "document.getElementById('send').click()")
        await page.eval("document.getElementById('max-tokens').value = '2000'; "
                        "document.getElementById('send').click()")
        card = "document.querySelector('.request[data-id=\"{}\"]')"
        await page.until(card.format("r2") + ".dataset.status === 'streaming'")
        await page.until(card.format("r2") + ".querySelector('.text').textContent.length > 20")
        used = await page.until("Number(document.getElementById('pool').dataset.used)")
        assert used > 0, "the pool picture shows the blocks of the running requests"
        await page.eval(card.format("r2") + ".querySelector('.cancel').click()")

        await page.until(card.format("r1") + ".dataset.status === 'completed'")
        await page.until(card.format("r2") + ".dataset.status === 'cancelled'")
        text = await page.eval(card.format("r1") + ".querySelector('.text').textContent")
        prompt = [ord(c) for c in PROMPT]
        assert text == "".join(token_text(token_id(prompt, i)) for i in range(12))
        assert "TTFT" in await page.eval(card.format("r1") + ".querySelector('.ttft').textContent")
        assert "tokens/s" in await page.eval(card.format("r1") + ".querySelector('.rate').textContent")
        await page.until("document.getElementById('pool').dataset.used === '0'")
        assert len(engine.aborted) == 1

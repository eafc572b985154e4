"""Fuzzing the protocol: malformed JSON, wrong types, huge values and unknown fields. Every message is
answered, the server stays up, and a request streaming beside the garbage completes unchanged."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from fake_engine import FakeEngine, token_id, token_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import check_exactly_once, parse_metrics, streamed_text
from websockets.sync.client import ClientConnection, connect

from streampage.sampling_params import SamplingParams
from streampage.server.config import ServerConfig
from streampage.server.lifecycle import run_server
from streampage.server.protocol import ProtocolError, RequestLimits, parse_message
from streampage.server.sd_notify import Notifier
from streampage.server.stream_server import StreamServer

LIMITS = RequestLimits(max_message_bytes=1 << 16, max_output_tokens=64, max_request_timeout=30)
SAMPLING_FIELDS = list(SamplingParams.__dataclass_fields__)

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | \
    st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
field_names = st.sampled_from([*SAMPLING_FIELDS, "prompt", "messages", "prompt_token_ids", "return_token_ids",
                               "timeout_s", "request_id", "event_id"]) | st.text(max_size=12)


@st.composite
def shaped_messages(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-formed envelopes with fuzzed fields: they get past the JSON parser."""
    message: dict[str, Any] = {"type": draw(st.sampled_from(["response.create", "response.cancel", "ping"])
                                            | st.text(max_size=20))}
    if draw(st.booleans()):
        message["request_id"] = draw(st.text(min_size=1, max_size=8) | json_scalars)
    message.update(draw(st.dictionaries(field_names, json_values, max_size=5)))
    return message


huge_values = (st.integers(2**64, 10**400).map(str) | st.just("1e999") | st.just("-1e999")
               | st.integers(1000, 20_000).map(lambda n: orjson.dumps("x" * n).decode()))
huge_fields = st.tuples(field_names, huge_values).map(
    lambda fv: '{"type": "response.create", "request_id": "huge", "prompt": "x", ' + orjson.dumps(fv[0]).decode()
    + ": " + fv[1] + "}")
raw_frames = (st.text(max_size=200) | json_values.map(lambda v: orjson.dumps(v).decode())
              | shaped_messages().map(lambda m: orjson.dumps(m).decode()) | huge_fields)


@given(raw_frames)
@settings(max_examples=400, deadline=None)
def test_parsing_any_frame_gives_a_message_or_a_protocol_error(raw: str) -> None:
    try:
        parse_message(raw, LIMITS)
    except ProtocolError as error:
        assert error.code and str(error)


@pytest.fixture(scope="module")
def server_port() -> Iterator[int]:
    """One server on the fake engine for the whole module, in a thread with its own event loop."""
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> int:
        def listening(server: StreamServer) -> None:
            holder["server"], holder["loop"] = server, asyncio.get_running_loop()
            ready.set()
        config = ServerConfig(port=0, max_output_tokens=64, max_prompt_tokens=256, drain_timeout=1)
        return await run_server(config, engine=FakeEngine(token_delay=0.001), on_listening=listening,
                                handle_signals=False, notifier=Notifier(None))

    thread = threading.Thread(target=lambda: holder.setdefault("exit", asyncio.run(main())), daemon=True)
    thread.start()
    assert ready.wait(30)
    yield holder["server"].port
    holder["loop"].call_soon_threadsafe(holder["server"].request_stop)
    thread.join(30)
    assert holder["exit"] == 0


class SyncClient:
    """A blocking websockets client keeping every frame it has read."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    def send(self, **message: Any) -> None:
        self.ws.send(orjson.dumps(message).decode())

    def read_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self.frames.append(orjson.loads(self.ws.recv(timeout=10)))

    def of(self, request_id: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("request_id") == request_id]

    def ended(self, request_id: str) -> bool:
        return any(f["type"] in ("response.done", "error") for f in self.of(request_id))


def request_id_of(raw: str) -> str | None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    request_id = data.get("request_id") if isinstance(data, dict) else None
    return request_id if isinstance(request_id, str) else None


ids = itertools.count()


@given(batch=st.lists(raw_frames, min_size=1, max_size=4))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_garbage_is_answered_and_harms_no_sibling(server_port: int, batch: list[str]) -> None:
    with connect(f"ws://127.0.0.1:{server_port}/v1/stream", subprotocols=["streampage.v1"]) as ws:
        check_batch(SyncClient(ws), batch)


BARRIER = "\0barrier"  # event ids of the pings that follow each fuzz message


def check_batch(client: SyncClient, batch: list[str]) -> None:
    sibling = f"sibling{next(ids)}"
    client.send(type="response.create", request_id=sibling, prompt="steady", max_tokens=24)
    for i, raw in enumerate(batch):
        client.ws.send(raw)
        client.send(type="ping", event_id=f"{BARRIER}{i}")
    client.read_until(lambda: any(f.get("event_id") == f"{BARRIER}{len(batch) - 1}" for f in client.frames))

    # Answers to a message come before the ping after it, except the frames of a request's own task,
    # which name the request and may come later.
    barriers = [i for i, f in enumerate(client.frames) if f.get("event_id", "").startswith(BARRIER)]
    assert len(barriers) == len(batch)
    for i, raw in enumerate(batch):
        between = client.frames[barriers[i - 1] + 1 if i else 0:barriers[i]]
        request_id = request_id_of(raw)
        answered = any(f["type"] in ("error", "pong") and f.get("request_id") in (None, request_id) for f in between)
        if not answered:
            assert request_id is not None, f"no answer to {raw!r}"
            client.read_until(lambda r=request_id: bool(client.of(r)))

    accepted = {f["request_id"] for f in client.frames if f["type"] == "response.created"} - {sibling}
    for request_id in accepted:
        client.send(type="response.cancel", request_id=request_id)
    for request_id in [*accepted, sibling]:
        client.read_until(lambda r=request_id: client.ended(r) and client.of(r)[-1]["type"] == "response.done")
        check_exactly_once([f for f in client.of(request_id) if f["type"] != "error"])
    sibling_frames = client.of(sibling)
    assert check_exactly_once(sibling_frames)["status"] == "completed"
    prompt = [ord(c) for c in "steady"]
    assert streamed_text(sibling_frames) == "".join(token_text(token_id(prompt, i)) for i in range(24))


def test_after_the_fuzzing_the_server_is_healthy_and_holds_nothing(server_port: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server_port, timeout=10)
    connection.request("GET", "/metrics")
    metrics = parse_metrics(connection.getresponse().read().decode())
    assert metrics["streampage:kv_blocks_used"] == 0
    assert metrics["streampage:server_live_requests"] == 0
    assert metrics["streampage:server_queued_requests"] == 0

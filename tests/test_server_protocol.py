"""streampage.v1 conformance over a real socket: every message type, every error code, the shape of
every server frame (DESIGN.md section 7), against the fake engine."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from fake_engine import VOCAB_SIZE, FakeEngine, token_id, token_text
from server_harness import check_exactly_once, running_server, streamed_text

PROMPT = "hello"
PROMPT_IDS = [ord(c) for c in PROMPT]


def expected_text(prompt_ids: list[int], count: int, choice: int = 0) -> str:
    return "".join(token_text(token_id(prompt_ids, i, choice)) for i in range(count))


async def test_a_request_streams_created_deltas_and_done() -> None:
    async with running_server() as server:
        client = await server.connect()
        await client.create("r1", prompt=PROMPT, max_tokens=5)
        frames = await client.finished("r1")
        done = check_exactly_once(frames)
        assert frames[0] == {"type": "response.created", "request_id": "r1", "prompt_tokens": 5,
                             "cached_tokens": 0}
        assert streamed_text(frames) == expected_text(PROMPT_IDS, 5)
        assert all("token_ids" not in f and "logprobs" not in f for f in frames[1:-1])
        assert done["status"] == "completed"
        assert done["choices"] == [{"index": 0, "finish_reason": "length"}]
        assert done["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "cached_tokens": 0}
        timing = done["timing"]
        assert 0 <= timing["queued_ms"] <= timing["ttft_ms"] <= timing["total_ms"]


async def test_every_prompt_form_and_token_ids_on_request() -> None:
    async with running_server() as server:
        client = await server.connect()
        await client.create("ids", prompt=None, prompt_token_ids=[1, 2, 3], max_tokens=3, return_token_ids=True)
        await client.create("chat", prompt=None, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        ids = await client.finished("ids")
        check_exactly_once(ids)
        assert [t for f in ids[1:-1] for t in f["token_ids"]] == [token_id([1, 2, 3], i) for i in range(3)]
        chat = await client.finished("chat")
        assert check_exactly_once(chat)["status"] == "completed"
        assert chat[0]["prompt_tokens"] == len("user: hi\n")


async def test_parallel_choices_count_seq_per_choice_and_stop_tokens_end_one() -> None:
    stop = token_id(PROMPT_IDS, 2, choice=1)
    async with running_server() as server:
        client = await server.connect()
        await client.create("n2", prompt=PROMPT, n=2, max_tokens=6, stop_token_ids=[stop])
        frames = await client.finished("n2")
        done = check_exactly_once(frames)
        assert streamed_text(frames, 0) == expected_text(PROMPT_IDS, 6, 0)
        assert streamed_text(frames, 1) == expected_text(PROMPT_IDS, 3, 1)
        assert done["choices"] == [{"index": 0, "finish_reason": "length"}, {"index": 1, "finish_reason": "stop"}]
        assert done["usage"]["completion_tokens"] == 9


async def test_logprobs_name_the_chosen_token_and_the_top_alternatives() -> None:
    async with running_server() as server:
        client = await server.connect()
        await client.create("lp", prompt=PROMPT, max_tokens=2, logprobs=1)
        frames = await client.finished("lp")
        check_exactly_once(frames)
        entry = frames[1]["logprobs"][0]
        chosen = token_id(PROMPT_IDS, 0)
        assert entry == {"token_id": chosen, "logprob": -0.5, "top_logprobs": [{"token_id": chosen, "logprob": -0.5}]}


async def test_ping_is_answered_with_pong() -> None:
    async with running_server() as server:
        client = await server.connect()
        await client.send(type="ping", event_id="p1")
        await client.send(type="ping")
        assert await client.untagged_frame(1) == {"type": "pong", "event_id": "p1"}
        assert await client.untagged_frame(2) == {"type": "pong"}


BAD_MESSAGES = [
    ("{not json", "invalid_json", None),
    ("[1, 2]", "invalid_message", None),
    ('{"request_id": "x"}', "invalid_message", "type"),
    ('{"type": 7}', "invalid_message", "type"),
    ('{"type": "response.fly", "request_id": "x"}', "unknown_type", "type"),
    ('{"type": "response.create", "prompt": "hi"}', "invalid_message", "request_id"),
    ('{"type": "response.create", "request_id": 5, "prompt": "hi"}', "invalid_message", "request_id"),
    ('{"type": "response.create", "request_id": "' + "x" * 129 + '", "prompt": "hi"}', "invalid_message", "request_id"),
    ('{"type": "response.cancel"}', "invalid_message", "request_id"),
    ('{"type": "ping", "event_id": 3}', "invalid_param", "event_id"),
    ('{"type": "ping", "colour": "red"}', "invalid_param", "colour"),
]


@pytest.mark.parametrize(("raw", "code", "param"), BAD_MESSAGES)
async def test_malformed_messages_get_one_error_without_request_id(raw: str, code: str, param: str | None) -> None:
    async with running_server() as server:
        client = await server.connect()
        await client.ws.send(raw)
        error = await client.untagged_frame()
        assert error["type"] == "error" and error["error"]["code"] == code
        assert error["error"].get("param") == param
        assert error["error"]["message"]


BAD_CREATES = [
    ({"colour": "red"}, "invalid_param", "colour"),
    ({"temperature": -1}, "invalid_param", "temperature"),
    ({"max_tokens": "many"}, "invalid_param", "max_tokens"),
    ({"max_tokens": 5000}, "invalid_param", "max_tokens"),  # above the server's max_output_tokens
    ({"n": 0}, "invalid_param", "n"),
    ({"stop": 3}, "invalid_param", "stop"),
    ({"seed": 2**64 - 1}, "invalid_param", "seed"),
    ({"return_token_ids": "yes"}, "invalid_param", "return_token_ids"),
    ({"timeout_s": 0}, "invalid_param", "timeout_s"),
    ({"timeout_s": 10_000}, "invalid_param", "timeout_s"),
    ({"prompt": None}, "invalid_param", "prompt"),
    ({"prompt": 12}, "invalid_param", "prompt"),
    ({"prompt": ""}, "invalid_param", "prompt"),
    ({"messages": [{"role": "user", "content": "x"}]}, "invalid_param", "prompt"),  # two prompt forms
    ({"prompt": None, "messages": []}, "invalid_param", "messages"),
    ({"prompt": None, "messages": [{"role": "wizard", "content": "x"}]}, "invalid_param", "messages[0].role"),
    ({"prompt": None, "messages": [{"role": "user"}]}, "invalid_param", "messages[0].content"),
    ({"prompt": None, "messages": [{"role": "user", "content": "x", "mood": 1}]}, "invalid_param",
     "messages[0].mood"),
    ({"prompt": None, "prompt_token_ids": [1, -1]}, "invalid_param", "prompt_token_ids"),
    ({"prompt": None, "prompt_token_ids": [1, True]}, "invalid_param", "prompt_token_ids"),
    ({"prompt": None, "prompt_token_ids": [VOCAB_SIZE]}, "invalid_param", "prompt_token_ids"),  # the engine's
    ({"prompt": "x" * 40}, "prompt_too_long", "prompt"),  # the server's max_prompt_tokens
    ({"prompt": None, "prompt_token_ids": [1] * 30, "max_tokens": 40}, "prompt_too_long", "prompt"),  # engine's
]


@pytest.mark.parametrize(("fields", "code", "param"), BAD_CREATES)
async def test_refused_requests_get_exactly_one_error_naming_them(fields: dict, code: str, param: str) -> None:
    async with running_server(FakeEngine(max_model_len=64), max_prompt_tokens=32, max_output_tokens=4096) as server:
        client = await server.connect()
        await client.create("bad", **fields)
        await client.create("good", max_tokens=2)
        frames = await client.finished("bad")
        assert len(frames) == 1, frames
        error = frames[0]
        assert error["type"] == "error" and error["request_id"] == "bad"
        assert error["error"]["code"] == code and error["error"].get("param") == param, error
        assert check_exactly_once(await client.finished("good"))["status"] == "completed"
        await asyncio.sleep(0.05)
        assert len(client.by_request["bad"]) == 1


async def test_duplicate_live_request_id_is_refused_and_reuse_after_done_is_fine() -> None:
    async with running_server(FakeEngine(token_delay=0.02)) as server:
        client = await server.connect()
        await client.create("r", max_tokens=10)
        await client.wait_for(lambda: len(client.by_request["r"]) >= 1)
        await client.create("r", max_tokens=2)
        await client.wait_for(lambda: any(f["type"] == "error" for f in client.by_request["r"]))
        error = next(f for f in client.by_request["r"] if f["type"] == "error")
        assert error["error"]["code"] == "duplicate_request_id"
        await client.wait_for(lambda: client.by_request["r"][-1]["type"] == "response.done")
        frames = client.by_request["r"]
        assert frames[-1]["status"] == "completed"
        check_exactly_once([f for f in frames if f["type"] != "error"])
        client.by_request["r"].clear()
        await client.create("r", max_tokens=2)
        assert check_exactly_once(await client.finished("r"))["status"] == "completed"


async def test_the_same_request_id_on_two_sockets_is_two_requests() -> None:
    async with running_server() as server:
        first, second = await server.connect(), await server.connect()
        await first.create("same", max_tokens=4)
        await second.create("same", max_tokens=4)
        for client in (first, second):
            assert check_exactly_once(await client.finished("same"))["status"] == "completed"
        assert len(set(server.engine.started)) == 2


async def test_cancel_ends_with_cancelled_and_is_idempotent() -> None:
    async with running_server(FakeEngine(token_delay=0.02)) as server:
        client = await server.connect()
        await client.create("c", max_tokens=1000)
        await client.wait_for(lambda: len(client.by_request["c"]) >= 3)
        await client.send(type="response.cancel", request_id="c")
        await client.send(type="response.cancel", request_id="c")
        done = check_exactly_once(await client.finished("c"))
        assert done["status"] == "cancelled"
        assert done["choices"] == [{"index": 0, "finish_reason": "abort"}]
        assert 0 < done["usage"]["completion_tokens"] < 1000
        await client.send(type="response.cancel", request_id="c")  # after its end: still nothing
        await client.send(type="response.cancel", request_id="never")
        await client.wait_for(lambda: bool(client.by_request.get("never")))
        error = client.by_request["never"][0]
        assert error["type"] == "error" and error["error"]["code"] == "unknown_request_id"
        await asyncio.sleep(0.05)
        assert len(client.by_request["c"]) == len([f for f in client.frames if f.get("request_id") == "c"])
        assert client.by_request["c"][-1]["type"] == "response.done"
        assert server.engine.aborted == [server.engine.started[0]]


async def test_cancel_before_the_engine_accepts_still_gets_created_and_cancelled() -> None:
    engine = FakeEngine(num_blocks=4, block_size=16, token_delay=0.02)
    async with running_server(engine) as server:
        client = await server.connect()
        await client.create("hog", max_tokens=58)  # takes all 4 blocks
        await client.wait_for(lambda: len(client.by_request["hog"]) >= 2)
        await client.create("waiter", max_tokens=8)  # waits for blocks
        await client.send(type="response.cancel", request_id="waiter")
        await client.send(type="response.cancel", request_id="hog")
        waiter = await client.finished("waiter")
        assert check_exactly_once(waiter)["status"] == "cancelled"
        assert check_exactly_once(await client.finished("hog"))["status"] == "cancelled"


async def test_timeout_ends_the_request_as_incomplete() -> None:
    async with running_server(FakeEngine(token_delay=0.02)) as server:
        client = await server.connect()
        await client.create("slow", max_tokens=1000, timeout_s=0.2)
        done = check_exactly_once(await client.finished("slow"))
        assert done["status"] == "incomplete"
        assert done["choices"] == [{"index": 0, "finish_reason": "timeout"}]
        assert done["timing"]["total_ms"] >= 150


class ExplodingEngine(FakeEngine):
    def generate(self, prompt_token_ids, params, request_id):
        if params.max_tokens == 13:
            raise RuntimeError("boom")
        return super().generate(prompt_token_ids, params, request_id)


async def test_an_unexpected_failure_is_an_internal_error_and_harms_nobody_else() -> None:
    async with running_server(ExplodingEngine()) as server:
        client = await server.connect()
        await client.create("boom", max_tokens=13)
        await client.create("fine", max_tokens=3)
        frames = await client.finished("boom")
        assert [f["error"]["code"] for f in frames] == ["internal_error"]
        assert check_exactly_once(await client.finished("fine"))["status"] == "completed"


async def test_a_request_cancelled_as_soon_as_sent_ends_without_waiting_for_blocks() -> None:
    engine = FakeEngine(num_blocks=4, block_size=16, token_delay=0.02)
    async with running_server(engine) as server:
        client = await server.connect()
        await client.create("hog", max_tokens=58)  # holds the whole pool for about a second
        await client.wait_for(lambda: len(client.by_request["hog"]) >= 2)
        await client.ws.send(orjson.dumps({"type": "response.create", "request_id": "w", "prompt": "x",
                                           "max_tokens": 8}).decode())
        await client.send(type="response.cancel", request_id="w")
        assert check_exactly_once(await client.finished("w", timeout=0.5))["status"] == "cancelled"
        assert client.by_request["hog"][-1]["type"] != "response.done", "the hog still runs"
        assert check_exactly_once(await client.finished("hog"))["status"] == "completed"

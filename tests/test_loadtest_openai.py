"""End to end over the OpenAI-compatible API: a scripted in-test SSE server for /v1/completions.

Chunks come TTFT_S after the request, then every ITL_S; a final chunk carries `usage` (as vLLM sends
it with `stream_options.include_usage`), then `data: [DONE]`. Prompts that are too long get HTTP 400.
"""

import argparse
import asyncio
import json
import threading
from contextlib import contextmanager

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402 - only once aiohttp is known to be installed

from loadtest.main import add_arguments, run  # noqa: E402

TTFT_S = 0.05
ITL_S = 0.02
OUTPUT_LEN = 5
MAX_PROMPT = 20
SLACK_S = 0.04
BODIES = web.AppKey("bodies", list)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    request.app[BODIES].append(body)
    if len(body["prompt"]) > MAX_PROMPT:
        return web.json_response({"error": {"message": "prompt too long", "code": 400}}, status=400)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b": keep-alive comment\n\n")
    await asyncio.sleep(TTFT_S)
    # Model "hf-style" ends as HF `transformers serve` does: the finish reason and usage in the last
    # chunk and no [DONE]; model "cut" stops mid-stream.
    style = body.get("model")
    for index in range(body["max_tokens"]):
        if index:
            await asyncio.sleep(ITL_S)
        if style == "cut" and index == 2:
            return response
        await _event(response, {"choices": [{"index": 0, "text": "x", "finish_reason": None}]})
    usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
    if style == "hf-style":
        await _event(response, {"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "usage": usage})
        return response
    await _event(response, {"choices": [], "usage": usage})
    await response.write(b"data: [DONE]\n\n")
    return response


async def models(request: web.Request) -> web.Response:
    return web.json_response({"data": [{"id": "scripted-model"}]})


async def _event(response: web.StreamResponse, data: dict) -> None:
    await response.write(b"data: " + json.dumps(data).encode() + b"\n\n")


@contextmanager
def sse_server():
    """The server on its own thread and event loop, since `run` owns the test thread's loop."""
    app = web.Application()
    app[BODIES] = []
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield app, port
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _args(port, *extra):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--backend", "openai", "--port", str(port), "--no-progress",
                              "--output-len", str(OUTPUT_LEN), *extra])


def test_openai_stream_timings_match_the_script(tmp_path):
    output, plots = tmp_path / "results.json", tmp_path / "plots"
    with sse_server() as (app, port):
        # 12 +- 75% prompt tokens: some prompts exceed MAX_PROMPT and are refused with HTTP 400
        # (the output lengths vary by the same ratio)
        code = run(_args(port, "--input-len", "12", "--range-ratio", "0.75", "--num-prompts", "12",
                         "--request-rate", "100", "--output", str(output), "--plot-dir", str(plots)))
        bodies = app[BODIES]
    assert code == 0
    [result] = json.loads(output.read_text())["runs"]
    summary, records = result["summary"], result["records"]
    too_long = sum(len(body["prompt"]) > MAX_PROMPT for body in bodies)
    assert len(records) == len(bodies) == 12 and 0 < too_long < 12
    assert summary["failures"] == {"http:400": too_long}
    assert summary["completed"] == 12 - too_long
    assert summary["total_output"] == sum(b["max_tokens"] for b in bodies if len(b["prompt"]) <= MAX_PROMPT)
    assert TTFT_S * 1000 <= summary["median_ttft_ms"] <= (TTFT_S + SLACK_S) * 1000
    assert ITL_S * 1000 * 0.8 <= summary["median_itl_ms"] <= (ITL_S + SLACK_S) * 1000
    body = bodies[0]
    assert body["model"] == "scripted-model" and body["stream"] and body["ignore_eos"]
    assert all(isinstance(token, int) for token in body["prompt"])
    assert (plots / "latency.png").exists()


def test_openai_unreachable_server_fails_the_run():
    with sse_server() as (_, port):
        pass
    assert run(_args(port, "--num-prompts", "2")) == 1


def test_openai_prompts_as_text_for_servers_without_token_ids(tmp_path):
    """--prompt-tokenizer sends each prompt as the text its token ids decode to (HF `transformers serve`
    takes only text)."""
    from tokenizers import Tokenizer

    from loadtest.workloads import WorkloadConfig, generate
    from streampage.model.demo import ensure_demo_model

    checkpoint = ensure_demo_model(tmp_path / "demo")
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    with sse_server() as (app, port):
        code = run(_args(port, "--input-len", "6", "--num-prompts", "3", "--request-rate", "inf",
                         "--vocab-limit", "200", "--prompt-tokenizer", str(checkpoint)))
        bodies = app[BODIES]
    assert code == 0 and len(bodies) == 3
    specs = generate(WorkloadConfig(kind="random", input_len=6, output_len=OUTPUT_LEN, vocab_limit=200))
    expected = {tokenizer.decode(next(specs).prompt_token_ids, skip_special_tokens=False) for _ in range(3)}
    assert {body["prompt"] for body in bodies} == expected
    assert all(isinstance(body["prompt"], str) and body["prompt"] for body in bodies)

def test_openai_missing_prompt_tokenizer_is_refused(tmp_path, capsys):
    assert run(_args(1, "--num-prompts", "1", "--prompt-tokenizer", str(tmp_path / "missing"))) == 2
    assert "--prompt-tokenizer" in capsys.readouterr().err
    broken = tmp_path / "tokenizer.json"
    broken.write_text("not a tokenizer")
    assert run(_args(1, "--num-prompts", "1", "--prompt-tokenizer", str(tmp_path))) == 2
    assert "--prompt-tokenizer" in capsys.readouterr().err


def test_openai_stream_without_done_ends_on_its_finish_reason(tmp_path):
    """A stream that closes after a chunk with a finish reason is complete (HF `transformers serve`
    sends no [DONE]); one that closes before any is a disconnect. Without --ignore-eos the payload
    carries no `ignore_eos` (strict servers refuse unknown fields)."""
    results = {}
    with sse_server() as (app, port):
        for style in ("hf-style", "cut"):
            output = tmp_path / f"{style}.json"
            assert run(_args(port, "--model", style, "--input-len", "4", "--num-prompts", "2",
                             "--request-rate", "inf", "--no-ignore-eos", "--output", str(output))) in (0, 1)
            results[style] = json.loads(output.read_text())["runs"][0]["summary"]
        bodies = app[BODIES]
    assert results["hf-style"]["completed"] == 2 and results["hf-style"]["total_output"] == 2 * OUTPUT_LEN
    assert results["cut"]["failures"] == {"disconnect:eof": 2}
    assert all("ignore_eos" not in body for body in bodies)

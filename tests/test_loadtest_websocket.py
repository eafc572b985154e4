"""End to end over streampage.v1: a scripted in-test WebSocket server with timed tokens.

The server answers each request after TTFT_S with its first delta, then one delta every ITL_S; the
second delta merges two tokens. Every REFUSE_EVERY-th request is refused with `too_many_requests`.
Measured TTFT and ITL must match the script, and every request must be accounted for.
"""

import argparse
import asyncio
import itertools
import json
import threading
from contextlib import contextmanager, suppress

import orjson
import pytest
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from loadtest.main import add_arguments, run

TTFT_S = 0.05
ITL_S = 0.02
REFUSE_EVERY = 5
OUTPUT_LEN = 6
# Upper slack for a shared 2-core machine; lower bounds are strict (the client cannot beat the script).
SLACK_S = 0.04


class ScriptedServer:
    def __init__(self) -> None:
        self.received = itertools.count(1)
        self.cancelled = 0

    async def handler(self, ws) -> None:
        streams: dict[str, asyncio.Task] = {}
        try:
            async for message in ws:
                frame = orjson.loads(message)
                request_id = frame["request_id"]
                if frame["type"] == "response.cancel" and request_id in streams:
                    streams[request_id].cancel()
                    self.cancelled += 1
                elif frame["type"] == "response.create":
                    if next(self.received) % REFUSE_EVERY == 0:
                        await _send(ws, type="error", request_id=request_id,
                                    error={"code": "too_many_requests", "message": "cap"})
                        continue
                    streams[request_id] = asyncio.create_task(self.stream(ws, frame))
        except ConnectionClosed:
            pass
        finally:
            for task in streams.values():
                task.cancel()

    async def stream(self, ws, frame) -> None:
        request_id, max_tokens = frame["request_id"], frame["max_tokens"]
        prompt = len(frame["prompt_token_ids"])
        await _send(ws, type="response.created", request_id=request_id, prompt_tokens=prompt, cached_tokens=0)
        sent, seq, status = 0, 0, "completed"
        try:
            await asyncio.sleep(TTFT_S)
            while sent < max_tokens:
                count = 2 if seq == 1 and max_tokens - sent >= 2 else 1
                await _send(ws, type="response.output_text.delta", request_id=request_id, index=0, seq=seq,
                            delta="x" * count, token_ids=[7] * count)
                sent, seq = sent + count, seq + 1
                if sent < max_tokens:
                    await asyncio.sleep(ITL_S)
        except asyncio.CancelledError:
            status = "cancelled"
        await _send(ws, type="response.done", request_id=request_id, status=status,
                    choices=[{"index": 0, "finish_reason": "length" if status == "completed" else "abort"}],
                    usage={"prompt_tokens": prompt, "completion_tokens": sent, "cached_tokens": 0})


async def _send(ws, **frame) -> None:
    with suppress(ConnectionClosed):
        await ws.send(orjson.dumps(frame).decode())


@contextmanager
def scripted_server():
    """The server on its own thread and event loop, since `run` owns the test thread's loop."""
    server = ScriptedServer()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = loop.create_future()

    async def main():
        async with serve(server.handler, "127.0.0.1", 0, subprotocols=["streampage.v1"]) as ws_server:
            server.port = ws_server.sockets[0].getsockname()[1]
            ready.set()
            await stop

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(10)
        loop.close()


def _args(port, *extra):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--port", str(port), "--no-progress", "--output-len", str(OUTPUT_LEN),
                              "--input-len", "16", "--workload", "fixed", *extra])


@pytest.fixture(scope="module")
def server():
    with scripted_server() as running:
        yield running


@pytest.mark.parametrize("connections", ["0", "2"])
def test_measured_timings_match_the_script(server, tmp_path, connections):
    output, plots = tmp_path / "results.json", tmp_path / "plots"
    code = run(_args(server.port, "--num-prompts", "10", "--max-concurrency", "4", "--connections", connections,
                     "--percentiles", "50,90", "--goodput", "ttft:1000", "--output", str(output),
                     "--plot-dir", str(plots)))
    assert code == 0
    data = json.loads(output.read_text())
    [result] = data["runs"]
    summary, records = result["summary"], result["records"]
    assert len(records) == 10 and summary["completed"] + summary["failed"] == 10
    assert summary["failures"] == {"error:too_many_requests": 10 // REFUSE_EVERY}
    assert summary["total_output"] == summary["completed"] * OUTPUT_LEN
    assert TTFT_S * 1000 <= summary["median_ttft_ms"] <= (TTFT_S + SLACK_S) * 1000
    assert ITL_S * 1000 * 0.8 <= summary["median_itl_ms"] <= (ITL_S + SLACK_S) * 1000
    # 6 tokens in 5 chunks: TPOT = (E2EL - TTFT) / 5 = 4 gaps / 5
    assert summary["median_tpot_ms"] == pytest.approx(ITL_S * 1000 * 4 / 5, abs=SLACK_S * 1000)
    assert summary["mean_tokens_per_chunk"] == pytest.approx(6 / 5)
    assert summary["request_goodput"] is not None and summary["seq_gaps"] == 0
    assert summary["peak_concurrency"] <= 4
    assert summary["mean_loop_lag_ms"] is not None
    assert data["settings"]["backend"]["api_key"] is False
    assert all((plots / name).stat().st_size > 0
               for name in ("latency.png", "throughput.png", "normalized_latency.png"))


def test_rate_sweep_gives_one_point_per_rate(server, tmp_path, capsys):
    output = tmp_path / "sweep.json"
    code = run(_args(server.port, "--num-prompts", "4", "--request-rate", "40,inf", "--output", str(output)))
    assert code == 0
    runs = json.loads(output.read_text())["runs"]
    assert [r["point"]["request_rate"] for r in runs] == [40.0, "inf"]
    assert all(len(r["records"]) == 4 for r in runs)
    assert "rate=inf" in capsys.readouterr().out


def test_duration_bounds_an_unbounded_count(server, tmp_path):
    output = tmp_path / "duration.json"
    code = run(_args(server.port, "--num-prompts", "0", "--duration", "0.3", "--request-rate", "30",
                     "--output", str(output)))
    assert code == 0
    [result] = json.loads(output.read_text())["runs"]
    assert 3 <= len(result["records"]) <= 20
    assert all(r["scheduled_at"] <= 0.3 + 1e-6 and r["done_at"] is not None for r in result["records"])


@pytest.mark.parametrize(("scenario", "outcome"), [
    ("cancel-storm", "status:cancelled"),
    ("reconnect-churn", "client_abort"),
    ("slow-readers", "ok"),
    ("multiplex", None),
])
def test_scenarios_compare_measured_clients_against_a_baseline(server, tmp_path, scenario, outcome):
    output, plots = tmp_path / "scenario.json", tmp_path / "plots"
    code = run(_args(server.port, "--scenario", scenario, "--num-prompts", "8", "--max-concurrency", "4",
                     "--disturbers", "2", "--disturb-after", "2", "--slow-pause", "0.05",
                     "--output", str(output), "--plot-dir", str(plots)))
    assert code == 0
    data = json.loads(output.read_text())
    baseline, disturbed = data["runs"]
    assert baseline["label"] == "baseline" and disturbed["label"] == scenario
    assert baseline["summary"]["disturbers"] == {}
    if outcome is not None:
        assert outcome in disturbed["summary"]["disturbers"]
    row = data["comparison"]["p99_ttft_ms"]
    assert row["ratio"] == pytest.approx(row["disturbed"] / row["baseline"])
    assert (plots / f"scenario_{scenario}.png").exists()


def test_unreachable_server_fails_the_run(tmp_path):
    with scripted_server() as gone:
        port = gone.port
    assert run(_args(port, "--num-prompts", "2", "--connections", "1")) == 1
    output = tmp_path / "refused.json"
    assert run(_args(port, "--num-prompts", "2", "--output", str(output))) == 1
    [result] = json.loads(output.read_text())["runs"]
    assert result["summary"]["failures"] == {"connect:ConnectionRefusedError": 2}


@pytest.mark.parametrize("extra", [["--host", "192.0.2.1"], ["--request-rate", "1,2", "--max-concurrency", "1,2"],
                                   ["--num-prompts", "0"], ["--goodput", "ttft"],
                                   ["--scenario", "cancel-storm", "--request-rate", "1,2"]])
def test_invalid_settings_are_refused(extra):
    assert run(_args(1, *extra)) == 2

"""Metrics on a hand-computed case: known send and receive times give exact numbers."""

import pytest

from loadtest.metrics import SLO, describe, peak_concurrency, percentile_key, summarize
from loadtest.records import DISTURBER, RequestRecord


def _record(request_id, scheduled, chunks, *, usage=None, prompt=10, sent=None, done=None, error=None,
            role="client"):
    record = RequestRecord(request_id, prompt, 8, scheduled, role=role)
    record.sent_at = scheduled if sent is None else sent
    for at, tokens in chunks:
        record.add_chunk(at, tokens)
    record.usage_output_tokens = usage
    record.finish(done if done is not None else (chunks[-1][0] if chunks else scheduled), error)
    return record


@pytest.fixture
def records():
    return [
        # TTFT 100 ms, E2EL 250 ms, 4 tokens in 3 chunks (the last one merged): TPOT 50 ms, ITLs 50, 100 ms
        _record("a", 0.0, [(0.1, 1), (0.15, 1), (0.25, 2)], usage=4, done=0.3),
        # one token: TTFT = E2EL = 200 ms, no TPOT, no ITL
        _record("b", 1.0, [(1.2, 1)], usage=1, prompt=20, done=1.25),
        _record("c", 0.2, [], done=0.6, error="error:server_overloaded"),  # in flight beside a
        _record("d", 0.0, [(0.1, 1)], done=0.2, error="status:cancelled", role=DISTURBER),
    ]


def test_summary_matches_hand_computation(records):
    s = summarize(records, duration_s=2.0, percentiles=[50, 99], slo=SLO(), client_cpu_s=0.5)
    assert (s["requests"], s["completed"], s["failed"]) == (3, 2, 1)
    assert (s["total_input"], s["total_output"]) == (30, 5)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(2.5)
    assert s["total_token_throughput"] == pytest.approx(17.5)
    assert s["request_goodput"] is None
    expected = {
        "ttft": (150.0, 150.0, 50.0, 150.0, 199.0),
        "tpot": (50.0, 50.0, 0.0, 50.0, 50.0),
        "itl": (75.0, 75.0, 25.0, 75.0, 99.5),
        "e2el": (225.0, 225.0, 25.0, 225.0, 249.5),
    }
    for name, (mean, median, std, p50, p99) in expected.items():
        got = [s[f"{stat}_{name}_ms"] for stat in ("mean", "median", "std", "p50", "p99")]
        assert got == pytest.approx([mean, median, std, p50, p99]), name
    assert s["mean_normalized_latency_ms"] == pytest.approx((250 / 4 + 200 / 1) / 2)
    assert s["mean_tokens_per_chunk"] == pytest.approx(5 / 4)
    assert s["failures"] == {"error:server_overloaded": 1}
    assert s["disturbers"] == {"status:cancelled": 1}
    assert s["disturber_tokens_per_chunk"] == pytest.approx(1.0)
    assert s["peak_concurrency"] == 2
    assert s["mean_send_delay_ms"] == pytest.approx(0.0)
    assert s["client_cpu_busy"] == pytest.approx(0.25)


@pytest.mark.parametrize(("slo", "goodput"), [
    (SLO(ttft_ms=150), 0.5),           # b's TTFT of 200 ms misses
    (SLO(tpot_ms=40), 0.5),            # a's TPOT of 50 ms misses; b has one token: TPOT counts as 0
    (SLO(e2el_ms=250), 1.0),           # limits are inclusive
    (SLO(ttft_ms=200, tpot_ms=50, e2el_ms=249), 0.5),
])
def test_goodput_counts_requests_within_every_slo(records, slo, goodput):
    assert summarize(records, 2.0, [99], slo)["request_goodput"] == pytest.approx(goodput)


def test_record_counts_stream_tokens_without_usage():
    record = _record("a", 0.0, [(0.1, 1), (0.2, 3)])
    assert record.output_tokens == 4
    assert record.tpot == pytest.approx((0.2 - 0.1) / 3)


def test_record_without_tokens_fails_and_first_error_wins():
    empty = _record("a", 0.0, [])
    assert empty.error == "no_tokens" and not empty.succeeded
    timed_out = _record("b", 0.0, [(0.1, 1)], error="timeout")
    timed_out.finish(5.0, "disconnect:1006")
    assert timed_out.error == "timeout" and timed_out.done_at == pytest.approx(0.1)


def test_empty_samples_and_percentile_names():
    assert describe("ttft", [], [99]) == {"mean_ttft_ms": None, "median_ttft_ms": None,
                                          "std_ttft_ms": None, "p99_ttft_ms": None}
    assert percentile_key(99) == "p99" and percentile_key(99.9) == "p99.9"
    assert peak_concurrency([]) == 0


def test_records_serialize_relative_to_the_run_start(records):
    data = records[0].to_json(origin=0.05)
    assert data["scheduled_at"] == pytest.approx(-0.05)
    assert data["chunk_times"] == pytest.approx([0.05, 0.1, 0.2])
    assert data["success"] and data["output_tokens"] == 4

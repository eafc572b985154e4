"""The summary of one load point, with the names and definitions of `vllm bench serve`.

Per successful request (times from when it was due to be sent, see records.py):
  TTFT  first token chunk - scheduled time
  E2EL  last token chunk - scheduled time
  TPOT  (E2EL - TTFT) / (output tokens - 1), for requests with more than one output token
  ITL   every gap between consecutive token chunks, pooled over all requests; a chunk that carries
        several tokens (a merged delta) is one gap, as vLLM counts it
  normalized latency (the vLLM paper's)  E2EL / output tokens, averaged over requests
Throughputs divide by the point's duration (first scheduled send to last request finished). Goodput
counts the successful requests within every given SLO (a request with one output token has TPOT 0
for this test, as in vLLM). Percentiles interpolate linearly between samples (numpy's default).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.records import CLIENT, RequestRecord

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass(frozen=True)
class SLO:
    """Service-level objectives for goodput, in milliseconds (None: not checked)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2el_ms is None

    def met_by(self, record: RequestRecord) -> bool:
        tpot = record.tpot or 0.0
        checks = ((self.ttft_ms, record.ttft), (self.tpot_ms, tpot), (self.e2el_ms, record.e2el))
        return all(limit is None or value * 1000 <= limit for limit, value in checks)


def percentile_key(p: float) -> str:
    """`p99`, `p99.9`: the key vLLM uses in its JSON."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def describe(name: str, samples_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float | None]:
    """mean / median / std / chosen percentiles of samples given in seconds, reported in ms."""
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms"]
    keys += [f"{percentile_key(p)}_{name}_ms" for p in percentiles]
    if len(samples_s) == 0:
        return dict.fromkeys(keys)
    ms = np.asarray(samples_s, dtype=float) * 1000
    values = [ms.mean(), np.median(ms), ms.std(), *np.percentile(ms, list(percentiles))]
    return {key: float(value) for key, value in zip(keys, values, strict=True)}


def summarize(records: Sequence[RequestRecord], duration_s: float, percentiles: Sequence[float],
              slo: SLO, loop_lags: Sequence[float] = (), client_cpu_s: float | None = None) -> dict[str, Any]:
    """The summary over the measured (`client`) records; disturbers only appear in `disturbers`.

    `loop_lags` (seconds the client's event loop woke late) and `client_cpu_s` (CPU seconds the client
    process spent) tell whether the client kept up."""
    clients = [r for r in records if r.role == CLIENT]
    ok = [r for r in clients if r.succeeded]
    total_input = sum(r.input_tokens for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    good = sum(slo.met_by(r) for r in ok)
    summary: dict[str, Any] = {
        "duration_s": duration_s,
        "requests": len(clients),
        "completed": len(ok),
        "failed": len(clients) - len(ok),
        "total_input": total_input,
        "total_output": total_output,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": None if slo.empty else good / duration_s,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    for name, samples in _latency_samples(ok).items():
        summary |= describe(name, samples, percentiles)
    summary |= _extras(clients, ok, percentiles)
    summary |= describe("loop_lag", loop_lags, percentiles)
    summary["client_cpu_busy"] = None if client_cpu_s is None else client_cpu_s / duration_s
    disturbers = [r for r in records if r.role != CLIENT]
    summary["disturbers"] = outcomes(disturbers)
    summary["disturber_tokens_per_chunk"] = tokens_per_chunk(disturbers)
    return summary


def _latency_samples(ok: Sequence[RequestRecord]) -> dict[str, list[float]]:
    return {
        "ttft": [r.ttft for r in ok],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [gap for r in ok for gap in r.itls],
        "e2el": [r.e2el for r in ok],
    }


def _extras(clients: Sequence[RequestRecord], ok: Sequence[RequestRecord],
            percentiles: Sequence[float]) -> dict[str, Any]:
    """What vLLM does not report but a WebSocket deployment needs to see."""
    normalized = [r.e2el / r.output_tokens for r in ok if r.output_tokens > 0]
    send_delays = [r.sent_at - r.scheduled_at for r in clients if r.sent_at is not None]
    return {
        "mean_normalized_latency_ms": float(np.mean(normalized)) * 1000 if normalized else None,
        **describe("send_delay", send_delays, percentiles),
        "mean_tokens_per_chunk": tokens_per_chunk(ok),
        "peak_concurrency": peak_concurrency(clients),
        "seq_gaps": sum(r.seq_gaps for r in clients),
        "failures": dict(Counter(r.error or "unfinished" for r in clients if not r.succeeded)),
    }


def tokens_per_chunk(records: Sequence[RequestRecord]) -> float | None:
    """Tokens per delivered chunk: above 1 when the server merged deltas (a slow reader's, say)."""
    chunks = sum(len(r.chunk_times) for r in records)
    return sum(sum(r.chunk_tokens) for r in records) / chunks if chunks else None


def outcomes(records: Sequence[RequestRecord]) -> dict[str, int]:
    """How requests ended: `ok` or their error, with counts."""
    return dict(Counter("ok" if r.succeeded else (r.error or "unfinished") for r in records))


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """Most requests in flight at once, from send to finish (ends sort before starts at a tie)."""
    events = [(r.sent_at, 1) for r in records if r.sent_at is not None and r.done_at is not None]
    events += [(r.done_at, -1) for r in records if r.sent_at is not None and r.done_at is not None]
    level = peak = 0
    for _, step in sorted(events):
        level += step
        peak = max(peak, level)
    return peak

"""Results for people and programs: console tables and the JSON file."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from loadtest.driver import LoadPoint, PointResult
from loadtest.metrics import LATENCY_METRICS, percentile_key

TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
          "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
WIDTH = 56
# A client whose event loop wakes this late stamps every chunk late by as much: say so.
LOOP_LAG_WARNING_MS = 5.0
CLIENT_BUSY_WARNING = 0.8   # of one core: past it the client's single loop is close to capping the rate


def format_point(label: str, summary: dict[str, Any], percentiles: Sequence[float]) -> str:
    """The block `vllm bench serve` prints, plus the WebSocket-specific lines."""
    failures = ", ".join(f"{reason} {count}" for reason, count in summary["failures"].items())
    lines = [f" {label} ".center(WIDTH, "="),
             _line("Successful requests", summary["completed"]),
             _line("Failed requests", summary["failed"]) + (f"  ({failures})" if failures else ""),
             _line("Benchmark duration (s)", summary["duration_s"]),
             _line("Total input tokens", summary["total_input"]),
             _line("Total generated tokens", summary["total_output"]),
             _line("Request throughput (req/s)", summary["request_throughput"])]
    if summary["request_goodput"] is not None:
        lines.append(_line("Request goodput (req/s)", summary["request_goodput"]))
    lines += [_line("Output token throughput (tok/s)", summary["output_throughput"]),
              _line("Total token throughput (tok/s)", summary["total_token_throughput"]),
              _line("Peak concurrency", summary["peak_concurrency"])]
    for metric in LATENCY_METRICS:
        lines.append(f" {TITLES[metric]} ".center(WIDTH, "-"))
        name = metric.upper()
        lines += [_line(f"Mean {name} (ms)", summary[f"mean_{metric}_ms"]),
                  _line(f"Median {name} (ms)", summary[f"median_{metric}_ms"])]
        lines += [_line(f"P{percentile_key(p)[1:]} {name} (ms)", summary[f"{percentile_key(p)}_{metric}_ms"])
                  for p in percentiles]
    lines += [" Client side ".center(WIDTH, "-"),
              _line("Normalized latency (ms/token)", summary["mean_normalized_latency_ms"]),
              _line("Mean send delay (ms)", summary["mean_send_delay_ms"]),
              _line("Mean tokens per chunk", summary["mean_tokens_per_chunk"]),
              _line("Sequence gaps", summary["seq_gaps"]),
              _line("Mean client loop lag (ms)", summary["mean_loop_lag_ms"]),
              _line("Client CPU busy (cores)", summary["client_cpu_busy"])]
    if ((summary["mean_loop_lag_ms"] or 0.0) > LOOP_LAG_WARNING_MS
            or (summary["client_cpu_busy"] or 0.0) > CLIENT_BUSY_WARNING):
        lines.append("warning: the client's event loop ran late or near a full core; its timings are "
                     "inflated (split the load over several loadtest processes)")
    if summary["disturbers"]:
        lines += [f"Disturber outcomes: {_counts(summary['disturbers'])}",
                  _line("Disturber tokens per chunk", summary["disturber_tokens_per_chunk"])]
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def format_sweep(results: Sequence[tuple[str, dict[str, Any]]], percentiles: Sequence[float]) -> str:
    """One row per load point: throughput and the median and highest chosen percentile of each latency."""
    top = percentile_key(max(percentiles)) if percentiles else "median"
    columns = [("ok", "completed"), ("fail", "failed"), ("req/s", "request_throughput"),
               ("good/s", "request_goodput"), ("out tok/s", "output_throughput")]
    for metric in LATENCY_METRICS:
        columns += [(f"{metric} p50", f"median_{metric}_ms"), (f"{metric} {top}", f"{top}_{metric}_ms")]
    header = f"{'point':<28}" + "".join(f"{title:>11}" for title, _ in columns)
    rows = [f"{label:<28}" + "".join(f"{_number(summary[key]):>11}" for _, key in columns)
            for label, summary in results]
    return "\n".join([header, *rows]) + "\n(latencies in ms)"


def format_comparison(name: str, table: dict[str, dict[str, float | None]]) -> str:
    """The scenario's effect on the measured clients: baseline, disturbed, and their ratio."""
    lines = [f" scenario {name}: measured clients ".center(WIDTH, "="),
             f"{'statistic':<22}{'baseline':>11}{'disturbed':>11}{'ratio':>11}"]
    lines += [f"{key:<22}" + "".join(f"{_number(row[col]):>11}" for col in ("baseline", "disturbed", "ratio"))
              for key, row in table.items()]
    return "\n".join(lines)


def point_json(point: LoadPoint) -> dict[str, Any]:
    """The load point as JSON (an infinite rate is written "inf": JSON has no infinity)."""
    data = asdict(point)
    data["request_rate"] = "inf" if math.isinf(point.request_rate) else point.request_rate
    return data


def result_json(result: PointResult, summary: dict[str, Any]) -> dict[str, Any]:
    return {"point": point_json(result.point), "summary": summary,
            "records": [r.to_json(result.started_at) for r in result.records]}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


def _line(label: str, value: Any) -> str:
    return f"{label + ':':<40}{_number(value):>16}"


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {value}" for key, value in counts.items())

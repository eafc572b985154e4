"""PNG plots of a run.

Figures are built with matplotlib's object API (no pyplot): they render with Agg, need no display,
and leave no global figure state behind in a process that runs several load tests.

Sweeps put load points on the x axis as categories, in the order given, so an infinite rate can sit
at the right end; a single point gives one marker per series.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from loadtest.metrics import LATENCY_METRICS, percentile_key
from loadtest.report import TITLES

Summaries = Sequence[tuple[str, dict[str, Any]]]


def plot_sweep(points: Summaries, axis: str, percentiles: Sequence[float], out_dir: Path) -> list[Path]:
    """Latency percentiles, throughput and normalized latency against the swept `axis`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [label for label, _ in points]
    return [_latency(points, labels, axis, percentiles, out_dir / "latency.png"),
            _throughput(points, labels, axis, out_dir / "throughput.png"),
            _normalized(points, labels, axis, out_dir / "normalized_latency.png")]


def plot_comparison(name: str, table: dict[str, dict[str, float | None]], out_dir: Path) -> Path:
    """Bars of each measured-client statistic, baseline beside disturbed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(16, 4))
    axes = fig.subplots(1, len(LATENCY_METRICS))
    for ax, metric in zip(axes, LATENCY_METRICS, strict=True):
        rows = {k.split("_")[0]: v for k, v in table.items() if k.endswith(f"_{metric}_ms")}
        positions = range(len(rows))
        for shift, column in ((-0.2, "baseline"), (0.2, "disturbed")):
            values = [_value(row[column]) for row in rows.values()]
            ax.bar([p + shift for p in positions], values, width=0.4, label=column)
        ax.set_xticks(list(positions), list(rows))
        ax.set_title(f"{metric.upper()} (ms)")
    axes[0].legend()
    fig.suptitle(f"scenario {name}: measured clients")
    return _save(fig, out_dir / f"scenario_{name}.png")


def _latency(points: Summaries, labels: list[str], axis: str, percentiles: Sequence[float],
             path: Path) -> Path:
    # The median is drawn once even when p50 was asked for.
    stats = ["mean", "median", *(percentile_key(p) for p in percentiles if p != 50)]
    fig = Figure(figsize=(12, 8))
    axes = fig.subplots(2, 2)
    for ax, metric in zip(axes.flat, LATENCY_METRICS, strict=True):
        for stat in stats:
            ax.plot(labels, [_value(s[f"{stat}_{metric}_ms"]) for _, s in points], marker="o", label=stat)
        ax.set_title(TITLES[metric])
        ax.set_xlabel(axis)
        ax.set_ylabel("ms")
        ax.legend()
    return _save(fig, path)


def _throughput(points: Summaries, labels: list[str], axis: str, path: Path) -> Path:
    fig = Figure(figsize=(12, 4))
    requests, tokens = fig.subplots(1, 2)
    requests.plot(labels, [s["request_throughput"] for _, s in points], marker="o", label="completed")
    if any(s["request_goodput"] is not None for _, s in points):
        requests.plot(labels, [_value(s["request_goodput"]) for _, s in points], marker="o", label="goodput")
    requests.set(title="Requests per second", xlabel=axis, ylabel="req/s")
    requests.legend()
    tokens.plot(labels, [s["output_throughput"] for _, s in points], marker="o", label="output")
    tokens.plot(labels, [s["total_token_throughput"] for _, s in points], marker="o", label="input + output")
    tokens.set(title="Tokens per second", xlabel=axis, ylabel="tok/s")
    tokens.legend()
    return _save(fig, path)


def _normalized(points: Summaries, labels: list[str], axis: str, path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(labels, [_value(s["mean_normalized_latency_ms"]) for _, s in points], marker="o")
    ax.set(title="Normalized latency (vLLM paper)", xlabel=axis, ylabel="ms per output token")
    return _save(fig, path)


def _value(value: float | None) -> float:
    return float("nan") if value is None else value


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path

"""`streampage loadtest`: measure what a running server sustains. Options: docs/loadtest.md."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from loadtest.backends import BACKENDS, BackendUnavailable
from loadtest.driver import PointResult, measure_point
from loadtest.metrics import summarize
from loadtest.plots import plot_comparison, plot_sweep
from loadtest.report import format_comparison, format_point, format_sweep, result_json, write_json
from loadtest.scenarios import SCENARIOS, compare, run_scenario
from loadtest.settings import (
    Settings,
    SettingsError,
    parse_concurrencies,
    parse_percentiles,
    parse_rates,
    settings_from_args,
)
from loadtest.workloads import WORKLOADS

T = TypeVar("T")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--backend", choices=BACKENDS, default="streampage",
                        help="streampage: streampage.v1 over WebSocket; openai: /v1/completions over SSE")
    target.add_argument("--host", default="127.0.0.1")
    target.add_argument("--port", type=int, default=8000)
    target.add_argument("--endpoint", default=None, help="path (default: /v1/stream or /v1/completions)")
    target.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    target.add_argument("--allow-remote", action="store_true", help="allow a host that is not loopback")
    target.add_argument("--model", default=None, help="openai: model name (default: first of /v1/models)")
    target.add_argument("--prompt-tokenizer", default=None, metavar="PATH",
                        help="openai: send prompts as text decoded with this tokenizer (a tokenizer.json or "
                             "a checkpoint directory), for servers that take no token ids")
    target.add_argument("--connections", type=int, default=0,
                        help="WebSocket: 0 = one socket per request; N = multiplex over N shared sockets")
    target.add_argument("--ws-compression", action="store_true", help="offer permessage-deflate")

    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=parse_rates, default=[float("inf")],
                      help="requests/s, or a comma list to sweep (e.g. 1,2,4,inf); inf = all at once")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of arrival gaps: 1 = Poisson, <1 burstier, >1 smoother")
    load.add_argument("--max-concurrency", type=parse_concurrencies, default=None,
                      help="cap on requests in flight, or a comma list to sweep (e.g. 1,8,64,256)")
    load.add_argument("--num-prompts", type=int, default=1000, help="requests per load point (0: unbounded)")
    load.add_argument("--duration", type=float, default=None, help="seconds per load point to send requests")
    load.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request fails")

    workload = parser.add_argument_group("workload")
    workload.add_argument("--workload", choices=WORKLOADS, default="random")
    workload.add_argument("--input-len", type=int, default=128, help="prompt tokens (prefix: suffix tokens)")
    workload.add_argument("--output-len", type=int, default=128, help="output tokens (max_tokens)")
    workload.add_argument("--range-ratio", type=float, default=0.0,
                          help="lengths uniform in [len*(1-r), len*(1+r)]")
    workload.add_argument("--prefix-len", type=int, default=0, help="prefix: tokens of each shared prefix")
    workload.add_argument("--num-prefixes", type=int, default=1, help="prefix: how many shared prefixes")
    workload.add_argument("--vocab-limit", type=int, default=1000, help="prompt token ids are below this")
    workload.add_argument("--seed", type=int, default=0)
    workload.add_argument("--token-salt", type=int, default=0,
                          help="with the point's index, seeds its prompt token ids (lengths are not): give a "
                               "warm-up run another salt, so the measured prompts are new to a prefix cache")
    workload.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                          help="generate exactly max_tokens")
    workload.add_argument("--temperature", type=float, default=0.0)

    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--percentiles", type=parse_percentiles, default=[99.0],
                         help="percentiles reported besides mean and median (e.g. 50,90,99)")
    metrics.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                         help="SLOs for goodput: ttft:MS tpot:MS e2el:MS")

    scenario = parser.add_argument_group("WebSocket scenarios")
    scenario.add_argument("--scenario", choices=SCENARIOS, default=None,
                          help="baseline vs disturbed run; reports the measured clients' latency change")
    scenario.add_argument("--disturbers", type=int, default=8, help="misbehaving clients in the disturbed run")
    scenario.add_argument("--disturb-after", type=int, default=4, help="tokens a disturber reads first")
    scenario.add_argument("--slow-pause", type=float, default=2.0, help="seconds a slow reader stops reading")

    output = parser.add_argument_group("output")
    output.add_argument("--output", type=Path, default=None, help="JSON file: settings, summaries, records")
    output.add_argument("--plot-dir", type=Path, default=None, help="directory for PNG plots")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """0 when every load point completed requests; 1 when one completed none or could not start."""
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    try:
        if settings.scenario is not None:
            return _scenario(settings)
        return _sweep(settings)
    except BackendUnavailable as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 1


def _sweep(settings: Settings) -> int:
    async def measure_all() -> list[PointResult]:
        return [await measure_point(settings.backend, point, settings.workload, point_index=index,
                                    request_timeout=settings.request_timeout, progress=settings.progress)
                for index, point in enumerate(settings.points)]
    results = _run_loop(measure_all)
    runs = [(r.point.label, r) for r in results]
    summaries = _report(settings, runs)
    if len(summaries) > 1:
        print(format_sweep(summaries, settings.percentiles))
    _write(settings, runs, summaries, {})
    return _exit_code(summaries)


def _scenario(settings: Settings) -> int:
    assert settings.scenario is not None
    scenario = settings.scenario
    result = _run_loop(lambda: run_scenario(scenario, settings.backend, settings.points[0], settings.workload,
                                            request_timeout=settings.request_timeout,
                                            progress=settings.progress))
    runs = [("baseline", result.baseline), (f"{scenario.name}", result.disturbed)]
    summaries = _report(settings, runs)
    table = compare(summaries[0][1], summaries[1][1], settings.percentiles)
    print(format_comparison(scenario.name, table))
    _write(settings, runs, summaries, table)
    if settings.plot_dir is not None:
        plot_comparison(scenario.name, table, settings.plot_dir)
    return _exit_code(summaries)


def _report(settings: Settings, runs: list[tuple[str, PointResult]]) -> list[tuple[str, dict[str, Any]]]:
    summaries = [(label, summarize(r.records, r.duration_s, settings.percentiles, settings.slo, r.loop_lags,
                                   r.cpu_s)) for label, r in runs]
    for label, summary in summaries:
        print(format_point(label, summary, settings.percentiles))
    return summaries


def _write(settings: Settings, runs: list[tuple[str, PointResult]], summaries: list[tuple[str, dict[str, Any]]],
           comparison: dict[str, Any]) -> None:
    if settings.output is not None:
        data = {"settings": settings.to_json(),
                "runs": [{"label": label} | result_json(r, summary)
                         for (label, r), (_, summary) in zip(runs, summaries, strict=True)]}
        if comparison:
            data["comparison"] = comparison
        write_json(settings.output, data)
    if settings.plot_dir is not None:
        axis = "run" if settings.scenario else settings.sweep_axis
        ticks = [(_tick(settings, label, r), summary) for (label, r), (_, summary) in zip(runs, summaries,
                                                                                          strict=True)]
        plot_sweep(ticks, axis, settings.percentiles, settings.plot_dir)


def _tick(settings: Settings, label: str, result: PointResult) -> str:
    """A plot's x tick: the swept value alone (the axis names it), or the run's label for a scenario."""
    if settings.scenario is not None:
        return label
    if settings.sweep_axis == "max concurrency":
        return str(result.point.max_concurrency)
    return f"{result.point.request_rate:g}"


def _exit_code(summaries: list[tuple[str, dict[str, Any]]]) -> int:
    empty = [label for label, summary in summaries if summary["completed"] == 0]
    if empty:
        print(f"loadtest: no request completed at {', '.join(empty)}", file=sys.stderr)
    return 1 if empty else 0


def _run_loop(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run on uvloop where it is installed: the client must not be the bottleneck it measures."""
    try:
        import uvloop
        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())

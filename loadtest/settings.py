"""The validated settings of one `loadtest` run, built from the command line."""

from __future__ import annotations

import argparse
import ipaddress
import math
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.backends import BackendConfig
from loadtest.driver import LoadPoint
from loadtest.metrics import SLO
from loadtest.report import point_json
from loadtest.scenarios import ScenarioConfig
from loadtest.workloads import WorkloadConfig, load_prompt_tokenizer


class SettingsError(ValueError):
    """A combination of options that cannot run; the message names the options."""


@dataclass(frozen=True)
class Settings:
    backend: BackendConfig
    workload: WorkloadConfig
    points: tuple[LoadPoint, ...]
    sweep_axis: str                 # what varies across points, for tables and plot axes
    request_timeout: float
    percentiles: tuple[float, ...]
    slo: SLO
    scenario: ScenarioConfig | None
    output: Path | None
    plot_dir: Path | None
    progress: bool

    def to_json(self) -> dict[str, Any]:
        """The settings as written into the results file; the API key itself never is."""
        backend = asdict(self.backend) | {"api_key": self.backend.api_key is not None, "url": self.backend.url}
        return {
            "backend": backend, "workload": asdict(self.workload),
            "points": [point_json(p) for p in self.points], "sweep_axis": self.sweep_axis,
            "request_timeout": self.request_timeout, "percentiles": list(self.percentiles),
            "slo": asdict(self.slo), "scenario": asdict(self.scenario) if self.scenario else None,
        }


def settings_from_args(args: argparse.Namespace) -> Settings:
    if not args.allow_remote and not is_loopback(args.host):
        raise SettingsError(f"--host {args.host} is not a loopback address; pass --allow-remote to load it")
    if args.prompt_tokenizer is not None:
        try:
            load_prompt_tokenizer(args.prompt_tokenizer)  # cached: the run reuses it
        except ValueError as exc:
            raise SettingsError(str(exc)) from exc
    try:
        backend = BackendConfig(
            kind=args.backend, host=args.host, port=args.port, endpoint=args.endpoint, api_key=args.api_key,
            model=args.model, prompt_tokenizer=args.prompt_tokenizer, connections=args.connections,
            compression=args.ws_compression,
            ignore_eos=args.ignore_eos, temperature=args.temperature)
        workload = WorkloadConfig(
            kind=args.workload, input_len=args.input_len, output_len=args.output_len,
            range_ratio=args.range_ratio, prefix_len=args.prefix_len, num_prefixes=args.num_prefixes,
            vocab_limit=args.vocab_limit, seed=args.seed, token_salt=args.token_salt)
        scenario = None if args.scenario is None else ScenarioConfig(
            args.scenario, args.disturbers, args.disturb_after, args.slow_pause)
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc
    points, axis = _load_points(args)
    if scenario is not None:
        _check_scenario(backend, points)
    if args.request_timeout <= 0:
        raise SettingsError(f"--request-timeout must be > 0, got {args.request_timeout}")
    return Settings(backend, workload, points, axis, args.request_timeout, tuple(args.percentiles),
                    parse_slo(args.goodput or []), scenario, args.output, args.plot_dir, not args.no_progress)


def _load_points(args: argparse.Namespace) -> tuple[tuple[LoadPoint, ...], str]:
    rates: list[float] = args.request_rate
    concurrencies: list[int] = args.max_concurrency or []
    if len(rates) > 1 and len(concurrencies) > 1:
        raise SettingsError("sweep one of --request-rate and --max-concurrency at a time")
    num_prompts = args.num_prompts or None
    if args.duration is not None and args.duration <= 0:
        raise SettingsError(f"--duration must be > 0 seconds, got {args.duration}")
    if num_prompts is None and args.duration is None:
        raise SettingsError("--num-prompts 0 (unbounded) needs a --duration")
    if args.burstiness <= 0:
        raise SettingsError(f"--burstiness must be > 0, got {args.burstiness}")
    if len(concurrencies) > 1:
        pairs = [(rates[0], c) for c in concurrencies]
        axis = "max concurrency"
    else:
        pairs = [(r, concurrencies[0] if concurrencies else None) for r in rates]
        axis = "request rate"
    points = tuple(LoadPoint(rate, limit, args.burstiness, num_prompts, args.duration) for rate, limit in pairs)
    for point in points:
        if math.isinf(point.request_rate) and point.max_concurrency is None and num_prompts is None:
            raise SettingsError("--request-rate inf without --max-concurrency needs --num-prompts")
    return points, axis


def _check_scenario(backend: BackendConfig, points: tuple[LoadPoint, ...]) -> None:
    if backend.kind != "streampage":
        raise SettingsError(f"--scenario needs --backend streampage (WebSocket), got {backend.kind}")
    if len(points) != 1:
        raise SettingsError("--scenario runs at one load point: give one --request-rate / --max-concurrency")


def is_loopback(host: str) -> bool:
    """True when every address the host resolves to stays on this machine.

    The unspecified address (0.0.0.0, ::) counts: a server's bind address copied from its environment
    file is one, and connecting to it reaches the local host.
    """
    try:
        return _is_local(host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(_is_local(info[4][0]) for info in infos)


def _is_local(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or ip.is_unspecified


def parse_rates(text: str) -> list[float]:
    """`1,2,4,inf` -> request rates (requests/s); `inf` sends every request at once."""
    rates = [_number(item, float, "request rate") for item in _items(text)]
    if any(rate <= 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"request rates must be > 0, got {text!r}")
    return rates


def parse_concurrencies(text: str) -> list[int]:
    """`1,8,64` -> concurrency caps."""
    limits = [_number(item, int, "concurrency") for item in _items(text)]
    if any(limit < 1 for limit in limits):
        raise argparse.ArgumentTypeError(f"concurrencies must be >= 1, got {text!r}")
    return limits


def parse_percentiles(text: str) -> list[float]:
    """`50,90,99` -> percentiles to report besides mean and median."""
    values = [_number(item, float, "percentile") for item in _items(text)]
    if any(not 0 < value < 100 for value in values):
        raise argparse.ArgumentTypeError(f"percentiles must be in (0, 100), got {text!r}")
    return values


def parse_slo(items: list[str]) -> SLO:
    """`ttft:500 tpot:50 e2el:10000` (milliseconds) -> the goodput SLO."""
    limits: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise SettingsError(f"--goodput takes ttft:MS tpot:MS e2el:MS, got {item!r}")
        try:
            limits[f"{name}_ms"] = float(value)
        except ValueError:
            raise SettingsError(f"--goodput {name}: {value!r} is not a number of ms") from None
        if limits[f"{name}_ms"] < 0:
            raise SettingsError(f"--goodput {name} must be >= 0 ms, got {value}")
    return SLO(**limits)


def _items(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, got an empty one")
    return items


def _number(text: str, kind: type, what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} {text!r} is not a number") from None

"""`streampage serve | generate | bench | demo-model | loadtest | worker`.

Every `--some-option` can also come from the environment as `STREAMPAGE_SOME_OPTION` (the systemd
environment file uses this); a flag on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import types
from dataclasses import MISSING, fields
from typing import Any, get_args

from streampage.config import EngineConfig

ENV_PREFIX = "STREAMPAGE_"

# subcommand -> module with `add_arguments(parser)` and `run(args) -> int | None`
COMMANDS = {
    "serve": ("streampage.server.app", "run the WebSocket streaming server"),
    "generate": ("streampage.generate_cli", "print completions of prompts"),
    "demo-model": ("streampage.model.demo", "write the built-in demo checkpoint (or a shape for benches)"),
    "loadtest": ("loadtest.main", "drive a running server with concurrent streams"),
    "worker": ("streampage.runner.tp_worker", "run a tensor-parallel rank > 0 (torchrun-style environment)"),
}
# Under torchrun every rank runs the same command: these run the engine on rank 0 only, and make every
# other rank (RANK > 0) a tensor-parallel worker.
RANK_ZERO_COMMANDS = ("serve", "generate")
BENCHES = {
    "kv-memory": ("streampage.bench.kv_memory", "KV memory held by token states vs static reservation"),
    "scheduler": ("streampage.bench.scheduler", "CPU time of one decode step without a model"),
    "kernels": ("streampage.bench.kernels", "paged attention kernels against SDPA (GPU)"),
    "latency": ("streampage.bench.latency", "per-token latency against the weight-read floor"),
    "throughput": ("streampage.bench.throughput", "offline output tokens/s"),
    "serving-path": ("streampage.bench.serving_path", "server path CPU per delivered token (simulated model)"),
}


def add_engine_arguments(
    parser: argparse.ArgumentParser, *, model_positional: bool = False, skip: tuple[str, ...] = ()
) -> None:
    """One flag per EngineConfig option, named like the option (`--max-num-seqs`); `skip` leaves some
    options to the command."""
    group = parser.add_argument_group("engine")
    for concern in fields(EngineConfig):
        for option in fields(concern.default_factory):  # type: ignore[misc]
            if option.name in skip:
                continue
            if option.name == "model" and model_positional:
                parser.add_argument("model", nargs="?", default=None,
                                    help="checkpoint directory (default: the built-in demo model)")
                continue
            flag = "--" + option.name.replace("_", "-")
            default = option.default if option.default is not MISSING else None
            kind = _option_type(option.type)
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                   help=f"(default: {default})")
            else:
                group.add_argument(flag, type=kind, default=None, help=f"(default: {default})")


def engine_options(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The engine options given on the command line or in the environment (others keep defaults)."""
    names = [o.name for c in fields(EngineConfig) for o in fields(c.default_factory)]  # type: ignore[misc]
    return {name: getattr(args, name) for name in names
            if name not in skip and getattr(args, name, None) is not None}


def _option_type(annotation: Any) -> type:
    text = str(annotation)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return kind
    if isinstance(annotation, types.UnionType):
        return next(a for a in get_args(annotation) if a is not type(None))
    return str


def apply_environment_defaults(parser: argparse.ArgumentParser, environ: dict[str, str]) -> None:
    """Let STREAMPAGE_<OPTION> fill any option the command line leaves out."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                apply_environment_defaults(sub, environ)
            continue
        long_flags = [s for s in action.option_strings if s.startswith("--")]
        if not long_flags:
            continue
        key = ENV_PREFIX + long_flags[0][2:].replace("-", "_").upper()
        if key not in environ:
            continue
        raw = environ[key]
        if isinstance(action, argparse.BooleanOptionalAction):
            value: Any = raw.strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(action, argparse._StoreTrueAction):
            value = raw.strip().lower() in ("1", "true", "yes", "on")
        elif action.nargs in ("*", "+"):
            value = [action.type(v) if action.type else v for v in raw.split(",") if v]
        else:
            try:
                value = action.type(raw) if action.type else raw
            except ValueError as exc:
                parser.error(f"{key}={raw!r}: {exc}")
        action.default = value


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Every command is listed; only the chosen one's module is imported (they pull in torch)."""
    parser = argparse.ArgumentParser(prog="streampage", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    chosen = [a for a in argv if not a.startswith("-")][:2]
    for name, (module, help_text) in COMMANDS.items():
        _add_command(commands, name, module, help_text, chosen[:1] == [name])
    bench = commands.add_parser("bench", help="benchmarks")
    benches = bench.add_subparsers(dest="bench", required=True)
    for name, (module, help_text) in BENCHES.items():
        _add_command(benches, name, module, help_text, chosen == ["bench", name])
    return parser


def _add_command(commands: Any, name: str, module: str, help_text: str, chosen: bool) -> None:
    sub = commands.add_parser(name, help=help_text)
    sub.set_defaults(module=module)
    if chosen:
        importlib.import_module(module).add_arguments(sub)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    apply_environment_defaults(parser, dict(os.environ))
    args = parser.parse_args(argv)
    module = args.module
    if args.command in RANK_ZERO_COMMANDS and "WORLD_SIZE" in os.environ and os.environ.get("RANK", "0") != "0":
        module = COMMANDS["worker"][0]
    result = importlib.import_module(module).run(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`streampage bench serving-path`: what the server path costs per delivered token, without a GPU.

Runs the real serving path end to end on three processes, as on the GPU host:

    engine core (real LLMEngine + scheduler, a simulated model paced at --step-rate)
      -> pipe -> front end (`streampage serve` code: AsyncEngine, output processor, detokenizer,
                            sessions, outbox, orjson, websockets)
      -> loopback TCP -> the load generator (`python -m loadtest`, the real WebSocket client)

and reports delivered tokens/s against the tokens/s the core generated, plus the CPU seconds each
process (and the front end's event-loop thread alone) spent per delivered token. A process
that needs more than one core-second per second of run caps the rate; on a box with fewer cores than
processes they compete, so compare CPU per token, not the rate. With --profile DIR the front end's
event-loop thread and the core's step loop run under cProfile and their top functions are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streampage.bench.simulated import SimulatedExecutor
from streampage.bench.workloads import resolve_model
from streampage.config import EngineConfig
from streampage.engine.llm_engine import LLMEngine, freeze_long_lived_objects
from streampage.engine.scheduler import SchedulerOutput
from streampage.model.loader import eos_token_ids, load_config
from streampage.runner.step_types import RowResult
from streampage.sampling_params import SamplingParams

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_READY_WAIT_S = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen3-0.6b",
                        help="checkpoint directory or shape name: its tokenizer and vocabulary are used")
    parser.add_argument("--step-rate", type=float, default=146.0,
                        help="simulated model steps/s (0: as fast as the core's CPU allows); at 146 the "
                             "default workload runs offline as fast as on the H200 (27.4k tok/s)")
    parser.add_argument("--num-prompts", type=int, default=384)
    parser.add_argument("--max-concurrency", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--connections", type=int, default=8, help="loadtest --connections")
    parser.add_argument("--loadtest-arg", action="append", default=[],
                        help="an extra argument for the load generator (repeatable)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="directory for cProfile files of the front end's loop and the core")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON")


# ---- the simulated core (runs in the engine core's process) ----------------------------------------


class PacedExecutor:
    """The simulated model's tokens at the pace of a device running steps back to back: a step
    launched at t is done at max(t, previous step done) + 1/step_rate, and `collect` waits for that."""

    def __init__(self, inner: SimulatedExecutor, step_rate: float) -> None:
        self._inner = inner
        self._step_s = 1.0 / step_rate if step_rate > 0 else 0.0
        self._device_free_at = 0.0
        self.steps = 0
        self.late_s = 0.0  # its time idle while the core had requests: the core launched late

    def launch(self, out: SchedulerOutput) -> tuple[float, list[RowResult | None]]:
        now = time.perf_counter()
        if self.steps and now > self._device_free_at:
            self.late_s += now - self._device_free_at
        done_at = max(now, self._device_free_at) + self._step_s
        self._device_free_at = done_at
        self.steps += 1
        return done_at, self._inner.execute(out)

    def collect(self, launched: tuple[float, list[RowResult | None]]) -> list[RowResult | None]:
        done_at, results = launched
        delay = done_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return results

    @property
    def busy_s(self) -> float:
        """The simulated device's time computing steps."""
        return self.steps * self._step_s


def simulated_engine(config: EngineConfig, step_rate: float) -> tuple[LLMEngine, str]:
    """An LLMEngine over the paced simulated model, with the checkpoint's vocabulary and EOS ids
    (EOS is never drawn, so every request runs to max_tokens like the --ignore-eos load)."""
    model_dir = config.model.model
    assert model_dir is not None
    checkpoint = load_config(Path(model_dir))
    eos_ids = list(eos_token_ids(checkpoint, Path(model_dir)))  # what the real engine stops on
    vocab_size = checkpoint.vocab_size
    block_size = config.cache.block_size
    num_gpu_blocks = config.cache.num_gpu_blocks or 65536
    max_model_len = config.model.max_model_len or getattr(checkpoint, "max_position_embeddings", 4096)
    config = config.with_max_model_len(max_model_len)
    executor = PacedExecutor(SimulatedExecutor(vocab_size, block_size, avoid=frozenset(eos_ids)), step_rate)
    engine = LLMEngine(config, executor, num_gpu_blocks=num_gpu_blocks, num_cpu_blocks=0,
                       max_model_len=max_model_len, eos_token_ids=eos_ids, vocab_size=vocab_size)
    freeze_long_lived_objects()  # as LLMEngine.from_config does
    return engine, model_dir


def main() -> None:
    """The simulated engine core's process: argv = socket fd, step rate, profile path ('' for none),
    report path (its simulated device's busy and late seconds, as JSON, once the core ends)."""
    from multiprocessing.connection import Connection

    from streampage.engine.core_process import run_core

    conn = Connection(int(sys.argv[1]))
    step_rate, profile, report = float(sys.argv[2]), sys.argv[3], sys.argv[4]
    config = conn.recv()
    executors: list[PacedExecutor] = []

    def load(config: EngineConfig) -> tuple[LLMEngine, str]:
        engine, model_dir = simulated_engine(config, step_rate)
        executors.append(engine.executor)
        return engine, model_dir

    with _profiled(profile or None):
        run_core(config, conn, load)
    device = executors[0]
    Path(report).write_text(json.dumps({"steps": device.steps, "busy_s": device.busy_s, "late_s": device.late_s}))


# ---- the server under test (its own process) ------------------------------------------------------


def serve_main() -> None:
    """`streampage serve`'s code on the simulated core: argv = port, model dir, step rate, profile dir
    ('' for none), the core's report path."""
    import uvloop

    from streampage.engine.async_engine import AsyncEngine
    from streampage.server.config import ServerConfig
    from streampage.server.lifecycle import configure_logging, run_server

    port, model_dir, step_rate, profile_dir, core_report = sys.argv[1:6]
    # The limits of scripts/serving_bench.sh: the whole load may queue and share sockets.
    config = ServerConfig(port=int(port), max_queued_requests=2048, max_requests_per_connection=1024,
                          max_queued_prompt_tokens=10_000_000, log_level="warning")
    configure_logging(config.log_level)
    core_profile = str(Path(profile_dir) / "core.prof") if profile_dir else ""

    async def start(on_status: Any) -> Any:
        engine_config = EngineConfig.create(model=model_dir)
        return await AsyncEngine.start(engine_config, on_status=on_status,
                                       core_main=(__name__, [step_rate, core_profile, core_report]))

    with _profiled(str(Path(profile_dir) / "front.prof") if profile_dir else None):
        code = uvloop.run(run_server(config, start_engine=start))
    raise SystemExit(code)


@contextlib.contextmanager
def _profiled(path: str | None) -> Iterator[None]:
    """cProfile this thread while inside, writing the stats to `path` (nothing when None)."""
    if path is None:
        yield
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        profiler.dump_stats(path)


# ---- the driver -----------------------------------------------------------------------------------


@dataclass
class CpuSample:
    process: float  # seconds, all threads
    main_thread: float  # seconds, the thread whose id is the process id (the event loop / step loop)


def cpu_seconds(pid: int) -> CpuSample:
    """User + system CPU seconds of a live process and of its main thread, from /proc."""
    return CpuSample(_stat_seconds(f"/proc/{pid}/stat"), _stat_seconds(f"/proc/{pid}/task/{pid}/stat"))


def _stat_seconds(path: str) -> float:
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime: fields 14 and 15 of stat


def child_pids(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
    return children


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _wait_ready(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + _READY_WAIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} while loading")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
            return
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def run(args: argparse.Namespace) -> int:
    model_dir = resolve_model(args.model)
    offline = offline_tok_s(model_dir, args)
    port = _free_port()
    profile_dir = ""
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        profile_dir = str(args.profile.resolve())
    with tempfile.TemporaryDirectory() as tmp:
        core_report = Path(tmp) / "core.json"
        server = subprocess.Popen([sys.executable, "-c", f"from {__name__} import serve_main; serve_main()",
                                   str(port), model_dir, str(args.step_rate), profile_dir, str(core_report)])
        try:
            _wait_ready(port, server)
            (core_pid,) = child_pids(server.pid)
            result = _measure(args, port, server.pid, core_pid)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
        device = json.loads(core_report.read_text())
    result["offline_tok_s"] = offline
    result["ratio"] = result["delivered_tok_s"] / offline
    # Idle while the core held requests: the core (or the pipe) could not launch steps in time.
    result["device_late_share"] = device["late_s"] / max(device["busy_s"] + device["late_s"], 1e-9)
    _print(result)
    if args.profile is not None:
        for name in ("front", "core"):
            print(f"\n---- {name}: top functions by own time ({args.profile / (name + '.prof')}) ----")
            pstats.Stats(str(args.profile / f"{name}.prof")).sort_stats("tottime").print_stats(25)
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2))
    return 0 if result["failed"] == 0 else 1


def offline_tok_s(model_dir: str, args: argparse.Namespace) -> float:
    """The same workload through the same paced engine in this process, every request queued at once:
    the rate `bench throughput` would report for this simulated model."""
    engine, _ = simulated_engine(EngineConfig.create(model=model_dir), args.step_rate)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    for i in range(args.num_prompts):  # ids below 1000, as the load generator's --vocab-limit 1000
        engine.add_request(f"r{i}", [1 + (i * 7919 + j) % 999 for j in range(args.input_len)], params)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return engine.generation_tokens_total / (time.perf_counter() - start)


def _measure(args: argparse.Namespace, port: int, server_pid: int, core_pid: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "loadtest.json"
        command = [sys.executable, "-m", "loadtest", "--port", str(port), "--num-prompts", str(args.num_prompts),
                   "--max-concurrency", str(args.max_concurrency), "--input-len", str(args.input_len),
                   "--output-len", str(args.output_len), "--vocab-limit", "1000",
                   "--connections", str(args.connections), "--no-progress", "--output", str(report),
                   *args.loadtest_arg]
        engine_before = _get_json(f"http://127.0.0.1:{port}/v1/stats")["engine"]
        front_before, core_before = cpu_seconds(server_pid), cpu_seconds(core_pid)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        front_after, core_after = cpu_seconds(server_pid), cpu_seconds(core_pid)
        engine_after = _get_json(f"http://127.0.0.1:{port}/v1/stats")["engine"]
        summary = json.loads(report.read_text())["runs"][0]["summary"]
    delivered = summary["total_output"]
    duration = summary["duration_s"]

    def per_token_us(seconds: float) -> float:
        return 1e6 * seconds / max(delivered, 1)

    cpu = {
        "front_end": front_after.process - front_before.process,
        "front_end_loop_thread": front_after.main_thread - front_before.main_thread,
        "core": core_after.process - core_before.process,
        # its own count: the process's total includes its start-up (imports, workload generation)
        "loadtest_client": summary["client_cpu_busy"] * duration,
    }
    steps = engine_after["steps_total"] - engine_before["steps_total"]
    generated = engine_after["generation_tokens_total"] - engine_before["generation_tokens_total"]
    return {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        "cpus": os.cpu_count(),
        "delivered_tok_s": summary["output_throughput"],
        # The load generator's own start-up is outside its duration, and the core idles meanwhile.
        "generated_tok_s": generated / duration,
        "engine_steps_s": steps / duration,
        "failed": summary["failed"],
        "mean_tokens_per_frame": summary.get("mean_tokens_per_chunk"),
        "client_loop_lag_mean_ms": summary["mean_loop_lag_ms"],
        "client_send_delay_mean_ms": summary["mean_send_delay_ms"],
        "duration_s": duration,
        "cpu_s": cpu,
        "cpu_us_per_token": {name: per_token_us(seconds) for name, seconds in cpu.items()},
        "cpu_share_of_run": {name: seconds / duration for name, seconds in cpu.items()},
    }


def _print(result: dict[str, Any]) -> None:
    print(f"delivered {result['delivered_tok_s']:.0f} tok/s over WebSocket; offline {result['offline_tok_s']:.0f} "
          f"tok/s; ratio {result['ratio']:.3f} ({result['cpus']} CPUs; {result['failed']} requests failed)")
    print(f"core generated {result['generated_tok_s']:.0f} tok/s in {result['engine_steps_s']:.1f} steps/s; "
          f"simulated device idle while requests ran (core late): {100 * result['device_late_share']:.1f}%")
    print(f"mean tokens per frame {result['mean_tokens_per_frame']:.2f}; "
          f"client loop lag {result['client_loop_lag_mean_ms']:.2f} ms, send delay "
          f"{result['client_send_delay_mean_ms']:.2f} ms")
    print(f"{'process':<24}{'CPU us / token':>16}{'cores busy':>12}")
    for name, us in result["cpu_us_per_token"].items():
        print(f"{name:<24}{us:>16.1f}{result['cpu_share_of_run'][name]:>12.2f}")

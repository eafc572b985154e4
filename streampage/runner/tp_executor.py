"""Rank 0 of a tensor-parallel engine behind the engine's Executor protocol (launch / collect).

This process holds the scheduler, the one KV cache manager and the sampler; each step it sends the
other ranks one control message (`runner/tp_control.py`) and runs the step with them. Ranks come from
one of two places:
- spawned: without torchrun-style variables, rank 0 starts ranks 1..N-1 as child processes on this
  machine, meeting at a store on a free port of 127.0.0.1; a pipe tells them when rank 0 is gone;
- launched: with RANK=0, WORLD_SIZE=N, MASTER_ADDR, MASTER_PORT set (torchrun, Slurm, Kubernetes), the
  other ranks run `streampage worker` wherever they were started and join.

Failure is loud and quick: a spawned rank that exits is noticed before the next step (and a collective
with it fails as its connections close); a rank that hangs fails the step after distributed_timeout_s;
either way every spawned rank is killed and the engine raises TensorParallelError. A monitor thread
sends keepalives while the engine is idle, so the ranks' control receive can time out too; on CUDA it
also aborts the device group when rank 0 has waited on a step past the timeout or a spawned rank died
meanwhile, since NCCL kernels (in graph replays above all) would otherwise wait forever.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from streampage.config import ConfigError, EngineConfig
from streampage.distributed import (
    LOAD_TIMEOUT,
    Rendezvous,
    abort_device_group,
    open_store,
    shutdown_tensor_parallel,
)
from streampage.runner.model_runner import ModelRunner
from streampage.runner.step_types import RowResult
from streampage.runner.tp_control import Kind, encode
from streampage.runner.tp_rank import RankWorker, join_engine, joined_key, pin_device
from streampage.runner.worker import WorkerInfo

if TYPE_CHECKING:  # the runner reads the scheduler's rows; it never calls into the engine
    from streampage.engine.scheduler import SchedulerOutput

log = logging.getLogger(__name__)

LOCAL_HOST = "127.0.0.1"
KEEPALIVE_S = 1.0  # idle rank 0 sends a keepalive this often (or a quarter of the timeout, if shorter)
EXIT_GRACE_S = 10.0  # ranks get this long to exit after the shutdown message before they are killed
T = TypeVar("T")


class TensorParallelError(RuntimeError):
    """A rank of a tensor-parallel engine died, hung or failed; the engine cannot continue."""


class TensorParallelExecutor:
    def __init__(self, config: EngineConfig) -> None:
        self.config = pin_device(config)
        self.world_size = config.parallel.tensor_parallel_size
        self.processes: list[subprocess.Popen] = []  # spawned ranks 1..N-1
        self.worker: RankWorker | None = None
        self._parent_pipe: int | None = None  # write end; spawned ranks exit at its EOF
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._keepalive_error: Exception | None = None
        self._busy_since: float | None = None  # when rank 0 entered launch or collect
        self._device_aborted = False
        self._closed = False

    @property
    def runner(self) -> ModelRunner:
        """Rank 0's runner (benchmarks read its timings)."""
        assert self.worker is not None and self.worker.runner is not None, "load() first"
        return self.worker.runner

    def load(self) -> WorkerInfo:
        rendezvous = self._rendezvous()
        atexit.register(self.shutdown)
        try:
            store = open_store(rendezvous)
            if rendezvous.master_port == 0:
                self._spawn(store.port)
                self._wait_for_ranks(store)
            self.worker = join_engine(store, rendezvous, self.config)
            info = self.worker.load()
        except Exception as exc:
            dead = self._abort(exc)
            if not dead:
                raise  # rank 0's own failure (a bad checkpoint, an option), once the other ranks are gone
            raise self._error("tensor-parallel start-up failed", exc, dead) from exc
        timeout = self.config.parallel.distributed_timeout_s
        self._monitor = threading.Thread(target=self._watch, args=(min(KEEPALIVE_S, timeout / 4),),
                                         name="tp-monitor", daemon=True)
        self._monitor.start()
        log.info("tensor parallelism: %d ranks ready", self.world_size)
        return info

    def launch(self, out: SchedulerOutput) -> Any:
        self.check_health()
        return self._watched(lambda: self.runner.launch(out))

    def collect(self, launched: Any) -> list[RowResult | None]:
        return self._watched(lambda: self.runner.collect(launched))

    def _watched(self, part: Callable[[], T]) -> T:
        """Run rank 0's part of a step where the monitor sees how long it takes."""
        self._busy_since = time.monotonic()
        try:
            result = part()
        except Exception as exc:
            raise self._error("a tensor-parallel step failed", exc, self._abort(exc)) from exc
        finally:
            self._busy_since = None
        if self._device_aborted:  # the step returned, but from aborted collectives
            raise self._error("a tensor-parallel step waited on the device past the timeout", None, self._abort(None))
        return result

    def shutdown(self) -> None:
        """Tell every rank to exit, destroy the groups together with them, wait for the spawned ones
        (killing stragglers). Idempotent; the executor cannot run steps afterwards."""
        if self._closed:
            return
        self._stop_monitor()
        told = False
        try:
            if self.worker is not None and self._keepalive_error is None:
                self.worker.channel.send(encode(Kind.SHUTDOWN))
                told = True
        except Exception as exc:  # a rank is already gone: nothing left to tell
            log.warning("tensor-parallel shutdown message failed: %s", exc)
        healthy = told and not self._device_aborted and not self._dead_ranks()
        if healthy:  # the ranks destroy theirs on the message; NCCL's tear-down waits for all of them
            self._end_groups(abandoned=False)
        deadline = time.monotonic() + EXIT_GRACE_S
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
        self._close(abandoned=not healthy)

    def _end_groups(self, abandoned: bool) -> None:
        """Release rank 0's CUDA graphs, which hold references to the NCCL communicators, then destroy
        the groups (a no-op when already done)."""
        if self.worker is not None and self.worker.runner is not None:
            self.worker.runner.release_graphs()
        shutdown_tensor_parallel(abandoned)

    # ---- start-up ------------------------------------------------------------------------------

    def _rendezvous(self) -> Rendezvous:
        """Launched ranks when torchrun-style variables are set, else ranks spawned here (port 0)."""
        if dist.is_initialized():
            raise ConfigError("this process already runs a tensor-parallel engine (or another torch.distributed "
                              "job); shut it down before starting another")
        launched = Rendezvous.from_env(os.environ)
        if launched is None:
            if self.config.model.device == "cuda" and torch.cuda.device_count() < self.world_size:
                raise ConfigError(f"tensor_parallel_size={self.world_size} needs as many GPUs on this machine; "
                                  f"{torch.cuda.device_count()} are visible")
            return Rendezvous(0, self.world_size, LOCAL_HOST, 0)
        if launched.world_size != self.world_size:
            raise ConfigError(f"tensor_parallel_size={self.world_size} but WORLD_SIZE={launched.world_size}")
        if launched.rank != 0:
            raise ConfigError(f"RANK={launched.rank}: the engine runs on rank 0; other ranks run `streampage worker`")
        return launched

    def _spawn(self, port: int) -> None:
        read_end, self._parent_pipe = os.pipe()
        try:
            for rank in range(1, self.world_size):
                env = {**os.environ, **Rendezvous(rank, self.world_size, LOCAL_HOST, port, rank).to_env()}
                env.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # rank 0 hosts this store
                if self.config.model.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
                    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.world_size))
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", "streampage.runner.tp_worker", "--parent-fd", str(read_end)],
                    env=env, pass_fds=(read_end,),
                ))
        finally:
            os.close(read_end)

    def _wait_for_ranks(self, store: Any) -> None:
        """Until every spawned rank has started (a rank that dies first fails start-up at once)."""
        keys = [joined_key(rank) for rank in range(1, self.world_size)]
        deadline = time.monotonic() + LOAD_TIMEOUT.total_seconds()
        while not store.check(keys):
            if self._dead_ranks():
                raise TensorParallelError("a tensor-parallel rank exited before joining")
            if time.monotonic() > deadline:
                raise TensorParallelError(f"tensor-parallel ranks did not start within {LOAD_TIMEOUT}")
            time.sleep(0.05)

    # ---- failure -------------------------------------------------------------------------------

    def check_health(self) -> None:
        """Raise TensorParallelError (after killing the ranks) if a rank exited or stopped answering."""
        if self._closed:
            raise TensorParallelError("the tensor-parallel engine has shut down")
        cause = self._keepalive_error
        if cause is not None or self._dead_ranks():
            raise self._error("a tensor-parallel rank stopped answering", cause, self._abort(cause))

    def _dead_ranks(self, wait_s: float = 0.0) -> list[str]:
        """Spawned ranks that exited, waiting up to wait_s for one (a peer's sockets close a moment
        before its exit status is readable)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [_describe(rank, p) for rank, p in enumerate(self.processes, start=1) if p.poll() is not None]
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.02)

    def _abort(self, cause: Exception | None) -> list[str]:
        """Kill every spawned rank and tear the groups down; returns the ranks that had exited."""
        dead = self._dead_ranks(wait_s=1.0 if cause is not None and self.processes else 0.0)
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        self._stop_monitor()
        self._close(abandoned=True)
        return dead

    def _error(self, what: str, cause: Exception | None, dead: list[str]) -> TensorParallelError:
        """The engine's error: the ranks that exited, or else what failed and why."""
        if dead:
            head = f"tensor-parallel {', '.join(dead)}"
        else:
            timeout = self.config.parallel.distributed_timeout_s
            head = f"{what} (no rank exited here: a rank hung past distributed_timeout_s={timeout:g} or is unreachable)"
        detail = "" if cause is None or isinstance(cause, TensorParallelError) else f"; {type(cause).__name__}: {cause}"
        return TensorParallelError(f"{head}{detail}; the engine cannot continue")

    def _close(self, abandoned: bool) -> None:
        for process in self.processes:
            process.wait()
        self._end_groups(abandoned)
        if self._parent_pipe is not None:
            os.close(self._parent_pipe)
            self._parent_pipe = None
        self._closed = True
        atexit.unregister(self.shutdown)

    # ---- monitor -------------------------------------------------------------------------------

    def _watch(self, interval: float) -> None:
        assert self.worker is not None
        channel, on_gpu = self.worker.channel, self.worker.device.type == "cuda"
        while not self._stop.wait(interval / 2):
            if on_gpu:
                self._watch_device()
            if self._keepalive_error is None and time.monotonic() - channel.last_send >= interval:
                try:
                    channel.send(encode(Kind.KEEPALIVE))
                except Exception as exc:  # reported by the next launch
                    self._keepalive_error = exc

    def _watch_device(self) -> None:
        since = self._busy_since
        if since is None or self._device_aborted:
            return
        overdue = time.monotonic() - since > self.config.parallel.distributed_timeout_s
        if overdue or self._dead_ranks():
            log.error("aborting the device group: %s", "a step is overdue" if overdue else "a rank exited")
            self._device_aborted = True
            abort_device_group()

    def _stop_monitor(self) -> None:
        self._stop.set()
        if self._monitor is not None:  # a keepalive blocked on a hung rank returns within the step timeout
            self._monitor.join(self.config.parallel.distributed_timeout_s + 1.0)


def _describe(rank: int, process: subprocess.Popen) -> str:
    code = process.returncode
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    return f"rank {rank} (pid {process.pid}) {how}"

"""Run a tensor-parallel rank other than 0 (the engine's options come from rank 0).

The rank joins rank 0's engine, loads its shard, then runs every step rank 0 sends until rank 0 says
shutdown. Rank 0 starts these processes itself on one machine (`--tensor-parallel-size N`). On several
machines start them with torchrun-style variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
LOCAL_RANK) while rank 0 runs `streampage serve` or `generate` with the same WORLD_SIZE and master:

    streampage worker                       # or: python -m streampage.runner.tp_worker

Under torchrun every rank may run the same `streampage serve ...` or `generate ...` command instead:
ranks other than 0 become workers (`cli.py`). The checkpoint path must exist on every machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

import torch

from streampage.distributed import Rendezvous, open_store, shutdown_tensor_parallel
from streampage.runner.block_table_mirror import MirrorCopy
from streampage.runner.tp_control import Kind, decode
from streampage.runner.tp_rank import TensorParallelRunner, join_engine, joined_key

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0]
    # Spawned ranks only: the read end of a pipe only rank 0 writes to; its EOF means rank 0 is gone.
    parser.add_argument("--parent-fd", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    rendezvous = Rendezvous.from_env(os.environ)
    if rendezvous is None or rendezvous.rank == 0:
        print("streampage worker: set RANK (> 0), WORLD_SIZE, MASTER_ADDR and MASTER_PORT (and LOCAL_RANK on "
              "GPU machines); rank 0 runs `streampage serve` or `generate`", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s rank {rendezvous.rank} %(levelname)s %(message)s")
    parent_fd = getattr(args, "parent_fd", None)  # absent when `serve` or `generate` runs as a worker
    if parent_fd is not None:
        _exit_with_parent(parent_fd)
    try:
        serve_rank(rendezvous)
    except Exception:
        log.exception("rank %d failed", rendezvous.rank)
        shutdown_tensor_parallel(abandoned=True)  # rank 0 is gone or failing: nobody to tear down with
        return 1
    shutdown_tensor_parallel()  # together with rank 0, which does the same after its shutdown message
    return 0


def serve_rank(rendezvous: Rendezvous) -> None:
    store = open_store(rendezvous)
    store.set(joined_key(rendezvous.rank), str(os.getpid()))
    worker = join_engine(store, rendezvous, None)
    worker.load()
    assert isinstance(worker.runner, TensorParallelRunner)
    log.info("loaded; running rank 0's steps")
    try:
        run_steps(worker.runner)
    finally:
        worker.runner.release_graphs()  # before the groups go: NCCL waits for graphs holding its communicators


@torch.inference_mode()
def run_steps(runner: TensorParallelRunner) -> None:
    """Receive a control message, run its step, repeat; return on shutdown. A receive waits at most
    distributed_timeout_s (rank 0 sends keepalives while idle)."""
    tables = MirrorCopy(runner.inputs.mirror.table.shape[1])  # rank 0's block tables, kept from its changes
    while True:
        kind, moves, inputs = decode(runner.channel.recv(), tables)
        if kind is Kind.SHUTDOWN:
            return
        if kind is Kind.STEP:
            assert moves is not None
            runner.execute_step(moves, inputs)


def _exit_with_parent(fd: int) -> None:
    def watch() -> None:
        while os.read(fd, 1):  # rank 0 never writes: this returns only at EOF
            pass
        log.error("rank 0 exited; stopping")
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m streampage.runner.tp_worker")
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())

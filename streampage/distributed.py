"""Tensor-parallel state: which rank this process is, its process groups, and the collectives the model
layers and the runner need.

With one rank every collective is the identity, so single-GPU and CPU code pays nothing. A
tensor-parallel engine has three groups over the same ranks:
- the world group (gloo), for start-up only: the engine config, the load barrier; its timeout is long
  because loading a large checkpoint shard takes minutes;
- the device group (NCCL on GPU, gloo on CPU): the model's all-reduces and gathers, the pool size, and
  the tokens rank 0 sampled;
- the CPU group (gloo): rank 0's per-step control messages (`runner/tp_control.py`).
The last two carry the step timeout, so a hung rank fails the step instead of stalling it forever.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Workers join, load their shard and meet rank 0 at the load barrier within this time.
LOAD_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class TensorParallelState:
    rank: int = 0
    world_size: int = 1
    device_group: dist.ProcessGroup | None = None  # NCCL on GPU, gloo on CPU
    cpu_group: dist.ProcessGroup | None = None  # gloo: control messages from rank 0


_state = TensorParallelState()


def init_tp(state: TensorParallelState) -> None:
    global _state
    _state = state


def tp_rank() -> int:
    return _state.rank


def tp_size() -> int:
    return _state.world_size


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over ranks in place (row-parallel outputs)."""
    if _state.world_size > 1:
        dist.all_reduce(x, group=_state.device_group)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's shard along the last dimension (vocabulary-parallel logits)."""
    if _state.world_size == 1:
        return x
    shards = [torch.empty_like(x) for _ in range(_state.world_size)]
    dist.all_gather(shards, x.contiguous(), group=_state.device_group)
    return torch.cat(shards, dim=-1)


def tp_broadcast(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's `x` on every rank, in place (the tokens rank 0 sampled)."""
    if _state.world_size > 1:
        dist.broadcast(x, src=0, group=_state.device_group)
    return x


def tp_min(value: int, device: torch.device) -> int:
    """The smallest of every rank's `value` (the KV pool size all ranks can hold)."""
    if _state.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=_state.device_group)
    return int(tensor.item())


def abort_device_group() -> None:
    """Abort the device group's communicators: NCCL kernels, graph replays included, that wait for a rank
    which is gone return, and the device group is unusable afterwards."""
    if _state.device_group is not None:
        _state.device_group.abort()


# ---- start-up and tear-down ---------------------------------------------------------------------


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one engine meet: a TCP key-value store at master_addr:master_port, which rank 0
    hosts (unless a torchrun agent already does). local_rank picks the GPU on this rank's machine."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Rendezvous | None:
        """torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK), which Slurm or
        Kubernetes launchers can set the same way; None unless RANK and WORLD_SIZE are both set."""
        if "RANK" not in environ or "WORLD_SIZE" not in environ:
            return None
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
        if missing:
            raise ValueError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} is not")
        return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]), environ["MASTER_ADDR"],
                   int(environ["MASTER_PORT"]), int(environ.get("LOCAL_RANK", "0")))

    def to_env(self) -> dict[str, str]:
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port), "LOCAL_RANK": str(self.local_rank)}


def open_store(rendezvous: Rendezvous) -> dist.TCPStore:
    """Rank 0 hosts the store (port 0: any free port, read back from `.port`); the others connect.
    Under torchrun the agent hosts it and every rank connects (TORCHELASTIC_USE_AGENT_STORE)."""
    hosts = rendezvous.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    return dist.TCPStore(rendezvous.master_addr, rendezvous.master_port, rendezvous.world_size, is_master=hosts,
                         timeout=LOAD_TIMEOUT, wait_for_workers=False)


def join_world(store: dist.Store, rank: int, world_size: int) -> None:
    """The world group (gloo); returns once every rank has joined."""
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=LOAD_TIMEOUT)


def init_tensor_parallel(device: torch.device, timeout: timedelta) -> TensorParallelState:
    """Create the device and CPU groups (every rank, same order) and make them the layers' state."""
    cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    device_group = dist.new_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    state = TensorParallelState(dist.get_rank(), dist.get_world_size(), device_group, cpu_group)
    init_tp(state)
    return state


def shutdown_tensor_parallel(abandoned: bool = False) -> None:
    """Back to one rank: destroy every group. NCCL's tear-down is collective within a machine: every rank
    calls this together, rank 0 right after sending the shutdown message. abandoned: a rank is dead or
    hung, so the device group is aborted first (local), leaving nothing collective to wait for."""
    if abandoned:
        abort_device_group()
    init_tp(TensorParallelState())
    if dist.is_initialized():
        dist.destroy_process_group()

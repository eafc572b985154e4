"""Tensor-parallel state: which rank this process is and the collectives the model layers need.

With one rank every collective is the identity, so single-GPU and CPU code pays nothing.
The tensor-parallel runtime (process groups, control broadcast) sets the state with `init_tp`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelState:
    rank: int = 0
    world_size: int = 1
    device_group: dist.ProcessGroup | None = None  # NCCL on GPU, gloo on CPU


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

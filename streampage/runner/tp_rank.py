"""What every rank of a tensor-parallel engine runs: the start-up handshake, a Worker whose ranks agree
on one pool size, and a ModelRunner whose step rank 0 shares with the others.

Rank 0 (`runner/tp_executor.py`) schedules and samples; ranks > 0 (`runner/tp_worker.py`) replay each
step from rank 0's control message. Every rank issues the same collectives in the same order: the
start-up ones here, then per step the placeholder tokens, the model's all-reduces and the LM head's
gather.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist

from streampage.config import EngineConfig
from streampage.distributed import Rendezvous, init_tensor_parallel, join_world, tp_broadcast, tp_min, tp_rank
from streampage.model.loader import LoadedModel
from streampage.runner.model_runner import CacheMoves, ModelRunner
from streampage.runner.step_inputs import StepInputs
from streampage.runner.tp_control import ControlChannel, Kind, encode
from streampage.runner.worker import Worker, resolve_device


def joined_key(rank: int) -> str:
    """The store key a rank sets once it runs, before it joins the world group (rank 0 watches for it)."""
    return f"streampage/joined/{rank}"


def pin_device(config: EngineConfig) -> EngineConfig:
    """Rank 0's config with `device` resolved, so no rank resolves "auto" differently."""
    return replace(config, model=replace(config.model, device=resolve_device(config.model.device).type))


def join_engine(store: dist.Store, rendezvous: Rendezvous, config: EngineConfig | None) -> RankWorker:
    """Join the world group, take rank 0's config (rank 0 passes it, the others None), create the device
    and CPU groups; returns this rank's worker, not loaded yet."""
    join_world(store, rendezvous.rank, rendezvous.world_size)
    box = [config]
    dist.broadcast_object_list(box, src=0)  # pickled once, at start-up
    config = box[0]
    assert config is not None
    device = resolve_device(config.model.device)
    if device.type == "cuda":
        torch.cuda.set_device(rendezvous.local_rank)
    state = init_tensor_parallel(device, timedelta(seconds=config.parallel.distributed_timeout_s))
    assert state.cpu_group is not None
    return RankWorker(config, ControlChannel(state.cpu_group))


class TensorParallelRunner(ModelRunner):
    """A rank's runner: rank 0 sends each step to the other ranks before running it, and every rank
    takes the placeholders' tokens (sampled by rank 0 in the previous step) from rank 0."""

    def __init__(self, *args, channel: ControlChannel, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.channel = channel

    def execute_step(self, moves: CacheMoves, inputs: StepInputs | None) -> torch.Tensor | None:
        if tp_rank() == 0:
            self.channel.send(encode(Kind.STEP, moves, inputs, self.inputs.mirror))
        return super().execute_step(moves, inputs)

    def _placeholder_tokens(self, inputs: StepInputs) -> torch.Tensor:
        # A device broadcast queued behind rank 0's sampling: no rank's host waits for the tokens.
        if tp_rank() == 0:
            tokens = super()._placeholder_tokens(inputs).long()
        else:
            tokens = torch.empty(len(inputs.placeholders), dtype=torch.int64, device=self.device)
        return tp_broadcast(tokens)


class RankWorker(Worker):
    """A Worker whose ranks load together and keep the smallest pool any of them can hold."""

    def __init__(self, config: EngineConfig, channel: ControlChannel) -> None:
        super().__init__(config)
        self.channel = channel
        self.runner_type = functools.partial(TensorParallelRunner, channel=channel)

    def _num_gpu_blocks(self, loaded: LoadedModel, max_model_len: int, dtype: torch.dtype) -> int:
        # Every rank has its shard loaded before the first device collective (profiling runs the model),
        # so the step timeout never has to cover another rank's loading time.
        dist.barrier()
        return tp_min(super()._num_gpu_blocks(loaded, max_model_len, dtype), self.device)

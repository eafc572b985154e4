"""One worker per tensor-parallel rank: loads its shard of the model, sizes and owns its KV pool, and
runs steps. The engine core talks to rank 0's worker (directly at TP=1)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from streampage.config import ConfigError, EngineConfig, gemv_projections
from streampage.model.demo import ensure_demo_model
from streampage.model.layers import configure_decode_kernels
from streampage.model.loader import LoadedModel, ModelShape, load_model, resolve_dtype
from streampage.runner.cache_engine import CacheEngine, bytes_per_block
from streampage.runner.model_runner import ModelRunner
from streampage.runner.profiling import profile_kv_blocks

log = logging.getLogger(__name__)

CPU_POOL_BYTES = 1 << 30  # the KV pool on a CPU device, unless num_gpu_blocks says otherwise


@dataclass(frozen=True)
class WorkerInfo:
    """What the engine core needs from the loaded model and the sized pool."""

    model_dir: str
    shape: ModelShape
    max_model_len: int
    num_gpu_blocks: int
    num_cpu_blocks: int
    eos_token_ids: list[int]
    vocab_size: int


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible")
    return torch.device(requested)


def resolve_model_dir(model: str) -> Path:
    return Path(model) if model else ensure_demo_model()


def resolve_max_model_len(config: EngineConfig, shape: ModelShape) -> int:
    limit = shape.max_model_len
    requested = config.model.max_model_len
    if requested is None:
        return limit
    if requested > limit:
        raise ConfigError(f"max_model_len={requested} exceeds what the model computes exactly ({limit}: "
                          f"max_position_embeddings or the sliding window)")
    return requested


class Worker:
    # Tensor-parallel ranks (runner/tp_rank.py) build a runner that talks to the other ranks.
    runner_type: Callable[..., ModelRunner] = ModelRunner

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.model.device)
        self.runner: ModelRunner | None = None

    def load(self) -> WorkerInfo:
        config = self.config
        model_dir = resolve_model_dir(config.model.model)
        dtype = resolve_dtype(config.model.dtype, self.device)
        torch.manual_seed(config.model.seed)
        configure_decode_kernels(programmatic_launch=config.runner.programmatic_launch,
                                 gemv_projections=gemv_projections(config.runner.decode_gemv))
        loaded = load_model(model_dir, dtype, self.device)
        max_model_len = resolve_max_model_len(config, loaded.shape)
        num_gpu_blocks = self._num_gpu_blocks(loaded, max_model_len, dtype)
        block_size = config.cache.block_size
        per_block = bytes_per_block(loaded.shape, block_size, dtype)
        num_cpu_blocks = config.cache.num_cpu_blocks
        if num_cpu_blocks is None:
            num_cpu_blocks = int(config.cache.swap_space_gb * (1 << 30)) // per_block
            if self.device.type == "cpu":  # swapping host memory to host memory: keep it small
                num_cpu_blocks = min(num_cpu_blocks, num_gpu_blocks)
        cache = CacheEngine(loaded.shape, block_size, num_gpu_blocks, num_cpu_blocks, dtype, self.device)
        self.runner = self.runner_type(loaded.model, cache, block_size, list(loaded.shape.eos_token_ids),
                                       self.device, max_blocks_per_seq=-(-max_model_len // block_size))
        if self.device.type == "cuda" and not config.runner.enforce_eager:
            max_seqs = config.scheduler.max_num_seqs
            max_batch = config.runner.max_graph_batch_size or max_seqs
            mixed_tokens = min(config.runner.mixed_graph_max_tokens, config.scheduler.max_num_batched_tokens)
            self.runner.capture_graphs(min(max_batch, max_seqs), mixed_tokens, max_seqs,
                                       config.runner.decode_longest_first)
        log.info("KV pool: %d blocks of %d tokens (%.2f GiB), swap space %d blocks", num_gpu_blocks, block_size,
                 num_gpu_blocks * per_block / (1 << 30), num_cpu_blocks)
        return WorkerInfo(str(model_dir), loaded.shape, max_model_len, num_gpu_blocks, num_cpu_blocks,
                          list(loaded.shape.eos_token_ids), loaded.shape.vocab_size)

    def _num_gpu_blocks(self, loaded: LoadedModel, max_model_len: int, dtype: torch.dtype) -> int:
        """This rank's pool size (tensor-parallel ranks then agree on the smallest)."""
        cache = self.config.cache
        if cache.num_gpu_blocks is not None:
            return cache.num_gpu_blocks
        per_block = bytes_per_block(loaded.shape, cache.block_size, dtype)
        if self.device.type == "cuda":
            return profile_kv_blocks(loaded, self.config, per_block, self.device)
        # On CPU: room for every seat at full length, within a fixed memory budget.
        blocks_per_seq = -(-max_model_len // cache.block_size)
        wanted = self.config.scheduler.max_num_seqs * blocks_per_seq
        return max(blocks_per_seq + 1, min(wanted, CPU_POOL_BYTES // per_block))

    def launch(self, out):
        assert self.runner is not None, "load() first"
        return self.runner.launch(out)

    def collect(self, launched):
        assert self.runner is not None, "load() first"
        return self.runner.collect(launched)

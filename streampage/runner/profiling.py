"""Size the KV pool by measurement: weights loaded, one forward at the largest batch the scheduler can
form, then `gpu_memory_utilization * total - (peak activations + weights + memory outside torch)`."""

from __future__ import annotations

import logging

import torch

from streampage.config import EngineConfig
from streampage.kernels import aligned_width
from streampage.model.forward_context import AttentionMetadata, forward_context
from streampage.model.loader import LoadedModel

log = logging.getLogger(__name__)

# Kept back for CUDA graphs, whose private pool holds the largest decode bucket's activations.
GRAPH_RESERVE_BYTES = 512 << 20


@torch.inference_mode()
def profile_peak_bytes(loaded: LoadedModel, config: EngineConfig, device: torch.device) -> int:
    """Peak bytes torch allocates for weights plus one worst-case step (prefill tokens + logits)."""
    shape = loaded.shape
    sched = config.scheduler
    num_tokens = sched.max_num_batched_tokens
    num_seqs = min(sched.max_num_seqs, num_tokens)
    block_size = config.cache.block_size
    pool = torch.zeros((shape.num_layers, 2, 1, block_size, shape.num_kv_heads, shape.head_dim),
                       dtype=shape.dtype, device=device)
    loaded.model.bind_kv_cache(pool)
    # num_seqs whole prompts share the tokens; slot -1 writes nowhere and every table entry is block
    # 0, so attention reads real (if meaningless) memory while the pool stays one block.
    lens = torch.full((num_seqs,), num_tokens // num_seqs, dtype=torch.int32)
    lens[: num_tokens % num_seqs] += 1
    query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(lens, 0)
    width = aligned_width(-(-int(lens.max()) // block_size))
    metadata = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        block_tables=torch.zeros((num_seqs, width), dtype=torch.int32, device=device),
        context_lens=lens.to(device),
        query_start_loc=query_start_loc.to(device),
        is_decode=False,
    )
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    positions = torch.arange(num_tokens, device=device) % shape.max_position_embeddings
    with forward_context(metadata):
        hidden = loaded.model(input_ids, positions)
    logits = loaded.model.compute_logits(hidden[query_start_loc[1:].to(device).long() - 1])
    torch.sort(logits.float(), dim=-1)  # top-p / top-k sort the whole fp32 row: the sampler's worst case
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del hidden, logits, pool
    torch.cuda.empty_cache()
    return peak


def mixed_graph_reserve_bytes(config: EngineConfig, peak_activation_bytes: int, vocab_size: int,
                              itemsize: int) -> int:
    """What the mixed-step graphs keep for good in their pool: the activations of their largest bucket
    (the profiled step's, scaled by its share of the step's tokens) and its logits rows
    (min(tokens, max_num_seqs) x vocab)."""
    tokens = min(config.runner.mixed_graph_max_tokens, config.scheduler.max_num_batched_tokens)
    if not tokens:
        return 0
    share = tokens / config.scheduler.max_num_batched_tokens
    rows = min(tokens, config.scheduler.max_num_seqs)
    return int(peak_activation_bytes * share) + rows * vocab_size * itemsize


def profile_kv_blocks(loaded: LoadedModel, config: EngineConfig, bytes_per_block: int, device: torch.device) -> int:
    weights = torch.cuda.memory_allocated(device)
    peak = profile_peak_bytes(loaded, config, device)
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = total - free - torch.cuda.memory_reserved(device)  # CUDA context, other processes
    graphs = GRAPH_RESERVE_BYTES + mixed_graph_reserve_bytes(config, peak - weights, loaded.shape.vocab_size,
                                                             loaded.shape.dtype.itemsize)
    budget = int(total * config.cache.gpu_memory_utilization) - peak - outside_torch - graphs
    blocks = budget // bytes_per_block
    log.info("memory profile: total %.1f GiB, peak torch %.2f GiB, outside torch %.2f GiB -> %d KV blocks",
             total / (1 << 30), peak / (1 << 30), outside_torch / (1 << 30), blocks)
    if blocks < 1:
        raise RuntimeError(f"no GPU memory left for the KV cache (budget {budget / (1 << 30):.2f} GiB); raise "
                           f"gpu_memory_utilization or lower max_num_batched_tokens")
    return blocks

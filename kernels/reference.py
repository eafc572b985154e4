"""Plain PyTorch versions of the paged KV operations: the CPU attention path and the kernels' oracle.

Shapes (NHD layout, one pool per rank):
    k_cache, v_cache : [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables     : [num_seqs, max_blocks_per_seq] int32; row i maps logical block j -> physical block
    context_lens     : [num_seqs] int32; tokens of sequence i in the cache *after* this step's write
    slot_mapping     : [num_tokens] int64; physical slot (block * block_size + offset) or -1 = write nowhere
    query_start_loc  : [num_seqs + 1] int32; the new tokens of sequence i are rows
                       query_start_loc[i]:query_start_loc[i+1] of q; they sit at the *last* positions of
                       the sequence's context (positions context_len - q_len .. context_len - 1).
Queries may attend to every cached key of their sequence up to and including their own position.
"""

from __future__ import annotations

import torch


def store_kvcache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write row t of key/value ([num_tokens, kv_heads, head_dim]) to slot slot_mapping[t]; -1 skips."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = key[valid].to(k_cache.dtype)
    v_cache[blocks, offsets] = value[valid].to(v_cache.dtype)


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` K and V rows of one sequence, contiguous: [length, kv_heads, head_dim]."""
    block_size = k_cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    k = k_cache[blocks].flatten(0, 1)[:length]
    v = v_cache[blocks].flatten(0, 1)[:length]
    return k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q ([q_len, q_heads, d]) over k/v ([kv_len, kv_heads, d]), queries at the end."""
    q_len, q_heads, _ = q.shape
    kv_len, kv_heads, _ = k.shape
    group = q_heads // kv_heads
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
    k_pos = torch.arange(kv_len, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def paged_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """One query per sequence (q: [num_seqs, q_heads, head_dim]). Rows with context_len 0 give zeros."""
    out = torch.zeros_like(q)
    for i, length in enumerate(context_lens.tolist()):
        if length == 0:
            continue
        k, v = gather_kv(k_cache, v_cache, block_tables[i], length)
        out[i] = _attend(q[i : i + 1], k, v, scale)[0]
    return out


def paged_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Causal attention for ragged query chunks (q: [num_tokens, q_heads, head_dim]) over the pool."""
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for i, length in enumerate(context_lens.tolist()):
        begin, end = starts[i], starts[i + 1]
        if end == begin:
            continue
        k, v = gather_kv(k_cache, v_cache, block_tables[i], length)
        out[begin:end] = _attend(q[begin:end], k, v, scale)
    return out


def copy_blocks(kv_pool: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Copy-on-write for every layer at once.

    kv_pool: [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]; block_mapping: [n, 2] int64
    (src, dst) pairs. Destinations are distinct and never a source of the same call.
    """
    if block_mapping.numel() == 0:
        return
    src, dst = block_mapping[:, 0].long(), block_mapping[:, 1].long()
    kv_pool[:, :, dst] = kv_pool[:, :, src]

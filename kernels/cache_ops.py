"""Triton kernels that write and copy paged KV: `store_kvcache` and `copy_blocks`.

Semantics are those of `streampage.kernels.reference`; layouts are in its docstring. Offsets into the
pool are computed in int64: a pool can hold more than 2^31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host_math import cdiv, next_power_of_2


@triton.jit
def _store_kvcache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_key_t, stride_key_h, stride_value_t, stride_value_h,
    stride_kc_b, stride_kc_t, stride_kc_h, stride_vc_b, stride_vc_t, stride_vc_h,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token)
    if slot < 0:  # padding row: write nowhere
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM)

    k = tl.load(key_ptr + token * stride_key_t + heads * stride_key_h + dims, mask=mask)
    k_dst = k_cache_ptr + block * stride_kc_b + offset * stride_kc_t + heads * stride_kc_h + dims
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(value_ptr + token * stride_value_t + heads * stride_value_h + dims, mask=mask)
    v_dst = v_cache_ptr + block * stride_vc_b + offset * stride_vc_t + heads * stride_vc_h + dims
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write row t of key/value ([num_tokens, kv_heads, head_dim]) to slot slot_mapping[t]; -1 skips.

    key/value may be strided views (e.g. slices of a fused QKV projection) as long as head_dim is
    contiguous. The launch depends only on shapes, so it is safe inside a CUDA graph.
    """
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    for name, t in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"store_kvcache: {name} needs a contiguous head_dim, got strides {t.stride()}")
    _store_kvcache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_heads, HEADS_PAD=next_power_of_2(num_heads),
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
    )


# Elements copied per program of copy_blocks: one block of one layer's K or V is block_size * kv_heads *
# head_dim elements (16 * 8 * 128 = 16384 for Llama-3-8B), so a block spans a few programs.
_COPY_CHUNK = 4096


@triton.jit
def _copy_blocks_kernel(
    pool_ptr, mapping_ptr, stride_layer, stride_kv, stride_block, block_numel,
    CHUNK: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    layer_kv = tl.program_id(1)
    chunk = tl.program_id(2).to(tl.int64)
    src = tl.load(mapping_ptr + 2 * pair)
    dst = tl.load(mapping_ptr + 2 * pair + 1)
    base = (layer_kv // 2).to(tl.int64) * stride_layer + (layer_kv % 2).to(tl.int64) * stride_kv
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_numel
    data = tl.load(pool_ptr + base + src * stride_block + offs, mask=mask)
    tl.store(pool_ptr + base + dst * stride_block + offs, data, mask=mask)


def copy_blocks(kv_pool: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Copy-on-write for every layer in one launch.

    kv_pool: [num_layers, 2, num_blocks, block_size, kv_heads, head_dim], each block contiguous;
    block_mapping: [n, 2] int64 (src, dst) on the pool's device. Destinations are distinct and never a
    source of the same call, so programs never race.
    """
    num_pairs = block_mapping.shape[0]
    if num_pairs == 0:
        return
    num_layers = kv_pool.shape[0]
    block_numel = kv_pool[0, 0, 0].numel()
    if not kv_pool[0, 0, 0].is_contiguous():
        raise ValueError(f"copy_blocks: each block must be contiguous, got pool strides {kv_pool.stride()}")
    mapping = block_mapping.to(torch.int64).contiguous()
    grid = (num_pairs, num_layers * 2, cdiv(block_numel, _COPY_CHUNK))
    _copy_blocks_kernel[grid](
        kv_pool, mapping, kv_pool.stride(0), kv_pool.stride(1), kv_pool.stride(2), block_numel,
        CHUNK=_COPY_CHUNK,
    )

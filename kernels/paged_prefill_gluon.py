"""`paged_prefill` for Hopper in Gluon (`PrefillConfig(gluon=True)`): the softmax of one key tile
runs while the tensor cores compute P @ V of the one before.

The Triton kernel (`paged_attention._prefill_kernel`) waits for each Q @ K^T MMA right after issuing
it and runs the softmax with the tensor cores idle, so a tile costs its MMAs plus its softmax, one
after the other (docs/kernels.md). Gluon lets the kernel say when to wait. Per key tile j, holding
P_j (the softmax of S_j = Q K_j^T):

    wait for tile j+1's K/V copies (one CTA barrier)
    issue S_{j+1} and O += P_j @ V_j; refill the ring stage tile j-1 used with tile j + STAGES - 1
    wait for S_{j+1} only (MMAs finish in order); softmax of S_{j+1} while P_j @ V_j runs
    wait for P_j @ V_j; rescale O by the new running max

Every MMA is waited for within the iteration that issued it. That is not only tidy: ptxas serialises
all of a kernel's MMAs (each one waited for as it is issued, info C7514/C7518) if an MMA's registers
may be read or copied while it is in flight, which an MMA carried across the loop's back edge, or
around a branch, causes. K/V pages are gathered by `cp.async` (16 bytes a thread a row chunk) into
a ring of STAGES NVMMA-swizzled shared buffers; page numbers are read one tile before their copies
are issued. Q stays in shared memory for every MMA.

Same contract as the Triton kernel (grid from tensor shapes only, tiles numbered across the batch
from the end, query rows = tokens x the group's heads), for 16-bit caches with head_dim 64 or 128 on
Hopper GPUs: 64-row programs of one warpgroup or 128-row programs of two. Rows past a chunk read a
valid row and are never stored; keys past the last position read the last key and are masked out,
so no copy depends on zero-filling. `_prefill_kernel_ws` (below) is the warp-specialised form.

Gluon is experimental and its API moves between Triton releases: `_gather_to_shared` and `_cta_barrier`
absorb the renames between Triton 3.6 (the H200's) and 3.9 (CI's); tests/sm90_ptx.py compiles the kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .paged_attention import is_hopper

if TYPE_CHECKING:
    from .paged_attention import PrefillConfig

# Names that moved between Triton 3.6 and 3.9: cp.async from a pointer tensor into shared memory
# (`async_copy_global_to_shared`, later `async_load`; the old name raises), and the CTA barrier
# (`thread_barrier`, later `barrier`).
_gather_to_shared = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

# (query rows per program, warps): one warpgroup of 64 rows, or two of 64 rows each. Two 64-row
# programs fit an SM with 64-key tiles (112 KB of shared memory and up to 255 registers a thread
# each), so one program's softmax can run while the other's MMAs do, with no barrier tying them.
SHAPES = ((64, 4), (128, 8))
GATHER_WARPS = (0, 4)  # warps of the gathering partition (0: none, the softmax warps gather)
GATHER_REGS = 48  # registers a gathering thread keeps (setmaxnreg); the softmax warps get the rest
SOFTMAX_REGS = 232  # registers of the second softmax warpgroup (a worker partition)


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _tile_owner(query_start_loc_ptr, num_seqs, tile_id, TOKENS: gl.constexpr, SEQS_POW2: gl.constexpr,
                NUM_WARPS: gl.constexpr):
    """`paged_attention._tile_owner` in Gluon: the sequence owning batch tile `tile_id` and the
    tile's index within it (num_seqs for a tile past the batch)."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
    seqs = gl.arange(0, SEQS_POW2, layout=layout)
    in_batch = seqs < num_seqs
    starts = gl.load(query_start_loc_ptr + seqs, mask=in_batch, other=0)
    ends = gl.load(query_start_loc_ptr + seqs + 1, mask=in_batch, other=0)
    tiles = (ends - starts + TOKENS - 1) // TOKENS
    through = gl.associative_scan(tiles, 0, _add)  # tiles of sequences 0..i
    seq = gl.sum((through <= tile_id).to(gl.int32), 0)
    first = gl.sum(gl.where(seqs == seq, through - tiles, 0), 0)
    return seq, tile_id - first


@gluon.jit
def _tile_pages(block_table, tile, hi, keys, BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr):
    """The page of each key of a tile; keys at or past hi stand for key hi - 1."""
    return gl.load(block_table + gl.minimum(tile * BLOCK_N + keys, hi - 1) // BLOCK_SIZE)


@gluon.jit
def _row_offsets(pages, tile, hi, keys, kv_head, stride_b, stride_t, stride_h, BLOCK_N: gl.constexpr,
                 BLOCK_SIZE: gl.constexpr):
    """Element offsets of a key tile's rows for one KV head, from `_tile_pages`."""
    key = gl.minimum(tile * BLOCK_N + keys, hi - 1)
    return pages.to(gl.int64) * stride_b + (key % BLOCK_SIZE) * stride_t + kv_head * stride_h


@gluon.jit
def _gather_tile(k_dst, v_dst, k_ptr, v_ptr, pages, tile, hi, keys, dims, kv_head,
                 stride_k_b, stride_k_t, stride_k_h, stride_v_b, stride_v_t, stride_v_h,
                 BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr, SAME_KV_LAYOUT: gl.constexpr):
    """Start the copies of a key tile's K and V rows into one ring stage (the caller commits them as
    a group or has an mbarrier track them)."""
    k_rows = _row_offsets(pages, tile, hi, keys, kv_head, stride_k_b, stride_k_t, stride_k_h, BLOCK_N, BLOCK_SIZE)
    if SAME_KV_LAYOUT:
        v_rows = k_rows
    else:
        v_rows = _row_offsets(pages, tile, hi, keys, kv_head, stride_v_b, stride_v_t, stride_v_h, BLOCK_N,
                              BLOCK_SIZE)
    _gather_to_shared(k_dst, k_ptr + k_rows[:, None] + dims[None, :])
    _gather_to_shared(v_dst, v_ptr + v_rows[:, None] + dims[None, :])


@gluon.jit
def _chunk_tile(query_start_loc_ptr, context_lens_ptr, seq, tile, TOKENS: gl.constexpr, BLOCK_N: gl.constexpr):
    """Where a program's tile lies: (first query row of the chunk, chunk length, context length, the
    tile's first token in the chunk, that token's position, keys 0..hi-1 visible to some row, key
    tiles to read: at least 1, since a tile that exists holds a query)."""
    q_begin = gl.load(query_start_loc_ptr + seq)
    q_len = gl.load(query_start_loc_ptr + seq + 1) - q_begin
    context_len = gl.load(context_lens_ptr + seq)
    tile_token = tile * TOKENS
    first_pos = context_len - q_len + tile_token  # the chunk holds the context's last q_len positions
    hi = gl.minimum(first_pos + TOKENS, context_len)
    return q_begin, q_len, context_len, tile_token, first_pos, hi, (hi + BLOCK_N - 1) // BLOCK_N


@gluon.jit
def _gather_q(q_smem, q_ptr, q_begin, q_len, tile_token, kv_head, stride_q_t, stride_q_h, GROUP: gl.constexpr,
              GROUP_PAD: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, copy_l: gl.constexpr):
    """Start the copy of the tile's Q rows: row r is token tile_token + r // GROUP_PAD, head
    kv_head * GROUP + r % GROUP_PAD; padding rows read the chunk's last token and the group's last
    head (finite, never stored)."""
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, copy_l))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, copy_l))
    token = gl.minimum(tile_token + rows // GROUP_PAD, q_len - 1)
    head = kv_head * GROUP + gl.minimum(rows % GROUP_PAD, GROUP - 1)
    q_rows = (q_begin + token).to(gl.int64) * stride_q_t + head * stride_q_h
    _gather_to_shared(q_smem, q_ptr + q_rows[:, None] + dims[None, :])


@gluon.jit
def _store_rows(out, row_sum, out_ptr, q_begin, q_len, tile_token, kv_head, stride_o_t, stride_o_h,
                GROUP: gl.constexpr, GROUP_PAD: gl.constexpr, ROW0: gl.constexpr, BLOCK_M: gl.constexpr,
                HEAD_DIM: gl.constexpr, o_l: gl.constexpr):
    """Normalise and store the tile's rows ROW0..ROW0+BLOCK_M-1 that hold real (token, head) pairs."""
    o_rows = ROW0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_l))
    o_dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_l))
    o_token = tile_token + o_rows // GROUP_PAD
    keep = (o_token < q_len) & (o_rows % GROUP_PAD < GROUP)
    o_off = (q_begin + o_token).to(gl.int64) * stride_o_t + (kv_head * GROUP + o_rows % GROUP_PAD) * stride_o_h
    result = out / gl.convert_layout(row_sum, gl.SliceLayout(1, o_l))[:, None]
    gl.store(out_ptr + o_off[:, None] + o_dims[None, :], result.to(out_ptr.dtype.element_ty), mask=keep[:, None])


@gluon.jit
def _softmax_tile(s, j, m, row_sum, q_pos, key_cols, qk_scale, BLOCK_N: gl.constexpr, MASK: gl.constexpr):
    """Online-softmax step for the scores s of key tile j, keys past a row's position masked when MASK
    (tiles at the diagonal). Returns P (unnormalised), the new running max and sum, and alpha, the
    factor that rescales what was accumulated before."""
    if MASK:
        s = gl.where(j * BLOCK_N + key_cols[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = gl.maximum(m, gl.max(s, axis=1) * qk_scale)  # every row sees key 0: finite from tile 0 on
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m - m_new)
    return p, m_new, row_sum * alpha + gl.sum(p, axis=1), alpha


@gluon.jit
def _issue_tile_mmas(j, p, acc, q_smem, k_smem, v_smem, no_scores, STAGES: gl.constexpr, p_l: gl.constexpr):
    """Issue S_{j+1} = Q K_{j+1}^T, then O + P_j @ V_j (MMAs finish in the order they are issued)."""
    s_next = warpgroup_mma(q_smem, k_smem.index((j + 1) % STAGES).permute((1, 0)), no_scores, use_acc=False,
                           is_async=True)
    pv = warpgroup_mma(gl.convert_layout(p.to(q_smem.dtype), p_l), v_smem.index(j % STAGES), acc, is_async=True)
    return s_next, pv


@gluon.jit
def _finish_tile(s_next, pv, j, m, row_sum, q_pos, key_cols, qk_scale, BLOCK_N: gl.constexpr, MASK: gl.constexpr,
                 o_l: gl.constexpr):
    """Wait for S_{j+1} alone and run its softmax while P_j @ V_j may still run; then wait for that
    and rescale O. Returns P_{j+1}, O and the running max and sum."""
    s = warpgroup_mma_wait(1, deps=[s_next])
    p, m, row_sum, alpha = _softmax_tile(s, j + 1, m, row_sum, q_pos, key_cols, qk_scale, BLOCK_N, MASK)
    acc = warpgroup_mma_wait(0, deps=[pv]) * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
    return p, acc, m, row_sum


@gluon.jit
def _pipelined_tile(j, p, acc, m, row_sum, pages_next, q_smem, k_smem, v_smem, no_scores, q_pos, key_cols,
                    k_ptr, v_ptr, block_table, hi, keys, dims, kv_head, qk_scale,
                    stride_k_b, stride_k_t, stride_k_h, stride_v_b, stride_v_t, stride_v_h,
                    BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr, STAGES: gl.constexpr,
                    SAME_KV_LAYOUT: gl.constexpr, MASK: gl.constexpr, p_l: gl.constexpr, o_l: gl.constexpr):
    """Iteration j, holding P_j: S_{j+1} and P_j @ V_j go to the tensor cores together, the ring stage
    of tile j-1 is refilled, and the softmax of S_{j+1} (masked when MASK) runs while P_j @ V_j does.
    Both MMAs are waited for before it returns. Returns P_{j+1} and the updated state."""
    # Tile j+1's copies have landed once at most STAGES - 3 newer groups are pending; after the
    # barrier every warp is past iteration j-1's last wait, so tile j-1's stage is free.
    async_copy.wait_group(STAGES - 3)
    _cta_barrier()
    fence_async_shared()
    s_next, pv = _issue_tile_mmas(j, p, acc, q_smem, k_smem, v_smem, no_scores, STAGES, p_l)
    refill = (j + STAGES - 1) % STAGES
    _gather_tile(k_smem.index(refill), v_smem.index(refill), k_ptr, v_ptr, pages_next, j + STAGES - 1, hi,
                 keys, dims, kv_head, stride_k_b, stride_k_t, stride_k_h, stride_v_b, stride_v_t, stride_v_h,
                 BLOCK_N, BLOCK_SIZE, SAME_KV_LAYOUT)
    async_copy.commit_group()
    pages_next = _tile_pages(block_table, j + STAGES, hi, keys, BLOCK_N, BLOCK_SIZE)
    p, acc, m, row_sum = _finish_tile(s_next, pv, j, m, row_sum, q_pos, key_cols, qk_scale, BLOCK_N, MASK, o_l)
    return p, acc, m, row_sum, pages_next


@gluon.jit(do_not_specialize=["num_seqs"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, query_start_loc_ptr, context_lens_ptr, out_ptr,
    qk_scale, num_seqs,
    stride_q_t, stride_q_h, stride_k_b, stride_k_t, stride_k_h, stride_v_b, stride_v_t, stride_v_h,
    stride_bt_s, stride_o_t, stride_o_h,
    GROUP: gl.constexpr, GROUP_PAD: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_SIZE: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SEQS_POW2: gl.constexpr,
    SAME_KV_LAYOUT: gl.constexpr, NUM_WARPS: gl.constexpr,
):
    TOKENS: gl.constexpr = BLOCK_M // GROUP_PAD
    dtype: gl.constexpr = k_ptr.dtype.element_ty
    # Copies: each thread moves 8 contiguous elements (16 bytes) of a row.
    copy_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [NUM_WARPS, 1], [1, 0])
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, HEAD_DIM, 16])
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)

    kv_head = gl.program_id(0)
    seq, tile = _tile_owner(query_start_loc_ptr, num_seqs, gl.num_programs(1) - 1 - gl.program_id(1), TOKENS,
                            SEQS_POW2, NUM_WARPS)
    if seq >= num_seqs:
        return
    q_begin, q_len, context_len, tile_token, first_pos, hi, num_tiles = _chunk_tile(
        query_start_loc_ptr, context_lens_ptr, seq, tile, TOKENS, BLOCK_N)
    block_table = block_tables_ptr + seq.to(gl.int64) * stride_bt_s

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_sl)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_sl)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_sl)

    _gather_q(q_smem, q_ptr, q_begin, q_len, tile_token, kv_head, stride_q_t, stride_q_h, GROUP, GROUP_PAD,
              BLOCK_M, HEAD_DIM, copy_l)
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, copy_l))

    # The ring: tiles 0..STAGES-2 in flight (Q in the first group), page numbers of the next ready.
    keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, copy_l))
    for t in gl.static_range(STAGES - 1):
        _gather_tile(k_smem.index(t), v_smem.index(t), k_ptr, v_ptr,
                     _tile_pages(block_table, t, hi, keys, BLOCK_N, BLOCK_SIZE), t, hi, keys, dims, kv_head,
                     stride_k_b, stride_k_t, stride_k_h, stride_v_b, stride_v_t, stride_v_h,
                     BLOCK_N, BLOCK_SIZE, SAME_KV_LAYOUT)
        async_copy.commit_group()
    pages_next = _tile_pages(block_table, STAGES - 1, hi, keys, BLOCK_N, BLOCK_SIZE)

    # Scores are in base 2 (qk_scale = softmax scale x log2 e), m in scaled units.
    q_pos = context_len - q_len + tile_token + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_l)) // GROUP_PAD
    key_cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_l))
    m = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_l))
    row_sum = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_l))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_l)
    no_scores = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_l)

    async_copy.wait_group(STAGES - 2)  # Q and tile 0
    _cta_barrier()
    fence_async_shared()
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), no_scores, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=[s])
    p, m, row_sum, _ = _softmax_tile(s, 0, m, row_sum, q_pos, key_cols, qk_scale, BLOCK_N, True)
    # Every MMA is waited for within the iteration that issued it (see the module docstring). Tiles
    # below full_tiles are visible to every row of the program and go unmasked; the rest, at the
    # diagonal, are masked.
    full_tiles = (first_pos + 1) // BLOCK_N
    for j in range(0, full_tiles - 1):
        p, acc, m, row_sum, pages_next = _pipelined_tile(
            j, p, acc, m, row_sum, pages_next, q_smem, k_smem, v_smem, no_scores, q_pos, key_cols,
            k_ptr, v_ptr, block_table, hi, keys, dims, kv_head, qk_scale,
            stride_k_b, stride_k_t, stride_k_h, stride_v_b, stride_v_t, stride_v_h,
            BLOCK_N, BLOCK_SIZE, STAGES, SAME_KV_LAYOUT, False, p_l, o_l)
    for j in range(gl.maximum(full_tiles - 1, 0), num_tiles - 1):
        p, acc, m, row_sum, pages_next = _pipelined_tile(
            j, p, acc, m, row_sum, pages_next, q_smem, k_smem, v_smem, no_scores, q_pos, key_cols,
            k_ptr, v_ptr, block_table, hi, keys, dims, kv_head, qk_scale,
            stride_k_b, stride_k_t, stride_k_h, stride_v_b, stride_v_t, stride_v_h,
            BLOCK_N, BLOCK_SIZE, STAGES, SAME_KV_LAYOUT, True, p_l, o_l)
    last = num_tiles - 1
    async_copy.wait_group(0)  # the ring's last copies, before the program exits
    _cta_barrier()
    fence_async_shared()
    pv = warpgroup_mma(gl.convert_layout(p.to(dtype), p_l), v_smem.index(last % STAGES), acc, is_async=True)
    out = warpgroup_mma_wait(0, deps=[pv])
    _store_rows(out, row_sum, out_ptr, q_begin, q_len, tile_token, kv_head, stride_o_t, stride_o_h, GROUP, GROUP_PAD,
                0, BLOCK_M, HEAD_DIM, o_l)


# ---- Warp-specialised variant (`PrefillConfig(gluon=True, gather_warps=N)`) -------------------------
# The 8 softmax warps issue only MMAs and the softmax; N more warps gather K/V pages (and Q) with
# cp.async into the ring and signal each stage on an mbarrier (`ready`, one arrival per gathering
# thread when its copies land); the softmax warps hand a stage back on another (`empty`, one arrival)
# once both MMAs that read it are done. No CTA-wide barrier in the loop.


@gluon.jit
def _ws_gather(q_ptr, k_ptr, v_ptr, block_table, q_smem, k_smem, v_smem, bars, q_begin, q_len, tile_token,
               kv_head, hi, num_tiles, stride_q_t, stride_q_h, stride_k_b, stride_k_t, stride_k_h,
               stride_v_b, stride_v_t, stride_v_h,
               GROUP: gl.constexpr, GROUP_PAD: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_SIZE: gl.constexpr,
               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SAME_KV_LAYOUT: gl.constexpr,
               GATHER_WARPS: gl.constexpr):
    """The gathering partition: Q once, then key tile t into ring stage t % STAGES as soon as the
    softmax warps have released that stage's previous tile."""
    copy_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [GATHER_WARPS, 1],
                                            [1, 0])
    _gather_q(q_smem, q_ptr, q_begin, q_len, tile_token, kv_head, stride_q_t, stride_q_h, GROUP, GROUP_PAD,
              BLOCK_M, HEAD_DIM, copy_l)
    async_copy.mbarrier_arrive(bars.index(2 * STAGES), increment_count=False)
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, copy_l))
    keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, copy_l))
    for t in range(num_tiles):
        stage = t % STAGES
        # Round r of a stage waits for the release of round r - 1's tile (phase (r - 1) & 1).
        mbarrier.wait(bars.index(STAGES + stage), (t // STAGES + 1) & 1, pred=t >= STAGES)
        _gather_tile(k_smem.index(stage), v_smem.index(stage), k_ptr, v_ptr,
                     _tile_pages(block_table, t, hi, keys, BLOCK_N, BLOCK_SIZE), t, hi, keys, dims, kv_head,
                     stride_k_b, stride_k_t, stride_k_h, stride_v_b, stride_v_t, stride_v_h,
                     BLOCK_N, BLOCK_SIZE, SAME_KV_LAYOUT)
        async_copy.mbarrier_arrive(bars.index(stage), increment_count=False)


@gluon.jit
def _ws_tile(j, p, acc, m, row_sum, q_smem, k_smem, v_smem, bars, no_scores, q_pos, qk_scale,
             BLOCK_N: gl.constexpr, STAGES: gl.constexpr, MASK: gl.constexpr, s_l: gl.constexpr,
             p_l: gl.constexpr, o_l: gl.constexpr):
    """`_pipelined_tile` for the softmax partition: tile j+1 is waited for on its stage's mbarrier,
    and tile j's stage is released once P_j @ V_j is done."""
    mbarrier.wait(bars.index((j + 1) % STAGES), ((j + 1) // STAGES) & 1)
    fence_async_shared()
    s_next, pv = _issue_tile_mmas(j, p, acc, q_smem, k_smem, v_smem, no_scores, STAGES, p_l)
    key_cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_l))
    p, acc, m, row_sum = _finish_tile(s_next, pv, j, m, row_sum, q_pos, key_cols, qk_scale, BLOCK_N, MASK, o_l)
    mbarrier.arrive(bars.index(STAGES + j % STAGES))
    return p, acc, m, row_sum


@gluon.jit
def _ws_softmax(q_all, k_smem, v_smem, bars, out_ptr, q_begin, q_len, tile_token, kv_head, context_len,
                first_pos, num_tiles, qk_scale, stride_o_t, stride_o_h,
                GROUP: gl.constexpr, GROUP_PAD: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr, ROW0: gl.constexpr):
    """A softmax partition: one warpgroup, the tile's 64 rows from ROW0, the loop of `_prefill_kernel`
    without copies. The two warpgroups run as partitions of their own, tied by no barrier, so one's
    softmax can run while the other's MMAs do."""
    BLOCK_M: gl.constexpr = 64
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    q_smem = q_all.slice(ROW0, BLOCK_M)
    rows = ROW0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_l))
    q_pos = context_len - q_len + tile_token + rows // GROUP_PAD
    m = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_l))
    row_sum = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_l))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_l)
    no_scores = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_l)

    mbarrier.wait(bars.index(2 * STAGES), 0)  # Q
    mbarrier.wait(bars.index(0), 0)  # tile 0
    fence_async_shared()
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), no_scores, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=[s])
    key_cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_l))
    p, m, row_sum, _ = _softmax_tile(s, 0, m, row_sum, q_pos, key_cols, qk_scale, BLOCK_N, True)
    full_tiles = (first_pos + 1) // BLOCK_N
    for j in range(0, full_tiles - 1):
        p, acc, m, row_sum = _ws_tile(j, p, acc, m, row_sum, q_smem, k_smem, v_smem, bars, no_scores, q_pos,
                                      qk_scale, BLOCK_N, STAGES, False, s_l, p_l, o_l)
    for j in range(gl.maximum(full_tiles - 1, 0), num_tiles - 1):
        p, acc, m, row_sum = _ws_tile(j, p, acc, m, row_sum, q_smem, k_smem, v_smem, bars, no_scores, q_pos,
                                      qk_scale, BLOCK_N, STAGES, True, s_l, p_l, o_l)
    pv = warpgroup_mma(gl.convert_layout(p.to(q_smem.dtype), p_l), v_smem.index((num_tiles - 1) % STAGES), acc,
                       is_async=True)
    out = warpgroup_mma_wait(0, deps=[pv])
    _store_rows(out, row_sum, out_ptr, q_begin, q_len, tile_token, kv_head, stride_o_t, stride_o_h, GROUP, GROUP_PAD,
                ROW0, BLOCK_M, HEAD_DIM, o_l)


@gluon.jit(do_not_specialize=["num_seqs"])
def _prefill_kernel_ws(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, query_start_loc_ptr, context_lens_ptr, out_ptr,
    qk_scale, num_seqs,
    stride_q_t, stride_q_h, stride_k_b, stride_k_t, stride_k_h, stride_v_b, stride_v_t, stride_v_h,
    stride_bt_s, stride_o_t, stride_o_h,
    GROUP: gl.constexpr, GROUP_PAD: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_SIZE: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SEQS_POW2: gl.constexpr,
    SAME_KV_LAYOUT: gl.constexpr, NUM_WARPS: gl.constexpr, GATHER_WARPS: gl.constexpr, GATHER_REGS: gl.constexpr,
    SOFTMAX_REGS: gl.constexpr,
):
    TOKENS: gl.constexpr = BLOCK_M // GROUP_PAD
    dtype: gl.constexpr = k_ptr.dtype.element_ty
    kv_head = gl.program_id(0)
    seq, tile = _tile_owner(query_start_loc_ptr, num_seqs, gl.num_programs(1) - 1 - gl.program_id(1), TOKENS,
                            SEQS_POW2, NUM_WARPS)
    if seq >= num_seqs:
        return
    q_begin, q_len, context_len, tile_token, first_pos, hi, num_tiles = _chunk_tile(
        query_start_loc_ptr, context_lens_ptr, seq, tile, TOKENS, BLOCK_N)
    block_table = block_tables_ptr + seq.to(gl.int64) * stride_bt_s

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype))
    kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_sl)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_sl)
    # Barriers: ready[0..STAGES-1], empty[STAGES..2*STAGES-1], then Q's.
    bars = gl.allocate_shared_memory(gl.int64, [2 * STAGES + 1, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=GATHER_WARPS * 32)
        mbarrier.init(bars.index(STAGES + i), count=2)  # one arrival per softmax warpgroup
    mbarrier.init(bars.index(2 * STAGES), count=GATHER_WARPS * 32)
    fence_async_shared()

    gl.warp_specialize([
        (_ws_softmax, (q_smem, k_smem, v_smem, bars, out_ptr, q_begin, q_len, tile_token, kv_head, context_len,
                       first_pos, num_tiles, qk_scale, stride_o_t, stride_o_h, GROUP, GROUP_PAD, HEAD_DIM, BLOCK_N,
                       STAGES, 0)),
        (_ws_softmax, (q_smem, k_smem, v_smem, bars, out_ptr, q_begin, q_len, tile_token, kv_head, context_len,
                       first_pos, num_tiles, qk_scale, stride_o_t, stride_o_h, GROUP, GROUP_PAD, HEAD_DIM, BLOCK_N,
                       STAGES, 64)),
        (_ws_gather, (q_ptr, k_ptr, v_ptr, block_table, q_smem, k_smem, v_smem, bars, q_begin, q_len, tile_token,
                      kv_head, hi, num_tiles, stride_q_t, stride_q_h, stride_k_b, stride_k_t, stride_k_h,
                      stride_v_b, stride_v_t, stride_v_h,
                      GROUP, GROUP_PAD, HEAD_DIM, BLOCK_SIZE, BLOCK_M, BLOCK_N, STAGES, SAME_KV_LAYOUT,
                      GATHER_WARPS)),
    ], [4, GATHER_WARPS], [SOFTMAX_REGS, GATHER_REGS])


def gluon_prefill_unsupported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group_pad: int,
                              config: PrefillConfig) -> str | None:
    """Why this kernel cannot run `config` on these tensors, or None: (128 rows, 8 warps) or (64 rows,
    4 warps), at least 3 stages (two key tiles in flight), gathering warps only with 128 rows, no
    q_in_registers or maxnreg; a Hopper GPU; q and the caches in one 16-bit dtype; head_dim 64 or
    128; a group that fits a tile; rows that cp.async can move 16 bytes at a time (contiguous
    head_dim, strides and base addresses in 16-byte units)."""
    if ((config.block_m, config.num_warps) not in SHAPES or config.num_stages < 3 or config.q_in_registers
            or config.maxnreg or config.gather_warps not in GATHER_WARPS):
        return (f"needs (block_m, num_warps) in {SHAPES}, at least 3 stages and gather_warps in {GATHER_WARPS}, "
                f"without q_in_registers or maxnreg, got {config}")
    if config.gather_warps and config.block_m != 128:
        return f"gathers with its own warps only for 128 rows (two softmax warpgroups), got {config}"
    if not is_hopper(q.device):
        return "needs a Hopper GPU (compute capability 9.x)"
    if k_cache.dtype not in (torch.float16, torch.bfloat16) or q.dtype != k_cache.dtype:
        return f"needs q and the caches in one 16-bit float dtype, got {q.dtype} and {k_cache.dtype}"
    if q.shape[-1] not in (64, 128):
        return f"needs head_dim 64 or 128, got {q.shape[-1]}"
    if group_pad > config.block_m:
        return f"needs at most {config.block_m} query heads per KV head, got {group_pad}"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1 or any(s % 8 for s in t.stride()[:-1]) or t.data_ptr() % 16:
            return f"needs {name} rows in 16-byte units, got strides {t.stride()}"
    return None


def paged_prefill_gluon(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, context_lens: torch.Tensor, qk_scale: float, out: torch.Tensor,
    config: PrefillConfig, *, group: int, group_pad: int, tiles: int, seqs_pow2: int,
) -> None:
    """Launch the kernel over grid (kv_heads, tiles) as `paged_attention.paged_prefill` sizes it, with
    `config`'s key tile and stages; qk_scale is the softmax scale times log2(e). The caller has
    checked `config` against these tensors with `gluon_prefill_unsupported`."""
    kernel, extra, warps = _prefill_kernel, {}, config.num_warps
    if config.gather_warps:  # the launch's own warps are the first softmax warpgroup
        kernel, warps = _prefill_kernel_ws, 4
        extra = {"GATHER_WARPS": config.gather_warps, "GATHER_REGS": GATHER_REGS, "SOFTMAX_REGS": SOFTMAX_REGS}
    kernel[(k_cache.shape[2], tiles)](
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out, qk_scale, query_start_loc.shape[0] - 1,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=q.shape[-1], BLOCK_SIZE=k_cache.shape[1], BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, STAGES=config.num_stages, SEQS_POW2=seqs_pow2,
        SAME_KV_LAYOUT=k_cache.stride() == v_cache.stride(), NUM_WARPS=warps, num_warps=warps, **extra,
    )

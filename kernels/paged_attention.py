"""Triton paged attention: `paged_decode` (split-KV + log-sum-exp merge) and `paged_prefill`.

Semantics are those of `streampage.kernels.reference` (shapes in its docstring). Both kernels gather KV
tiles of BLOCK_N tokens through the block table (read one tile ahead and shared by K and V), keep the
softmax online in fp32 and in base 2 (scores are scaled by scale * log2(e)), and compute pool offsets
in int64. Decode computes each key's address from its own table entry and in-page row; prefill, whose
tiles start at multiples of BLOCK_N, from the page's base (table entry times the page stride) plus an
in-page offset fixed per tile position and computed once. Query heads that share a KV head are packed
into the rows of one tile (GQA), so each KV tile is loaded once for the whole group.

CUDA graphs: every launch depends only on tensor shapes and on values fixed at capture (split count,
tile config). Per-step values (context lengths, block tables, query offsets) are read on the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .arrival_counters import arrival_counters
from .host_math import aligned_width, cdiv, next_power_of_2
from .pdl import launch_options, wait_for_previous_kernel

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # KV tokens per iteration (a whole number of pages when block_size divides it)
    num_warps: int
    num_stages: int

    @staticmethod
    @functools.cache  # paged_decode asks for it at every eager launch, a layer at a time
    def default(head_dim: int, programs: int, num_sms: int, sm_shared: int | None = None,
                itemsize: int = 2) -> DecodeConfig:
        """Tiles of 16 KB of K (and of V) whatever the head size, on four warps. The stages trade
        programs an SM against bytes in flight per program: two (one K and one V tile ahead, ~40 KB of
        shared memory: five programs an SM at the kernel's 96 registers a thread) or three (two tiles
        ahead, ~72 KB: three an SM). Without `sm_shared` (an SM's shared memory), or where `wave_cost`
        finds both equal, two stages for more than three programs an SM and three for fewer; otherwise
        the one `wave_cost` finds faster for `programs` of one length."""
        block_n = max(16, min(128, 8192 // head_dim))
        few, many = DecodeConfig(block_n, 4, 3), DecodeConfig(block_n, 4, 2)
        preferred = (few, many) if programs <= 3 * num_sms else (many, few)
        if sm_shared is None:
            return preferred[0]
        return min(preferred, key=lambda cfg: cfg.wave_cost(programs, num_sms, sm_shared, head_dim, itemsize))

    def shared_bytes(self, head_dim: int, itemsize: int = 2) -> int:
        """Shared memory of one program as Triton 3.6 lays it out for sm_90 (38,912 B at two stages and
        71,680 at three for head_dim 128): num_stages - 1 K and V tiles ahead, the 16-row query tile
        and 2 KB of scratch."""
        return (2 * (self.num_stages - 1) * self.block_n + 16) * head_dim * itemsize + 2048

    def wave_cost(self, programs: int, num_sms: int, sm_shared: int, head_dim: int, itemsize: int = 2) -> int:
        """Time of `programs` programs of one length, in units of one program's time while HBM is busy.
        They run in waves of as many as fit on the SMs at once; a last wave of fewer than
        SATURATING_TILES tiles in flight cannot keep HBM busy and lasts as long as one program alone
        (H200, B256/1k: five programs an SM put 68 programs in a fourth wave and took 268 us against
        250 with four an SM; three stages, whose 68 programs each keep two tiles in flight, took 255)."""
        slots = num_sms * max(1, sm_shared // (self.shared_bytes(head_dim, itemsize) + 1024))  # 1 KB reserved a block
        full_waves, tail = divmod(programs, slots)
        alone = -(-SATURATING_TILES // (self.num_stages - 1))
        return full_waves * slots + (max(tail, alone) if tail else 0)


# Tiles of 32 KB (16 KB of K and of V) in flight that keep the H200's HBM busy: a program alone read
# 16.6 GB/s with one tile in flight (session 11, scripts/probe_decode_waves.py), ~2 us a round trip
# under load, and 4.4 TB/s x 2 us / 32 KB is about 260.
SATURATING_TILES = 260


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int  # query rows per program: (tokens of the chunk) x (query heads of one KV head)
    block_n: int  # keys per iteration (any power of two: a tile is whole pages or lies in one page)
    num_warps: int
    num_stages: int
    # Keys per iteration on the masked tiles at the diagonal (at most block_n; a power of two). The
    # diagonal run of a 32-token tile is 32-160 keys long: 64-key steps compute fewer keys above the
    # diagonal than one 128-key step, and each costs half.
    block_n_diag: int = 64
    # Feed Q to the Q @ K^T MMA from registers rather than shared memory: spares shared-memory
    # bandwidth when key tiles are narrow, costs BLOCK_M * head_dim * 2 / (32 * num_warps) bytes of
    # registers per thread (the compiler may still reload Q from shared memory under pressure).
    q_in_registers: bool = False
    # Cap on registers per thread. 128 lets two 8-warp programs share an SM, so one's softmax runs
    # while the other's MMAs do (Triton cannot overlap the two inside one program).
    maxnreg: int | None = None
    # The Gluon kernel (`paged_prefill_gluon.py`: the softmax of one key tile under the P @ V MMA of
    # the one before; Hopper GPUs, 16-bit caches, head_dim 64 or 128, 128 rows on 8 warps or 64 on 4,
    # at least 3 stages). It masks diagonal tiles whole (block_n_diag does not apply) and takes no
    # q_in_registers or maxnreg.
    gluon: bool = False
    # With gluon and 128 rows on 8 warps: warps that gather K/V pages for the two softmax warpgroups
    # (a warp-specialised partition signalling each ring stage on an mbarrier); 0: the softmax warps
    # gather too.
    gather_warps: int = 0

    def shared_bytes(self, head_dim: int, itemsize: int) -> int:
        """Shared memory of the tiles: Q plus num_stages K and V tiles in flight."""
        return (self.block_m + 2 * self.num_stages * self.block_n) * head_dim * itemsize

    @staticmethod
    def default(head_dim: int, dtype: torch.dtype, shared_limit: int | None = None) -> PrefillConfig:
        """128 x 128 tiles, two warpgroups, three stages: the fewest instructions per FLOP that fit
        in registers (236 a thread at d=128) and in an H100/H200's 227 KB of shared memory (224 KB);
        smaller tiles where shared memory is short. Wider heads and fp32 take 64 x 64 tiles."""
        if head_dim > 128 or dtype == torch.float32:
            return PrefillConfig(64, 64, 4, 2)
        candidates = (PrefillConfig(128, 128, 8, 3), PrefillConfig(128, 64, 8, 3), PrefillConfig(64, 64, 4, 2))
        for cfg in candidates:
            if shared_limit is None or cfg.shared_bytes(head_dim, dtype.itemsize) <= shared_limit:
                return cfg
        return candidates[-1]


# The prefill default on Hopper GPUs where it applies (`paged_prefill`): the warp-specialised Gluon
# kernel, two softmax warpgroups of 64 rows fed by four gathering warps through a four-stage ring of
# 64-key tiles. H200, against causal SDPA (paired replays, 1k-8k tokens x 1 and 4 sequences): 0.76-1.08x,
# where the Triton kernel reads 0.69-1.04x (docs/benchmarks.md).
HOPPER_PREFILL = PrefillConfig(128, 64, 8, 4, gluon=True, gather_warps=4)


@dataclass(frozen=True)
class DecodeWorkspace:
    """Scratch for split-KV decode; reusable by every launch with num_seqs and num_splits up to its own.

    partial_out: [num_seqs, q_heads, num_splits, head_dim] fp32, each split's normalised output.
    partial_lse: [num_seqs, q_heads, num_splits padded to 16] fp32, each split's log2-sum-exp (-inf when
    empty).
    """

    partial_out: torch.Tensor
    partial_lse: torch.Tensor

    @classmethod
    def allocate(
        cls, num_seqs: int, num_q_heads: int, head_dim: int, num_splits: int, device: torch.device | str
    ) -> DecodeWorkspace:
        return cls(
            torch.empty(num_seqs, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=device),
            # splits padded: the row strides stay multiples of 16 whatever num_splits (host_math.py)
            torch.empty(num_seqs, num_q_heads, aligned_width(num_splits), dtype=torch.float32, device=device),
        )


# A split must cover at least this many tokens to pay for its share of the merge, unless the GPU has
# SMs to spare (`min_split_tokens`).
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 64
# Programs per SM that keep HBM busy (each holds one or two 32 KB K+V tiles in flight).
TARGET_PROGRAMS_PER_SM = 2


@functools.cache
def decode_split_plan(num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int) -> int:
    """How many splits of the KV range paged_decode launches for this batch.

    1 when the (seq, kv head) programs alone come within 80% of TARGET_PROGRAMS_PER_SM per SM
    (splitting would only add waves and a merge); otherwise enough splits to reach about that many,
    none shorter than MIN_SPLIT_TOKENS of max_context_len. Depends only on its arguments, so a graph
    captured with an upper bound on the context serves every step of its batch size.
    """
    programs = max(num_seqs * num_kv_heads, 1)
    target = TARGET_PROGRAMS_PER_SM * num_sms
    if 5 * programs >= 4 * target:
        return 1
    by_length = cdiv(max(max_context_len, 1), MIN_SPLIT_TOKENS)
    return max(1, min(target // programs, by_length, MAX_SPLITS))


# Programs per SM that a decode graph aims for: its steps mix context lengths, and more, shorter
# programs keep every SM busy until the end where a few long sequences would otherwise run alone
# (H200, contexts uniform in 100-2048: 1.13-1.6x faster than one program per (seq, KV head) at batch
# 16-128, equal at 256).
GRAPH_PROGRAMS_PER_SM = 16


@functools.cache
def graph_split_plan(num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """The split count of a decode CUDA graph for num_seqs sequences whose lengths are unknown at
    capture and mixed at replay. Sequences shorter than num_splits * MIN_SPLIT_TOKENS use fewer
    splits, so short ones cost no merge."""
    programs = max(num_seqs * num_kv_heads, 1)
    return max(1, min(GRAPH_PROGRAMS_PER_SM * num_sms // programs, MAX_SPLITS))


def min_split_tokens(num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """The shortest split paged_decode cuts a sequence into by default. MIN_SPLIT_TOKENS while the
    (seq, KV head) programs fill at least half the SMs; below that (decode batches of 1-8 at 8 KV
    heads) one tile: the extra splits run on SMs that would idle, so a short context costs one tile's
    latency and the merge instead of its tiles one after another (H200, batch 1 at 128-256 tokens:
    6-9 us per layer for 2-4 tiles in one program)."""
    return MIN_SPLIT_TOKENS if 2 * num_seqs * num_kv_heads >= num_sms else 1


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the CPU interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def is_hopper(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.x: the warpgroup MMAs the Gluon prefill is built on."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


@functools.cache
def sm_shared_memory(device: torch.device) -> int | None:
    """Shared memory of one SM of a CUDA device (what its resident programs share); None elsewhere."""
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_multiprocessor", None)


@functools.cache
def max_shared_memory(device: torch.device) -> int | None:
    """Shared memory one program may opt into on a CUDA device; None elsewhere (no limit)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", None)


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    """Validate shapes; return (group, group_pad, head_dim)."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q_heads ({num_q_heads}) must be a multiple of kv_heads ({num_kv_heads})")
    if head_dim < 16 or head_dim & (head_dim - 1) or k_cache.shape[3] != head_dim:
        raise ValueError(f"head_dim must be a power of two >= 16 shared by q and cache, got q {head_dim}, "
                         f"cache {k_cache.shape[3]}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous head_dim, got strides {t.stride()}")
    group = num_q_heads // num_kv_heads
    return group, next_power_of_2(group), head_dim


def _dot_precision(dtype: torch.dtype) -> str:
    # tl.dot on fp32 defaults to tf32 on GPU; an fp32 cache asks for fp32 accuracy.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _tile_pages(block_table, tokens, hi, BLOCK_SIZE: tl.constexpr):
    """The physical block of each token below hi (0 elsewhere), in int64 for offset arithmetic."""
    return tl.load(block_table + tokens // BLOCK_SIZE, mask=tokens < hi, other=0).to(tl.int64)


@triton.jit
def _split_span(context_len, num_splits, min_split_len, BLOCK_N: tl.constexpr):
    """Tokens per split of one sequence (whole tiles) and how many splits it uses (at least 1).

    A sequence is cut into at most num_splits splits of at least min_split_len tokens, so short
    sequences of a batch use fewer splits than long ones and the programs past them do nothing."""
    span = tl.maximum(tl.cdiv(context_len, num_splits), min_split_len)
    span = tl.maximum(tl.cdiv(span, BLOCK_N) * BLOCK_N, BLOCK_N)
    return span, tl.maximum(tl.cdiv(context_len, span), 1)


# Split counts and lengths follow the step and stay unspecialised; the row strides that follow it (block
# tables, partials) are kept multiples of 16 by their owners (host_math.py), so they stay specialised
# (aligned vector loads and stores) and one compiled variant still serves every step (jit_watch.py).
@triton.jit(do_not_specialize=["num_splits", "min_split_len"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr, counter_ptr,
    row_order_ptr, qk_scale, num_splits, min_split_len,
    stride_q_s, stride_q_h, stride_k_b, stride_k_t, stride_k_h, stride_v_b, stride_v_t, stride_v_h,
    stride_bt_s, stride_o_s, stride_o_h, stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = False,
    GROUP_POW2: tl.constexpr = 1, SPLITS_PAD: tl.constexpr = 1, SPLIT_CHUNK: tl.constexpr = 1,
    ORDERED: tl.constexpr = False, SAME_KV_LAYOUT: tl.constexpr = False,
):
    # Programs of one (seq, split) for all KV heads are neighbours in launch order (axis 0), so
    # together they read each page of the pool whole. With SAME_KV_LAYOUT (K and V pools of one
    # shape and strides, as the cache engine allocates them) a V row's offset is its K row's: the
    # loop computes one set of 64-bit addresses a tile instead of two.
    kv_head = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    if ORDERED:  # the caller's launch order of the rows (longest first: none is left running alone)
        seq = tl.load(row_order_ptr + seq).to(tl.int64)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    # Split boundaries are whole tiles. A split past the sequence's last one has an empty range and
    # writes nothing; a sequence that uses one split writes its output directly (no merge).
    span, used = _split_span(context_len, num_splits, min_split_len, BLOCK_N)
    start = split * span
    end = tl.minimum(start + span, context_len)

    # The block table is read one tile ahead, so the next tile's K/V addresses are known while this
    # one computes and the pipeliner keeps K/V loads num_stages - 1 tiles ahead.
    block_table = block_tables_ptr + seq * stride_bt_s
    pages = _tile_pages(block_table, start + tl.arange(0, BLOCK_N), end, BLOCK_SIZE)
    # The step's inputs (row order, context lengths, block tables) were written before its first kernel
    # (pdl.py), so the chain of loads above runs under the previous kernel's tail; q and the newest
    # token's K/V come from the kernel just before.
    wait_for_previous_kernel(PDL)

    rows = tl.arange(0, GROUP_PAD)  # row r = query head kv_head * GROUP + r; rows >= GROUP are padding
    row_mask = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_q_s + heads[:, None] * stride_q_h + dims[None, :],
                mask=row_mask[:, None], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        valid = tokens < end  # the first token of a tile is always valid: m stays finite
        next_pages = _tile_pages(block_table, tokens + BLOCK_N, end, BLOCK_SIZE)
        in_page = tokens % BLOCK_SIZE
        k_rows = pages * stride_k_b + in_page * stride_k_t + kv_head * stride_k_h
        k = tl.load(k_ptr + k_rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        v_rows = k_rows if SAME_KV_LAYOUT else pages * stride_v_b + in_page * stride_v_t + kv_head * stride_v_h
        v = tl.load(v_ptr + v_rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
        pages = next_pages

    safe_sum = tl.where(row_sum > 0.0, row_sum, 1.0)  # row_sum is 0 only for an empty range: output 0
    result = acc / safe_sum[:, None]
    # Per-sequence conditions as row bounds (a scalar condition joins a block mask this way).
    out = out_ptr + seq * stride_o_s + heads[:, None] * stride_o_h + dims[None, :]
    direct = rows < tl.where(used == 1, tl.where(split == 0, GROUP, 0), 0)
    tl.store(out, result.to(out_ptr.dtype.element_ty), mask=direct[:, None])
    if SPLIT:  # noqa: SIM102 - a compile-time branch around a runtime one
        if (used > 1) & (split < used):
            _store_split_and_merge_last(
                result, m, safe_sum, rows, heads, dims, seq, kv_head, split, used,
                out_ptr, part_out_ptr, part_lse_ptr, counter_ptr, stride_o_s, stride_o_h,
                stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h,
                GROUP, HEAD_DIM, GROUP_POW2, SPLITS_PAD, SPLIT_CHUNK,
            )


@triton.jit
def _store_split_and_merge_last(
    result, m, safe_sum, rows, heads, dims, seq, kv_head, split, used,
    out_ptr, part_out_ptr, part_lse_ptr, counter_ptr, stride_o_s, stride_o_h,
    stride_po_s, stride_po_h, stride_po_p, stride_pl_s, stride_pl_h,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP_POW2: tl.constexpr, SPLITS_PAD: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):
    """Store this split's normalised output and log2-sum-exp, count the split in on its (seq, KV head)
    counter, and if it is the last of the `used` splits to arrive, merge all of them into the output
    and reset the counter. The merge used to be a second launch, which cost a few microseconds per
    layer even when every sequence was short enough for one split. It is vectorised over splits (all
    log-sum-exps in one load, the outputs SPLIT_CHUNK splits at a time), so the tail it adds to the
    kernel is a few loads however many splits there are; its sums run in a fixed order, so the result
    does not depend on which program came last."""
    row_mask = rows < GROUP
    part = part_out_ptr + seq * stride_po_s + heads * stride_po_h
    tl.store(part[:, None] + split * stride_po_p + dims[None, :], result, mask=row_mask[:, None])
    tl.store(part_lse_ptr + seq * stride_pl_s + heads * stride_pl_h + split, m + tl.log2(safe_sum),
             mask=row_mask)  # every used split holds tokens: the sum is positive
    # The barrier orders every thread's stores before the (one-thread) release-acquire atomic; the
    # last to arrive then sees all partials (loaded past L1, which may hold none of them).
    tl.debug_barrier()
    counter = counter_ptr + seq * tl.num_programs(0) + kv_head
    arrived = tl.atomic_add(counter, 1, sem="acq_rel")
    if arrived == used - 1:
        group = tl.arange(0, GROUP_POW2)  # the group's heads without tl.dot's padding
        group_mask = group < GROUP
        group_heads = kv_head * GROUP + group
        lse_row = part_lse_ptr + seq * stride_pl_s + group_heads * stride_pl_h
        splits = tl.arange(0, SPLITS_PAD)
        lse = tl.load(lse_row[:, None] + splits[None, :], mask=group_mask[:, None] & (splits[None, :] < used),
                      other=float("-inf"), cache_modifier=".cg")
        lse_max = tl.where(group_mask, tl.max(lse, axis=1), 0.0)  # padding rows: all -inf
        total = tl.sum(tl.exp2(lse - lse_max[:, None]), axis=1)
        part_row = part_out_ptr + seq * stride_po_s + group_heads * stride_po_h
        chunk = tl.arange(0, SPLIT_CHUNK)
        merged = tl.zeros([GROUP_POW2, HEAD_DIM], tl.float32)
        for first in range(0, used, SPLIT_CHUNK):
            in_chunk = group_mask[:, None] & ((first + chunk)[None, :] < used)
            weight = tl.exp2(tl.load(lse_row[:, None] + first + chunk[None, :], mask=in_chunk,
                                     other=float("-inf"), cache_modifier=".cg") - lse_max[:, None])
            parts = tl.load(part_row[:, None, None] + (first + chunk)[None, :, None] * stride_po_p
                            + dims[None, None, :], mask=in_chunk[:, :, None], other=0.0, cache_modifier=".cg")
            merged += tl.sum(weight[:, :, None] * parts, axis=1)
        out = out_ptr + seq * stride_o_s + group_heads[:, None] * stride_o_h + dims[None, :]
        merged = merged / tl.where(total > 0.0, total, 1.0)[:, None]
        tl.store(out, merged.to(out_ptr.dtype.element_ty), mask=group_mask[:, None])
        tl.store(counter, 0)


@functools.cache
def _merge_shape(group: int, head_dim: int, num_splits: int) -> dict[str, int]:
    """Tile sizes of the merge in the decode kernel: the group's heads rounded up to a power of two,
    every split's log-sum-exp at once, and up to 8 splits' outputs per step, as many as keep the
    [heads, splits, head_dim] tile within 8K fp32 values (64 registers a thread at 4 warps)."""
    group_pow2 = next_power_of_2(group)
    splits_pad = next_power_of_2(num_splits)
    chunk = 8
    while chunk > 1 and (chunk > splits_pad or group_pow2 * chunk * head_dim > 8192):
        chunk //= 2
    return {"GROUP_POW2": group_pow2, "SPLITS_PAD": splits_pad, "SPLIT_CHUNK": chunk}


def paged_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, *, out: torch.Tensor | None = None,
    num_splits: int | None = None, max_context_len: int | None = None,
    workspace: DecodeWorkspace | None = None, config: DecodeConfig | None = None,
    min_split_len: int | None = None, row_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence (q: [num_seqs, q_heads, head_dim]) over its paged KV.

    Rows with context_len 0 give zeros. num_splits defaults to `decode_split_plan` with
    max_context_len (default: the block table's capacity, a bound fixed by its shape). For CUDA graph
    capture pass a fixed num_splits (or max_context_len) and a `workspace` allocated beforehand.

    Each sequence is cut into at most num_splits equal splits of at least min_split_len tokens
    (default `min_split_tokens`; whole tiles either way): in a batch of mixed lengths (a graph sized by
    `graph_split_plan`) long sequences use every split and short ones fewer, down to one, which
    writes its output without the merge.

    row_order (int32 [num_seqs], a permutation of the rows, read on the device): the order in which
    programs take the rows. The GPU starts programs in launch order, so rows longest first keep a few
    long sequences from running alone at the end of a batch of mixed lengths. Results do not depend
    on it.
    """
    group, group_pad, head_dim = _check(q, k_cache, v_cache)
    num_seqs, num_q_heads = q.shape[0], q.shape[1]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if num_splits is None:
        bound = max_context_len if max_context_len is not None else block_tables.shape[1] * block_size
        num_splits = decode_split_plan(num_seqs, num_kv_heads, bound, num_sms(q.device))
    if min_split_len is None:
        min_split_len = min_split_tokens(num_seqs, num_kv_heads, num_sms(q.device))
    programs = num_kv_heads * num_seqs * num_splits
    # Rows launched longest first have mixed lengths, which `wave_cost` does not model.
    sm_shared = None if row_order is not None else sm_shared_memory(q.device)
    cfg = config or DecodeConfig.default(head_dim, programs, num_sms(q.device), sm_shared,
                                         k_cache.element_size())
    if num_splits > 1:
        if workspace is None:
            workspace = DecodeWorkspace.allocate(num_seqs, num_q_heads, head_dim, num_splits, q.device)
        part_out = workspace.partial_out[:num_seqs, :num_q_heads, :num_splits]
        part_lse = workspace.partial_lse[:num_seqs, :num_q_heads, :num_splits]
        if part_out.shape[:3] != (num_seqs, num_q_heads, num_splits) or part_out.shape[3] != head_dim:
            raise ValueError(f"workspace {tuple(workspace.partial_out.shape)} is too small for "
                             f"{(num_seqs, num_q_heads, num_splits, head_dim)}")
        counters = arrival_counters(q.device, num_seqs * num_kv_heads)
    else:  # never dereferenced: the single-split kernel writes straight to out
        part_out, part_lse, counters = out, out[..., 0], context_lens
    po_strides = part_out.stride() if num_splits > 1 else (0, 0, 0)
    pl_strides = part_lse.stride() if num_splits > 1 else (0, 0)
    _decode_kernel[(num_kv_heads, num_seqs, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse, counters,
        context_lens if row_order is None else row_order,  # read only when ORDERED
        scale * _LOG2E, num_splits, min_split_len,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        po_strides[0], po_strides[1], po_strides[2], pl_strides[0], pl_strides[1],
        GROUP=group, GROUP_PAD=max(group_pad, 16), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_N=cfg.block_n, SPLIT=num_splits > 1, DOT_PRECISION=_dot_precision(k_cache.dtype),
        ORDERED=row_order is not None, SAME_KV_LAYOUT=k_cache.stride() == v_cache.stride(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_merge_shape(group, head_dim, num_splits),
        **launch_options(q.device),
    )
    return out


@triton.jit
def _page_rows(block_table, tile_start, hi, stride_b, stride_t, BLOCK_SIZE: tl.constexpr,
               BLOCK_N: tl.constexpr, WHOLE_TILES: tl.constexpr):
    """Pool offset (64-bit, in elements) of the page that holds each key of the tile at tile_start (a
    multiple of BLOCK_N), plus the key's in-page row when a tile lies inside one page. Table entries
    of keys at or past hi are not read (their keys are never used); with WHOLE_TILES (hi a multiple
    of BLOCK_N) a tile is wholly in or out, so one predicate covers it."""
    # Page numbers and strides are non-negative: zero-extending them makes the offset a single
    # 32x32->64-bit multiply.
    if BLOCK_N >= BLOCK_SIZE:  # BLOCK_N // BLOCK_SIZE whole pages; the in-page row is loop-invariant
        page_idx = tile_start // BLOCK_SIZE + tl.arange(0, BLOCK_N) // BLOCK_SIZE
        if WHOLE_TILES:  # one uniform predicate (built as a tensor: the interpreter rejects scalar masks)
            in_range = tl.zeros([BLOCK_N], tl.int32) + tile_start < hi
            pages = tl.load(block_table + page_idx, mask=in_range, other=0)
        else:
            pages = tl.load(block_table + page_idx, mask=page_idx * BLOCK_SIZE < hi, other=0)
        return pages.to(tl.uint32).to(tl.uint64) * stride_b.to(tl.uint32).to(tl.uint64)
    else:  # one page: a single table entry
        page = tl.load(block_table + tile_start // BLOCK_SIZE, mask=tile_start < hi, other=0)
        base = page.to(tl.uint32).to(tl.uint64) * stride_b.to(tl.uint32).to(tl.uint64) \
            + (tile_start % BLOCK_SIZE) * stride_t
        return tl.full([BLOCK_N], 0, tl.uint64) + base


@triton.jit
def _prefill_tiles(
    q, m, row_sum, acc, k_ptr, v_ptr, block_table, kv_head, q_pos, lo, hi, qk_scale,
    stride_k_b, stride_k_t, stride_k_h, stride_v_b, stride_v_t, stride_v_h,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    SAME_KV_LAYOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of (m, row_sum, acc) with keys lo..hi-1 (lo a multiple of BLOCK_N).
    Without CAUSAL every key is visible to every row and hi - lo is a whole number of tiles; with it,
    key j is visible to a row iff j <= q_pos. m, and so the scores, are in base-2 units: the softmax
    scale times log2(e) is applied inside the exp2 argument (one FMA per score)."""
    dims = tl.arange(0, HEAD_DIM)
    # The part of a key's offset that is the same in every tile: its row inside its page and the KV
    # head (tiles start at multiples of BLOCK_N, so key i of a tile sits at row i % BLOCK_SIZE).
    key_rows = tl.arange(0, BLOCK_N) % BLOCK_SIZE
    slot_k = key_rows * stride_k_t + kv_head * stride_k_h
    slot_v = key_rows * stride_v_t + kv_head * stride_v_h
    # Pages are looked up one tile ahead, so the next tile's addresses are known while this one
    # computes and the pipeliner keeps K/V loads num_stages - 1 tiles ahead.
    pages = _page_rows(block_table, lo, hi, stride_k_b, stride_k_t, BLOCK_SIZE, BLOCK_N, not CAUSAL)
    if not SAME_KV_LAYOUT:
        pages_v = _page_rows(block_table, lo, hi, stride_v_b, stride_v_t, BLOCK_SIZE, BLOCK_N, not CAUSAL)
    for tile_start in range(lo, hi, BLOCK_N):
        next_start = tile_start + BLOCK_N
        next_pages = _page_rows(block_table, next_start, hi, stride_k_b, stride_k_t, BLOCK_SIZE, BLOCK_N,
                                not CAUSAL)
        k_off = (pages + slot_k)[:, None] + dims[None, :]
        if SAME_KV_LAYOUT:
            v_off = k_off
        else:
            next_pages_v = _page_rows(block_table, next_start, hi, stride_v_b, stride_v_t, BLOCK_SIZE,
                                      BLOCK_N, not CAUSAL)
            v_off = (pages_v + slot_v)[:, None] + dims[None, :]
        if CAUSAL:
            tokens = tile_start + tl.arange(0, BLOCK_N)
            valid = tokens < hi
            k = tl.load(k_ptr + k_off, mask=valid[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + k_off)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if CAUSAL:
            s = tl.where(tokens[None, :] <= q_pos[:, None], s, float("-inf"))
        # qk_scale > 0, so the row max of the scaled scores is the scaled row max.
        m_new = tl.maximum(m, tl.max(s, axis=1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + v_off, mask=valid[:, None], other=0.0) if CAUSAL else tl.load(v_ptr + v_off)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
        pages = next_pages
        if not SAME_KV_LAYOUT:
            pages_v = next_pages_v
    return m, row_sum, acc


@triton.jit
def _tile_owner(query_start_loc_ptr, num_seqs, tile_id, TOKENS: tl.constexpr, SEQS_POW2: tl.constexpr):
    """The sequence that owns tile `tile_id` of the batch, and the tile's index within it. Tiles are
    numbered across the batch: sequence i owns cdiv(q_len_i, TOKENS) consecutive tiles (none when its
    chunk is empty). A tile past the batch's last belongs to sequence num_seqs (nobody's)."""
    seqs = tl.arange(0, SEQS_POW2)
    in_batch = seqs < num_seqs
    starts = tl.load(query_start_loc_ptr + seqs, mask=in_batch, other=0)
    ends = tl.load(query_start_loc_ptr + seqs + 1, mask=in_batch, other=0)
    tiles = (ends - starts + TOKENS - 1) // TOKENS
    through = tl.cumsum(tiles, 0)  # tiles of sequences 0..i
    seq = tl.sum((through <= tile_id).to(tl.int32), 0)
    first = tl.sum(tl.where(seqs == seq, through - tiles, 0), 0)
    return seq, tile_id - first


# The batch's sequence count stays unspecialised, and the block tables' row stride is padded to a
# multiple of 16 (`aligned_width`): one compiled variant serves every step (jit_watch.py).
@triton.jit(do_not_specialize=["num_seqs"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, query_start_loc_ptr, context_lens_ptr, out_ptr,
    qk_scale, num_seqs,
    stride_q_t, stride_q_h, stride_k_b, stride_k_t, stride_k_h, stride_v_b, stride_v_t, stride_v_h,
    stride_bt_s, stride_o_t, stride_o_h,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_DIAG: tl.constexpr, SAME_KV_LAYOUT: tl.constexpr,
    Q_IN_REGISTERS: tl.constexpr, DOT_PRECISION: tl.constexpr, SEQS_POW2: tl.constexpr,
):
    TOKENS: tl.constexpr = BLOCK_M // GROUP_PAD  # query tokens per tile
    kv_head = tl.program_id(0)
    # The grid covers an upper bound of the batch's tiles that depends only on tensor shapes, so a
    # CUDA graph of a mixed step replays with any split of its tokens into chunks. Numbered from the
    # end: a sequence's late tiles see the most keys, so they start first.
    seq, tile = _tile_owner(query_start_loc_ptr, num_seqs,
                            tl.num_programs(1) - 1 - tl.program_id(1), TOKENS, SEQS_POW2)
    if seq >= num_seqs:
        return
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    tile_token = tile * TOKENS
    context_len = tl.load(context_lens_ptr + seq)

    # Row r is query token tile_token + r // GROUP_PAD and query head kv_head * GROUP + r % GROUP_PAD:
    # the group's heads of one token are adjacent in q, so the tile's query rows are few long runs.
    rows = tl.arange(0, BLOCK_M)
    row_token = tile_token + rows // GROUP_PAD
    row_head = kv_head * GROUP + rows % GROUP_PAD
    row_mask = (row_token < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = context_len - q_len + row_token  # the chunk holds the last q_len positions of the context
    dims = tl.arange(0, HEAD_DIM)
    q_rows = (q_begin + row_token).to(tl.int64) * stride_q_t + row_head * stride_q_h
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=row_mask[:, None], other=0.0)
    if Q_IN_REGISTERS:
        # Triton feeds an MMA operand that comes straight from a load through shared memory and one
        # that is computed from registers; this select (a no-op on values) makes Q computed.
        q = tl.where(row_mask[:, None], q, 0.0)
    q = q.to(k_ptr.dtype.element_ty)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt_s

    first_pos = context_len - q_len + tile_token
    last_pos = tl.minimum(first_pos + TOKENS, context_len) - 1
    # Keys below full_end (whole tiles) are visible to every row; the rest, up to last_pos, are masked,
    # in narrower tiles (BLOCK_N_DIAG divides BLOCK_N): fewer keys above the diagonal are computed and
    # thrown away. Every row sees key 0, so after the first tile no row's running max is -inf.
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    m, row_sum, acc = _prefill_tiles(
        q, m, row_sum, acc, k_ptr, v_ptr, block_table, kv_head, q_pos, 0, full_end, qk_scale,
        stride_k_b, stride_k_t, stride_k_h, stride_v_b, stride_v_t, stride_v_h,
        HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, SAME_KV_LAYOUT, DOT_PRECISION,
    )
    m, row_sum, acc = _prefill_tiles(
        q, m, row_sum, acc, k_ptr, v_ptr, block_table, kv_head, q_pos, full_end, last_pos + 1, qk_scale,
        stride_k_b, stride_k_t, stride_k_h, stride_v_b, stride_v_t, stride_v_h,
        HEAD_DIM, BLOCK_SIZE, BLOCK_N_DIAG, True, SAME_KV_LAYOUT, DOT_PRECISION,
    )
    result = acc / tl.where(row_sum > 0.0, row_sum, 1.0)[:, None]
    o_rows = (q_begin + row_token).to(tl.int64) * stride_o_t + row_head * stride_o_h
    tl.store(out_ptr + o_rows[:, None] + dims[None, :], result.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None])


def _seqs_pad(num_seqs: int) -> int:
    """Lanes for the batch's chunk bounds in `_tile_owner`: 16 up to 16 sequences, 256 up to 256, then
    powers of two. Two compiled variants serve every usual batch, so a new step size does not compile
    a kernel mid-run; 256 lanes where 32 would do cost each program well under a microsecond."""
    return 16 if num_seqs <= 16 else max(256, next_power_of_2(num_seqs))


def _default_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group_pad: int,
                     head_dim: int) -> PrefillConfig:
    """`HOPPER_PREFILL` on a Hopper GPU wherever the Gluon kernel takes the tensors (16-bit caches,
    head_dim 64 or 128, rows in 16-byte units); the Triton kernel's `PrefillConfig.default` elsewhere."""
    if is_hopper(q.device):
        from .paged_prefill_gluon import gluon_prefill_unsupported

        if gluon_prefill_unsupported(q, k_cache, v_cache, group_pad, HOPPER_PREFILL) is None:
            return HOPPER_PREFILL
    return PrefillConfig.default(head_dim, k_cache.dtype, max_shared_memory(q.device))


def paged_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, context_lens: torch.Tensor, scale: float,
    *, out: torch.Tensor | None = None, config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Causal attention for ragged query chunks (q: [num_tokens, q_heads, head_dim]) over the pool.

    Chunk i is rows query_start_loc[i]:query_start_loc[i+1], the last positions of a context of
    context_lens[i] tokens whose K/V are already stored. Serves prefill, chunked prefill, prefix-cache
    hits and mixed batches (a decode row is a chunk of length 1). The launch depends only on the
    tensors' shapes (CUDA-graph safe): rows of q that no chunk covers and sequences with empty chunks
    (padding) cost a program that exits at once, and such rows of `out` are left as they were.
    """
    group, group_pad, head_dim = _check(q, k_cache, v_cache)
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if block_size & (block_size - 1):  # key tiles are whole pages or lie inside one
        raise ValueError(f"paged_prefill needs a power-of-two block size, got {block_size}")
    num_seqs = query_start_loc.shape[0] - 1
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    cfg = config or _default_prefill(q, k_cache, v_cache, group_pad, head_dim)
    block_m = max(cfg.block_m, group_pad, 16)
    # Sequence i has cdiv(q_len_i, tokens per tile) tiles: at most cdiv(num_tokens, tokens per tile)
    # plus one partial tile per sequence in all.
    tiles = cdiv(q.shape[0], block_m // group_pad) + num_seqs
    if cfg.gluon:
        from .paged_prefill_gluon import gluon_prefill_unsupported, paged_prefill_gluon

        # The default is checked as it is chosen (`_default_prefill`); a caller's config here, once.
        if config is not None and (why := gluon_prefill_unsupported(q, k_cache, v_cache, group_pad, cfg)):
            raise ValueError(f"paged_prefill with PrefillConfig(gluon=True) {why}")
        paged_prefill_gluon(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale * _LOG2E, out,
                            cfg, group=group, group_pad=group_pad, tiles=tiles, seqs_pow2=_seqs_pad(num_seqs))
        return out
    _prefill_kernel[(num_kv_heads, tiles)](
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out,
        scale * _LOG2E, num_seqs,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_N_DIAG=min(cfg.block_n, cfg.block_n_diag),
        SAME_KV_LAYOUT=k_cache.stride() == v_cache.stride(),
        Q_IN_REGISTERS=cfg.q_in_registers, DOT_PRECISION=_dot_precision(k_cache.dtype),
        SEQS_POW2=_seqs_pad(num_seqs),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
    )
    return out

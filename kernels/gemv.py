"""Skinny linear layers for decode: `skinny_linear(x, weight, bias)` = `F.linear` for 1-8 rows.

At batch 1-8 a projection reads its whole weight to produce a few rows, so its floor is the weight's
bytes over the memory bandwidth. cuBLAS reaches 33-60% of that on the small projections of a 1B model
(`docs/benchmarks.md`): too few bytes in flight. Here every program streams [BLOCK_N, BLOCK_K] tiles of
`weight` (nn.Linear's row-major [N, K]: each tile row is BLOCK_K contiguous elements) through a loop
pipelined `num_stages` deep, and computes all M rows of x against each tile, so the weight is read
once whatever M. Accumulation is in fp32. Two ways to multiply a tile, a config choice:

    FMA  (dot=False)  x [M_PAD, BLOCK_K] * tile [BLOCK_N, BLOCK_K] broadcast to 3-D and summed over K,
                      M_PAD = next power of two >= M: no wasted rows, but M_PAD multiply-adds per weight
                      element (at M = 8 about half the SM's FMA rate at full bandwidth).
    MMA  (dot=True)   tl.dot of x padded to 16 rows with the tile's transpose: the tensor cores do the
                      arithmetic (15/16 of it wasted at M = 1, which costs nothing here).

Short-N, long-K shapes (a 1B model's down projection: N 2048, K 8192) have too few N tiles to fill
the GPU, so K can be split over `split_k` programs per N tile (grid (N tiles, split_k)). Each writes
its fp32 partial [M, BLOCK_N] to a workspace, then counts itself in with an atomic on its tile's
counter; the program that arrives last sums the partials in split order (deterministic), adds the
bias, stores y and puts the counter back to zero. One launch, no memset: the counters are zero before
and after every call, so the kernel replays safely in a CUDA graph. Launches depend only on shapes
and the config (no per-step scalars); the partials workspace is allocated per call (shape-sized; the
graph's pool inside a capture).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .arrival_counters import arrival_counters
from .host_math import cdiv, next_power_of_2
from .paged_attention import num_sms
from .pdl import launch_options, wait_for_previous_kernel

GEMV_MAX_ROWS = 8  # rows (tokens) per call: decode batches of 1-8


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # weight rows (outputs) per program, a power of two >= 16
    block_k: int  # weight columns per loop iteration, a power of two >= 16
    split_k: int  # programs per N tile, each over a contiguous run of whole BLOCK_K tiles
    num_warps: int
    num_stages: int  # tiles in flight per program: num_stages - 1 loads run ahead of the multiply
    dot: bool = False  # tensor-core MMA on x padded to 16 rows instead of FMAs (module docstring)

    def shared_bytes(self, M: int, itemsize: int) -> int:
        """Shared memory of the pipeline: num_stages - 1 buffers of a weight tile and an x tile (16 rows
        for MMAs), as Triton 3.9 allocates them for sm_90 (checked against the compiled kernels)."""
        rows = 16 if self.dot else next_power_of_2(M)
        return (self.num_stages - 1) * (self.block_n + rows) * self.block_k * itemsize

    @staticmethod
    def default(M: int, N: int, K: int, sms: int = 132, itemsize: int = 2) -> GemvConfig:
        """The shape of the configs that won the H200 sweep (`streampage bench kernels --gemv`,
        docs/benchmarks.md): tiles of 64 rows x 256 bytes (16 KB), MMAs, 4 warps, 4 stages, and K
        split until the grid gives about two programs per SM (at least two K tiles a split). The
        sweep's winners split between one and two and a half programs per SM depending on the shape;
        two is within a few percent of each."""
        block_k = 256 // itemsize
        block_n = 64
        n_tiles = cdiv(N, block_n)
        k_tiles = cdiv(K, block_k)
        split_k = max(1, min(round(2 * sms / n_tiles), k_tiles // 2))
        return GemvConfig(block_n, block_k, balanced_split(k_tiles, split_k), 4, 4, dot=True)


def balanced_split(k_tiles: int, split_k: int) -> int:
    """The split count that gives every split the same whole number of tiles (the last one fewer)
    and leaves none empty: ceil(k_tiles / ceil(k_tiles / split_k))."""
    return cdiv(k_tiles, cdiv(k_tiles, max(1, split_k)))


# An H100 / H200 program may opt into 227 KB of shared memory.
SHARED_LIMIT = 227 * 1024


def gemv_candidates(M: int, N: int, K: int, sms: int = 132, itemsize: int = 2,
                    shared_limit: int = SHARED_LIMIT) -> list[GemvConfig]:
    """The configs `streampage bench kernels --gemv` times at one shape, the default first.

    Tiles of 16 and 32 KB in several aspect ratios (narrow tiles of long rows, or more rows per
    program), 4 or 8 warps, 3-6 stages (those that fit `shared_limit`), each at the split counts that
    give about one, two and four programs per SM (duplicates dropped). MMA always; FMA only for M <= 2:
    compiled for sm_90, the FMA path's registers grow with M's power of two (a 32 x 256 tile at 4 warps:
    72 registers at M 1, 122 at 2, 230 at 4, spills at 8). Split counts are runtime arguments, so the
    compiles are per tile, warps, stages, MMA and (FMA only) M's power of two."""
    tiles = [(rows, row_bytes // itemsize)
             for rows, row_bytes in ((16, 1024), (32, 512), (64, 256), (32, 1024), (128, 256))]
    found = [GemvConfig.default(M, N, K, sms, itemsize)]
    for block_n, block_k in tiles:
        n_tiles, k_tiles = cdiv(N, block_n), cdiv(K, block_k)
        splits = sorted({balanced_split(k_tiles, cdiv(per_sm * sms, n_tiles)) for per_sm in (1, 2, 4)})
        for dot in (True, False) if M <= 2 else (True,):
            for warps, stages in ((4, 3), (4, 4), (4, 6), (8, 4)):
                for split_k in splits:
                    cfg = GemvConfig(block_n, block_k, split_k, warps, stages, dot)
                    if cfg not in found and cfg.shared_bytes(M, itemsize) <= shared_limit:
                        found.append(cfg)
    return found


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs


@triton.jit
def _skinny_linear_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, partial_ptr, counter_ptr,
    M, N, K, k_per_split, split_k,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_ym,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    SPLIT: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, M_PAD)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past N read row N - 1 and are never stored: the weight loads need no N mask.
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    k_start = split * k_per_split  # k_per_split is a whole number of tiles: no tile straddles splits
    k_end = tl.minimum(k_start + k_per_split, K)
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + (k_start + offs_k)[None, :] * stride_wk
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    row_ok = offs_m[:, None] < M
    acc = tl.zeros((M_PAD, BLOCK_N), tl.float32)
    if PDL:
        # The first weight tile streams in while the previous kernel finishes (weights are never
        # written); x, that kernel's output, is read after the wait. Every split has a first tile.
        w = _load_w(w_ptrs, k_start, K, offs_k, EVEN_K)
        wait_for_previous_kernel(PDL)
        x = _load_x(x_ptrs, k_start, K, offs_k, row_ok, EVEN_K)
        acc = _multiply(acc, x, w, DOT, DOT_PRECISION)
        w_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
        k_start += BLOCK_K
    # tl.range's num_stages pipelines every load of the loop (the kernel-level num_stages would
    # pipeline only loads that feed a tl.dot, i.e. not the FMA path's).
    for k in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        w = _load_w(w_ptrs, k, K, offs_k, EVEN_K)
        x = _load_x(x_ptrs, k, K, offs_k, row_ok, EVEN_K)
        acc = _multiply(acc, x, w, DOT, DOT_PRECISION)
        w_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk

    out_mask = row_ok & (offs_n[None, :] < N)
    if SPLIT:
        # Partials are [split_k, M, N] fp32. The barrier orders every thread's partial store before
        # the (one-thread) release-acquire atomic; the last to arrive then sees all partials.
        part_ptrs = partial_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptrs + split * M * N, acc, mask=out_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        if arrived == split_k - 1:
            acc = tl.zeros((M_PAD, BLOCK_N), tl.float32)
            for s in range(split_k):  # in split order, whichever program came last: deterministic
                acc += tl.load(part_ptrs + s * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(counter_ptr + pid_n, 0)
            _store_rows(acc, bias_ptr, y_ptr, offs_m, offs_n, N, stride_b, stride_ym, out_mask, HAS_BIAS)
    else:
        _store_rows(acc, bias_ptr, y_ptr, offs_m, offs_n, N, stride_b, stride_ym, out_mask, HAS_BIAS)


@triton.jit
def _load_w(ptrs, k, K, offs_k, EVEN_K: tl.constexpr):
    """A weight tile [BLOCK_N, BLOCK_K] at column k (K masked unless BLOCK_K divides it)."""
    return tl.load(ptrs) if EVEN_K else tl.load(ptrs, mask=(k + offs_k)[None, :] < K, other=0.0)


@triton.jit
def _load_x(ptrs, k, K, offs_k, row_ok, EVEN_K: tl.constexpr):
    """An x tile [M_PAD, BLOCK_K] at column k; rows past M read zeros."""
    mask = row_ok if EVEN_K else row_ok & ((k + offs_k)[None, :] < K)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _multiply(acc, x, w, DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [M_PAD, BLOCK_N] + x [M_PAD, BLOCK_K] @ w [BLOCK_N, BLOCK_K]^T, by MMA or FMAs."""
    if DOT:
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    else:
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _store_rows(acc, bias_ptr, y_ptr, offs_m, offs_n, N, stride_b, stride_ym, out_mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_b, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, config: GemvConfig | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ weight [N, K]^T (+ bias [N]) for 1 <= M <= 8, in x's dtype.

    x may be any strided view (rows of a larger buffer, an offset start); weight and bias any strides.
    `config` defaults to `GemvConfig.default` for the shape and device."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"skinny_linear wants x [M, K] and weight [N, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    M, K = x.shape[0], weight.shape[1]
    N = weight.shape[0]
    if not 1 <= M <= GEMV_MAX_ROWS:
        raise ValueError(f"skinny_linear takes 1 to {GEMV_MAX_ROWS} rows, got {M}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    cfg = config or GemvConfig.default(M, N, K, num_sms(x.device), x.element_size())
    k_tiles = cdiv(K, cfg.block_k)
    tiles_per_split = cdiv(k_tiles, cfg.split_k)
    split_k = cdiv(k_tiles, tiles_per_split)  # the config's count, less any split left empty
    n_tiles = cdiv(N, cfg.block_n)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if split_k > 1:
        partials = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
        counters = arrival_counters(x.device, n_tiles)
    else:
        partials = counters = y  # never read: the kernel's SPLIT branch is compiled out
    _skinny_linear_kernel[(n_tiles, split_k)](
        x, weight, y if bias is None else bias, y, partials, counters,
        M, N, K, tiles_per_split * cfg.block_k, split_k,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), 0 if bias is None else bias.stride(0),
        y.stride(0),
        M_PAD=16 if cfg.dot else next_power_of_2(M), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        NUM_STAGES=cfg.num_stages, SPLIT=split_k > 1, EVEN_K=K % cfg.block_k == 0, HAS_BIAS=bias is not None,
        DOT=cfg.dot, DOT_PRECISION=_dot_precision(x.dtype), num_warps=cfg.num_warps,
        **launch_options(x.device),
    )
    return y

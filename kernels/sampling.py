"""Token sampling in one pass over the logits: `sample_tokens`.

The PyTorch sampler spends about ten full passes over a [rows, vocab] float32 tensor on a plain
temperature draw (logsumexp, clone, divide, max, subtract, exp, exponential noise, clamp, divide,
argmax). This kernel reads each logits row once, in tiles, and keeps per lane

    m, s        a running max and sum of exp(x - m) of the raw logits: the row's logsumexp, so the
                drawn token's raw log-probability (x - logsumexp) comes back with it
    best, idx   the best key so far and its column: key = x for greedy rows (temperature 0), and
                x / T + g with g ~ Gumbel(0, 1) for sampled rows

argmax(x / T + g) is distributed as softmax(x / T) (the Gumbel-max trick; it is the exponential race
of the PyTorch path, argmax(p / E) with E ~ Exp(1), after a log). Ties go to the lowest column, as
torch.argmax: lanes visit their columns in increasing order and keep the first of equal keys, and the
lane (then split) reduction takes the smallest column among the best keys.

The noise is Philox (Triton's counter-based generator) keyed by a seed read from a device tensor, with
the counter (tile, lane, row): one Philox call gives a lane's four columns, one in each quarter of the
tile, so a draw depends on (seed, row, logits, T) and the tile width, not on the splits. Launches
depend only on shapes, so the kernel is safe inside a CUDA graph; a fresh seed per step is the
caller's (one device write). The math runs in base 2: exp2 is one special-function instruction,
and so is log2 on the GPU, where the noise takes its two logs per column from lg2.approx rather than
Triton's accurate log2, a polynomial of some twenty instructions (the sampled loop's PTX is 40%
shorter). The running sum is rescaled once per tile of four columns a lane, not once per column.

Small batches split the vocabulary over several programs per row (grid (rows, splits)); each writes
its partial (m, s, best, idx) and a second launch merges them by the same reduction. Greedy ties,
log-probabilities and the distribution are identical whatever the split.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .host_math import cdiv, next_power_of_2
from .paged_attention import num_sms

# Column index that no lane ever holds: lanes that saw only -inf keys keep it, and a row whose keys
# are all -inf takes column 0, as torch.argmax does.
_NO_INDEX = tl.constexpr(2**31 - 1)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# The default tile: 1024 columns (256 lanes x 4) per loop iteration over 4 warps, and splits of the
# vocabulary up to 16 programs per SM. Sampled rows are bound by Philox and the logs, not by memory.
# Swept on an H200 at vocab 151936, rows 1/64/256, bf16 and fp32 (128/256 lanes, 4/8/16 warps, 4-16
# programs per SM): within 6% of the best config at every shape; fewer programs per SM cost 10-15%.
_LANES, _NUM_WARPS, _PROGRAMS_PER_SM = 256, 4, 16


@triton.jit
def _combine(m, s, best, idx):
    """The (m, s, best, idx) of a row from those of its lanes or splits (1-D; m, s in base 2)."""
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(s * tl.exp2(m - m_row), axis=0)  # m >= -FLT_MAX, never -inf: no nan
    best_row = tl.max(best, axis=0)
    idx_row = tl.min(tl.where(best == best_row, idx, _NO_INDEX), axis=0)
    return m_row, s_row, best_row, idx_row


@triton.jit
def _finish(row_ptr, m, s, idx, token_ptr, logprob_ptr):
    """Store the row's token and its raw log-probability, logit - logsumexp (= (m + log2 s) ln 2)."""
    token = tl.where(idx == _NO_INDEX, 0, idx)
    logit = tl.load(row_ptr + token).to(tl.float32)
    tl.store(token_ptr, token.to(tl.int64))
    tl.store(logprob_ptr, logit - (m + tl.log2(s)) * _LN2)


@triton.jit
def _log2(x, FAST_LOG2: tl.constexpr):
    """log2 by the GPU's special-function unit (lg2.approx, relative error ~1e-7: plenty for noise),
    or Triton's accurate log2 (a polynomial of some twenty instructions; the interpreter's only one)."""
    if FAST_LOG2:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _gumbel2(bits, FAST_LOG2: tl.constexpr):
    """Gumbel noise in base-2 units, up to a constant shift (an argmax ignores it), from uint32s."""
    # v in (0, 1), exact near 0: (bits + 1/2) / 2^32, kept below 1 where float32 rounding reaches it.
    v = tl.minimum(bits.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10, 0.99999994)
    # e = -ln(1 - v) ~ Exp(1). The winners are the columns with the smallest e, i.e. small v, where
    # 1 - v would round away the digits that matter: there a Taylor series (error < 2e-7 relative).
    series = v * (1.0 + v * (0.5 + v * (0.3333333333 + v * (0.25 + v * 0.2))))
    e = tl.where(v < 0.0625, series, -_LN2 * _log2(1.0 - v, FAST_LOG2))
    return -_log2(e, FAST_LOG2)  # -ln(e) / ln 2: a Gumbel(0, 1) draw in base-2 units


@triton.jit
def _load_column(row_ptr, cols, vocab):
    return tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)


@triton.jit
def _pick(x, cols, best, idx, inv_temperature, bits, NOISE: tl.constexpr, FAST_LOG2: tl.constexpr):
    """Fold the keys of columns `cols` (one per lane, raw logits x) into the lanes' best and idx."""
    key = x  # greedy: the raw logit itself, so ties are exactly torch.argmax's
    if NOISE:
        key = x * (_LOG2E * inv_temperature) + _gumbel2(bits, FAST_LOG2)  # (x / T + Gumbel) / ln 2: same argmax
    better = key > best  # strict: the first of equal keys stays, so ties keep the lowest column
    return tl.where(better, key, best), tl.where(better, cols, idx)


@triton.jit
def _update(row_ptr, cols, vocab, m, s, best, idx, inv_temperature, r0, r1, r2, r3,
            LANES: tl.constexpr, NOISE: tl.constexpr, FAST_LOG2: tl.constexpr):
    """Fold a tile into the lanes' state: each lane's four columns cols + q * LANES, q = 0..3. The sum
    is rescaled once per tile, to the max of the lane's four columns (five exp2 for four columns
    where one at a time takes eight); the keys are compared in column order (the tie rule)."""
    x0 = _load_column(row_ptr, cols, vocab)
    x1 = _load_column(row_ptr, cols + LANES, vocab)
    x2 = _load_column(row_ptr, cols + 2 * LANES, vocab)
    x3 = _load_column(row_ptr, cols + 3 * LANES, vocab)
    # Base 2: exp2 and log2 are the hardware's instructions.
    m_new = tl.maximum(m, tl.maximum(tl.maximum(x0, x1), tl.maximum(x2, x3)) * _LOG2E)
    s = s * tl.exp2(m - m_new) + (tl.exp2(x0 * _LOG2E - m_new) + tl.exp2(x1 * _LOG2E - m_new)
                                  + tl.exp2(x2 * _LOG2E - m_new) + tl.exp2(x3 * _LOG2E - m_new))
    best, idx = _pick(x0, cols, best, idx, inv_temperature, r0, NOISE, FAST_LOG2)
    best, idx = _pick(x1, cols + LANES, best, idx, inv_temperature, r1, NOISE, FAST_LOG2)
    best, idx = _pick(x2, cols + 2 * LANES, best, idx, inv_temperature, r2, NOISE, FAST_LOG2)
    best, idx = _pick(x3, cols + 3 * LANES, best, idx, inv_temperature, r3, NOISE, FAST_LOG2)
    return m_new, s, best, idx


# The split depends on the row count: its ints stay unspecialised so that every batch size shares one
# compiled variant (jit_watch.py).
@triton.jit(do_not_specialize=["tiles_per_split", "num_splits"])
def _sample_kernel(
    logits_ptr, temperature_ptr, seed_ptr, partial_ptr, partial_idx_ptr, token_ptr, logprob_ptr,
    stride_row, stride_temperature, vocab, tiles_per_split, num_splits,
    LANES: tl.constexpr, RANDOM: tl.constexpr, FINAL: tl.constexpr, FAST_LOG2: tl.constexpr = False,
):
    # Program (row, split) covers tiles [split * tiles_per_split, (split + 1) * tiles_per_split) of
    # 4 * LANES columns. One Philox call per lane gives four numbers, one for each quarter of the
    # tile; a lane visits its columns in increasing order (the tie rule relies on it).
    row = tl.program_id(0)
    split = tl.program_id(1)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    lanes = tl.arange(0, LANES)
    # m starts at -FLT_MAX, not -inf: exp2(m - m_new) then never meets -inf - -inf, and a row of
    # -inf still ends with s = 0, so a logsumexp of -inf.
    m = tl.full((LANES,), -3.4028234663852886e38, tl.float32)
    s = tl.zeros((LANES,), tl.float32)
    best = tl.full((LANES,), float("-inf"), tl.float32)
    idx = tl.full((LANES,), _NO_INDEX, tl.int32)
    sampled = False
    if RANDOM:  # some row of the batch samples; this one does when its temperature is > 0
        temperature = tl.load(temperature_ptr + row * stride_temperature)
        sampled = temperature > 0
        inv_temperature = 1.0 / tl.where(sampled, temperature, 1.0)
        seed = tl.load(seed_ptr)
    else:  # the compiler still visits the noise branch below (then drops it): its names must exist
        inv_temperature = 1.0
        seed = 0
    first = split * tiles_per_split * 4 * LANES
    zero = lanes.to(tl.uint32) * 0
    for t in range(tiles_per_split):
        start = first + t * 4 * LANES
        if sampled:  # uniform over the program: greedy rows of a mixed batch skip the noise
            # Counter (start / 4 + lane, row): unique per (row, tile, lane).
            r0, r1, r2, r3 = tl.philox(seed, (start // 4 + lanes).to(tl.uint32), zero + row.to(tl.uint32),
                                       zero, zero)
            m, s, best, idx = _update(row_ptr, start + lanes, vocab, m, s, best, idx, inv_temperature,
                                      r0, r1, r2, r3, LANES, True, FAST_LOG2)
        else:
            m, s, best, idx = _update(row_ptr, start + lanes, vocab, m, s, best, idx, inv_temperature,
                                      zero, zero, zero, zero, LANES, False, FAST_LOG2)
    m, s, best, idx = _combine(m, s, best, idx)
    if FINAL:
        _finish(row_ptr, m, s, idx, token_ptr + row, logprob_ptr + row)
    else:
        part = row.to(tl.int64) * num_splits + split
        tl.store(partial_ptr + 3 * part, m)
        tl.store(partial_ptr + 3 * part + 1, s)
        tl.store(partial_ptr + 3 * part + 2, best)
        tl.store(partial_idx_ptr + part, idx)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_kernel(
    logits_ptr, partial_ptr, partial_idx_ptr, token_ptr, logprob_ptr, stride_row, num_splits,
    SPLITS_PAD: tl.constexpr,
):
    # One program per row: the splits' partials reduce exactly as lanes do (a split that saw only
    # -inf has s = 0, best = -inf, idx = _NO_INDEX, and changes nothing; padding is the same).
    row = tl.program_id(0)
    splits = tl.arange(0, SPLITS_PAD)
    mask = splits < num_splits
    part = row.to(tl.int64) * num_splits + splits
    m = tl.load(partial_ptr + 3 * part, mask=mask, other=-3.4028234663852886e38)
    s = tl.load(partial_ptr + 3 * part + 1, mask=mask, other=0.0)
    best = tl.load(partial_ptr + 3 * part + 2, mask=mask, other=float("-inf"))
    idx = tl.load(partial_idx_ptr + part, mask=mask, other=_NO_INDEX)
    m, s, _, idx = _combine(m, s, best, idx)
    _finish(logits_ptr + row.to(tl.int64) * stride_row, m, s, idx, token_ptr + row, logprob_ptr + row)


def sample_splits(num_rows: int, vocab: int, device: torch.device, lanes: int = _LANES) -> int:
    """Programs per row: 1 once rows fill the GPU, else enough to give each SM _PROGRAMS_PER_SM
    programs, never more than the row has tiles."""
    tiles = cdiv(vocab, 4 * lanes)
    wanted = cdiv(_PROGRAMS_PER_SM * num_sms(device), max(num_rows, 1))
    return max(1, min(tiles, wanted))


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor | None,
    seed: torch.Tensor | None,
    *,
    num_splits: int | None = None,
    lanes: int = _LANES,
    num_warps: int = _NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of `logits` [rows, vocab] (float32, float16 or bfloat16; contiguous rows)
    and its raw log-probability, logits[r, token] - logsumexp(logits[r]), in one read of the logits.

    temperature: float32 [rows] (any stride), 0 = greedy (argmax, lowest column on ties); T > 0 draws
    from softmax(logits / T). None: every row greedy (no noise is generated). seed: int64 [1] on the
    logits' device, read by the kernel (so a CUDA graph can replay with a new seed); required with
    `temperature`. The draws depend only on (seed, row, logits, T) and `lanes`.

    Tuning keywords: `num_splits` programs per row (default `sample_splits`), `lanes` (a power of
    two; a tile is 4 * lanes columns) and `num_warps`. Returns (tokens int64 [rows], logprobs
    float32 [rows]).
    """
    num_rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError(f"sample_tokens: logits need contiguous rows, got strides {logits.stride()}")
    if vocab >= _NO_INDEX.value:
        raise ValueError(f"sample_tokens: vocabulary of {vocab} columns does not fit int32 indices")
    if temperature is not None and (seed is None or temperature.shape != (num_rows,)):
        raise ValueError("sample_tokens: temperature needs one value per row and a seed tensor")
    tokens = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return tokens, logprobs
    tiles = cdiv(vocab, 4 * lanes)
    splits = min(tiles, num_splits or sample_splits(num_rows, vocab, logits.device, lanes))
    tiles_per_split = cdiv(tiles, splits)
    splits = cdiv(tiles, tiles_per_split)  # no split without a tile
    partial = torch.empty((num_rows, splits, 3) if splits > 1 else 0, dtype=torch.float32, device=logits.device)
    partial_idx = torch.empty((num_rows, splits) if splits > 1 else 0, dtype=torch.int32, device=logits.device)
    random = temperature is not None
    # Without RANDOM the temperature and seed pointers are never dereferenced: any tensor will do.
    _sample_kernel[(num_rows, splits)](
        logits, temperature if random else logprobs, seed if random else tokens, partial, partial_idx,
        tokens, logprobs, logits.stride(0), temperature.stride(0) if random else 0, vocab, tiles_per_split,
        splits, LANES=lanes, RANDOM=random, FINAL=splits == 1, FAST_LOG2=logits.is_cuda, num_warps=num_warps,
    )
    if splits > 1:
        _merge_kernel[(num_rows,)](
            logits, partial, partial_idx, tokens, logprobs, logits.stride(0), splits,
            SPLITS_PAD=next_power_of_2(tiles), num_warps=1,  # the most splits a row can have: one variant
        )
    return tokens, logprobs

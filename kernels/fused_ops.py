"""Fused Triton kernels for the decoder's small operations: one launch where PyTorch takes five to ten.

At small batches a decode step is bound by launches, not bytes: every elementwise PyTorch op is its own
kernel at 1-2 us even inside a CUDA graph, and an unfused RMSNorm alone is eight of them. The decoder in
`streampage.model.layers` calls these on CUDA tensors:

    rms_norm          weight * RMSNorm(x), out of place
    add_rms_norm_     residual += x, then x = weight * RMSNorm(residual), both in place
    rotary_store_kv_  (Qwen3) per-head RMSNorm of q and k, rotary embedding of q and k in place, and the
                      step's K/V rows written into the paged cache by slot mapping
    silu_and_mul      silu(gate) * up of the merged gate/up projection

Each reproduces the PyTorch code it replaces in `streampage.model.layers` (the CPU path, and the oracle
of tests/test_fused_ops.py) rounding for rounding: statistics and rotations in float32, and every value
that PyTorch rounds to the activation dtype (the residual sum, the normalised row before the weight,
silu before the product) is rounded here at the same point. Only the float32 summation order and the
hardware's rsqrt / exp approximations differ. Launches depend only on shapes, never on tensor values, so
every kernel is safe inside a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host_math import cdiv, next_power_of_2
from .pdl import launch_options, wait_for_previous_kernel


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o, eps,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr = False,
):
    # One program per row; the whole row stays in registers, so in-place outputs (out = x) are safe:
    # every element is loaded before any is stored.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # a weight: before the wait
    wait_for_previous_kernel(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # PyTorch's `x + residual`: a float32 sum rounded to the activation dtype. The rounded sum is
        # both the new residual and what the norm normalises.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / HIDDEN + eps)
    normed = (x32 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # HF: .to(input_dtype), then * weight
    tl.store(out_ptr + row * stride_o + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


def _launch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor, eps: float
) -> None:
    hidden = x.shape[1]
    if weight.shape != (hidden,):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, rows have {hidden} elements")
    for name, t in (("x", x), ("residual", residual), ("out", out)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"rms_norm: {name} needs contiguous rows, got strides {t.stride()}")
    block = next_power_of_2(hidden)
    residual_arg = x if residual is None else residual  # never dereferenced without HAS_RESIDUAL
    _rms_norm_kernel[(x.shape[0],)](
        x, residual_arg, weight, out, x.stride(0), residual_arg.stride(0), out.stride(0), eps,
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        num_warps=max(1, min(16, block // 256)),  # about 8 elements per thread
        **launch_options(x.device),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dimension, as `RMSNorm.forward`; x: [..., hidden] with a
    contiguous last dimension. Returns a new tensor."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    _launch_rms_norm(rows, None, weight, out, eps)
    return out.view(x.shape)


def add_rms_norm_(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm residual step of `RMSNorm.add_and_norm`, in place: residual <- x + residual, then
    x <- weight * residual / rms(residual). x, residual: [num_tokens, hidden] of one dtype. Returns
    (x, residual)."""
    if x.shape != residual.shape or x.dim() != 2 or x.dtype != residual.dtype:
        raise ValueError(
            f"add_rms_norm_: x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} "
            f"{residual.dtype} must be [num_tokens, hidden] of one dtype"
        )
    _launch_rms_norm(x, residual, weight, x, eps)
    return x, residual


@triton.jit
def _norm_and_rotate(
    x_ptr, stride_h, cos, sin, norm_weight_ptr, eps,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    """Normalise (HAS_NORM) and rotate the heads of one token in place; returns the rotated halves in
    the activation dtype, [HEADS_PAD, HALF_PAD] each."""
    dtype = x_ptr.dtype.element_ty
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    first = x_ptr + heads * stride_h + dims  # neox style: a head's two halves rotate together
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:  # Qwen3's RMSNorm over each head, rounded as RMSNorm.forward rounds
        squares = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
        rstd = tl.rsqrt(squares / (2 * HALF) + eps)[:, None]
        w1 = tl.load(norm_weight_ptr + dims, mask=dims < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(norm_weight_ptr + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    r1 = (x1 * cos - x2 * sin).to(dtype)
    r2 = (x2 * cos + x1 * sin).to(dtype)
    tl.store(first, r1, mask=mask)
    tl.store(first + HALF, r2, mask=mask)
    return r1, r2


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, eps,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_cos_t, stride_sin_t,
    stride_kc_b, stride_kc_t, stride_kc_h, stride_vc_b, stride_vc_t, stride_vc_h,
    NUM_Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HAS_NORM: tl.constexpr, PDL: tl.constexpr = False,
):
    # Program (t, 0) handles token t's query heads; (t, 1) its key heads and the K/V write.
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)[None, :]
    cos = tl.load(cos_ptr + token * stride_cos_t + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_sin_t + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    if tl.program_id(1) == 0:
        _norm_and_rotate(q_ptr + token * stride_q_t, stride_q_h, cos, sin, q_norm_ptr, eps,
                         NUM_Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD, HAS_NORM)
    else:
        k1, k2 = _norm_and_rotate(k_ptr + token * stride_k_t, stride_k_h, cos, sin, k_norm_ptr, eps,
                                  NUM_KV_HEADS, KV_HEADS_PAD, HALF, HALF_PAD, HAS_NORM)
        slot = tl.load(slot_ptr + token).to(tl.int64)  # pool offsets can pass 2^31
        if slot >= 0:  # -1 (a padding row) writes nowhere
            block = slot // BLOCK_SIZE
            offset = slot % BLOCK_SIZE
            heads = tl.arange(0, KV_HEADS_PAD)[:, None]
            mask = (heads < NUM_KV_HEADS) & (dims < HALF)
            k_dst = k_cache_ptr + block * stride_kc_b + offset * stride_kc_t + heads * stride_kc_h + dims
            tl.store(k_dst, k1.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(k_dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=mask)
            v_src = v_ptr + token * stride_v_t + heads * stride_v_h + dims
            v_dst = v_cache_ptr + block * stride_vc_b + offset * stride_vc_t + heads * stride_vc_h + dims
            tl.store(v_dst, tl.load(v_src, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_store_kv_(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
    q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None, eps: float = 0.0,
) -> None:
    """Everything between the QKV projection and paged attention, in one launch: with norm weights,
    q <- RMSNorm(q) and k <- RMSNorm(k) per head (Qwen3, both with `eps`); then q and k rotated in place
    as `apply_rotary` does; then row t of k and v written to slot slot_mapping[t] of the caches as
    `store_kvcache` does (-1 skips).

    q [T, q_heads, head_dim], k / v [T, kv_heads, head_dim]: views of the QKV projection are fine, each
    with a contiguous head_dim. cos / sin: [T, 1, head_dim / 2] (or [T, head_dim / 2]) float32, as
    `RotaryEmbedding` returns them. Caches: [num_blocks, block_size, kv_heads, head_dim].
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2 or k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(
            f"rotary_store_kv_: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} need one even "
            "head_dim, one token count, and k and v of one shape"
        )
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("rotary_store_kv_: pass both q_norm_weight and k_norm_weight, or neither")
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("k_cache", k_cache),
                    ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"rotary_store_kv_: {name} needs a contiguous last dimension, got strides {t.stride()}")
    half = head_dim // 2
    _rotary_store_kv_kernel[(num_tokens, 2)](
        q, k, v, cos, sin, q_norm_weight, k_norm_weight, k_cache, v_cache, slot_mapping, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        NUM_Q_HEADS=num_q_heads, Q_HEADS_PAD=next_power_of_2(num_q_heads), NUM_KV_HEADS=num_kv_heads,
        KV_HEADS_PAD=next_power_of_2(num_kv_heads), HALF=half, HALF_PAD=next_power_of_2(half),
        BLOCK_SIZE=k_cache.shape[1], HAS_NORM=q_norm_weight is not None,
        num_warps=4 if num_q_heads * head_dim <= 4096 else 8, **launch_options(q.device),
    )


# Columns per program of silu_and_mul: an 8192-wide MLP (Llama-3.2-1B) spreads a decode row over 8 SMs.
_SILU_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, size, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < size
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + size + cols, mask=mask, other=0.0).to(tl.float32)
    # F.silu's formula, rounded to the activation dtype before the product as `F.silu(gate) * up` is.
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] of shape [num_tokens, 2 * size] (contiguous rows), as
    `SiluAndMul`. Returns a new [num_tokens, size] tensor."""
    num_tokens, width = x.shape
    if width % 2 or x.stride(-1) != 1:
        raise ValueError(f"silu_and_mul: x needs an even, contiguous last dimension, got {tuple(x.shape)} "
                         f"with strides {x.stride()}")
    size = width // 2
    out = torch.empty((num_tokens, size), dtype=x.dtype, device=x.device)
    block = min(_SILU_BLOCK, next_power_of_2(size))
    _silu_and_mul_kernel[(num_tokens, cdiv(size, block))](
        x, out, x.stride(0), out.stride(0), size, BLOCK=block, num_warps=4, **launch_options(x.device),
    )
    return out

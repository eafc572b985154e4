"""Building blocks of the decoder: Megatron-style tensor-parallel linears, vocabulary-parallel embedding
and LM head, RMSNorm, rotary embedding, SiLU-and-mul and paged attention.

Every parameter carries `weight_loader(param, loaded, shard_id=None)` that copies this rank's shard out
of the FULL checkpoint tensor, so tensor-parallel loading stays local to the layer that knows the split.
With one rank every split is the whole tensor and every collective is the identity.

Two paths compute the same thing. On CUDA (`use_triton`), RMSNorm, the residual add, Qwen3's q/k norm,
rotary, the K/V write and SiLU-and-mul are fused Triton kernels (`streampage.kernels.fused_ops`), so a
decoder layer is about ten launches, not forty-odd; the fused norms work in place on step temporaries.
Elsewhere the plain PyTorch code below runs: it is the parity oracle against transformers, and each
fused kernel rounds where it rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from streampage import kernels
from streampage.distributed import tp_all_gather_last_dim, tp_all_reduce, tp_rank, tp_size
from streampage.kernels import reference
from streampage.model.forward_context import AttentionMetadata, get_attention_metadata

WeightLoader = Callable[[nn.Parameter, torch.Tensor, Any], None]
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def use_triton(x: torch.Tensor) -> bool:
    """Whether layers take the fused Triton path for this tensor: on CUDA. Tests patch it to run that
    path through the Triton interpreter on CPU."""
    return x.is_cuda


# Process-wide, set when a worker loads its model (`configure_decode_kernels`): the projections
# ("qkv", "o", "gate_up", "down") whose decode batches of 1 to GEMV_MAX_ROWS rows take the GEMV.
_gemv_projections: frozenset[str] = frozenset()


def configure_decode_kernels(*, programmatic_launch: bool, gemv_projections: Collection[str] = ()) -> None:
    """The runner options `programmatic_launch` and `decode_gemv`, for every model of this process:
    PDL launches of the decode path's Triton kernels (`streampage.kernels.pdl`), and the projections
    that take the split-K GEMV for 1 to GEMV_MAX_ROWS rows (the decode graphs of batch 1-8)."""
    global _gemv_projections
    _gemv_projections = frozenset(gemv_projections)
    from streampage.kernels import pdl  # Triton loads here, not when the model package is imported

    pdl.enable(programmatic_launch)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           projection: str) -> torch.Tensor:
    """F.linear, or `kernels.skinny_linear` for a 16-bit decode batch of at most GEMV_MAX_ROWS rows when
    the GEMV is on for this projection ("qkv", "o", "gate_up" or "down"; it streams the weight once
    whatever the rows, where cuBLAS is latency-bound)."""
    if (projection in _gemv_projections and use_triton(x) and x.dtype in (torch.float16, torch.bfloat16)
            and 1 <= x.shape[0] <= kernels.GEMV_MAX_ROWS):
        return kernels.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) must be divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint shard has shape {tuple(src.shape)}, parameter expects {tuple(dst.shape)}")
    dst.copy_(src)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
    """Replicated parameters (norms, row-parallel biases): every rank holds the whole tensor."""
    _copy_into(param.data, loaded)


def _parameter(shape: tuple[int, ...], loader: WeightLoader, fill: float | None = None) -> nn.Parameter:
    data = torch.empty(shape) if fill is None else torch.full(shape, fill)
    param = nn.Parameter(data, requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split across ranks; the output stays sharded."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *, projection: str) -> None:
        super().__init__()
        self.projection = projection  # its name for `linear`'s GEMV routing
        output_size_local = divide(output_size, tp_size(), "output size")
        self.weight = _parameter((output_size_local, input_size), self.weight_loader)
        self.bias = _parameter((output_size_local,), self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        size = param.shape[0]
        _copy_into(param.data, loaded.narrow(0, tp_rank() * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, projection=self.projection)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate and up).

    Each rank's weight is [shard 0 rows of this rank; shard 1 rows of this rank; ...], so the output
    splits into the shards locally without communication.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, *, projection: str) -> None:
        super().__init__(input_size, sum(output_sizes), bias, projection=projection)
        self.local_sizes = [divide(size, tp_size(), "merged output size") for size in output_sizes]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        size = self.local_sizes[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        _copy_into(param.data.narrow(0, offset, size), loaded.narrow(0, tp_rank() * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """The q, k and v projections in one matmul, split by attention head.

    Each rank holds num_heads / tp query heads. KV heads are split the same way when there are at least
    as many as ranks; otherwise each KV head is replicated on tp / num_kv_heads consecutive ranks, the
    ones whose query heads share it.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        tp = tp_size()
        self.num_heads = divide(num_heads, tp, "num_attention_heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = divide(num_kv_heads, tp, "num_key_value_heads")
        elif tp % num_kv_heads == 0:
            self.num_kv_heads = 1
        else:
            raise ValueError(
                f"num_key_value_heads ({num_kv_heads}) is smaller than the tensor-parallel size ({tp}) "
                "and must divide it, so each KV head is replicated on whole ranks"
            )
        self.head_dim = head_dim
        self.kv_head_start = tp_rank() * num_kv_heads // tp  # first KV head of this rank in the checkpoint
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, output_size, bias, projection="qkv")

    @property
    def split_sizes(self) -> list[int]:
        """The widths of this rank's q, k and v in the output."""
        kv = self.num_kv_heads * self.head_dim
        return [self.num_heads * self.head_dim, kv, kv]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        q_size, kv_size, _ = self.split_sizes
        if shard_id == "q":
            offset, size, source = 0, q_size, tp_rank() * q_size
        elif shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, source = kv_size, self.kv_head_start * self.head_dim
        else:
            raise ValueError(f"QKV shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        _copy_into(param.data.narrow(0, offset, size), loaded.narrow(0, source, size))


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split across ranks: the input arrives sharded (the output of a
    column-parallel layer), partial products are summed over ranks, the bias is added once after."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *, projection: str) -> None:
        super().__init__()
        self.projection = projection  # its name for `linear`'s GEMV routing
        input_size_local = divide(input_size, tp_size(), "input size")
        self.weight = _parameter((output_size, input_size_local), self.weight_loader)
        self.bias = _parameter((output_size,), default_weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        size = param.shape[1]
        _copy_into(param.data, loaded.narrow(1, tp_rank() * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return linear(x, self.weight, self.bias, projection=self.projection)
        y = tp_all_reduce(linear(x, self.weight, projection=self.projection))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split into equal contiguous ranges, one per rank.

    The vocabulary is padded up to a multiple of the tensor-parallel size; padding rows are zero and
    never looked up (token ids are < vocab_size).
    """

    def __init__(self, vocab_size: int, embedding_dim: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.rows_per_rank = math.ceil(vocab_size / tp_size())
        self.vocab_start = tp_rank() * self.rows_per_rank
        self.weight = _parameter((self.rows_per_rank, embedding_dim), self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        rows = loaded[self.vocab_start : self.vocab_start + self.rows_per_rank]
        _copy_into(param.data[: rows.shape[0]], rows)
        param.data[rows.shape[0] :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        mine = (local_ids >= 0) & (local_ids < self.rows_per_rank)
        embedded = F.embedding(local_ids.masked_fill(~mine, 0), self.weight)
        return tp_all_reduce(embedded.masked_fill(~mine[:, None], 0.0))


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, vocabulary-parallel like the embedding (so tied weights share one split)."""

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[N, hidden] -> [N, vocab_size] in the weights' dtype, gathered from every rank's vocabulary
        range. They stay in bf16 because the sampler reads them once and upcasts in registers: an fp32
        copy would write and read twice the bytes, which at 256 rows x 150k columns is ~10% of a
        small model's decode step. `out` [N, vocab_size] receives them (a CUDA graph's buffer)."""
        if out is not None and tp_size() == 1:  # one rank pads nothing: the GEMM writes `out` itself
            return torch.mm(hidden, self.weight.t(), out=out)
        logits = tp_all_gather_last_dim(F.linear(hidden, self.weight))[:, : self.vocab_size]
        return logits if out is None else out.copy_(logits)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and rounded once to the input dtype (as HF does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _parameter((size,), default_weight_loader, fill=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x):
            return kernels.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-norm residual step: returns (norm(x + residual), x + residual). The Triton path is one
        kernel that overwrites x and residual with those results (the decoder passes step temporaries
        that nothing else reads)."""
        if use_triton(x):
            return kernels.add_rms_norm_(x, residual, self.weight, self.eps)
        residual = x + residual
        return self(residual), residual


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """The rotary inverse frequencies [head_dim / 2] (float32) of a rope type and its parameters."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]  # type: ignore[index]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)  # type: ignore[arg-type]
    raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: wavelengths longer than the original context / low_freq_factor are stretched by
    `factor`, those shorter than original / high_freq_factor are kept, and the band between blends the
    two linearly in (original context / wavelength)."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    blend = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - blend) * inv_freq / factor + blend * inv_freq


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate the two halves of each head) with a float32 cos/sin table."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of each token's position, [T, 1, head_dim / 2] float32 (broadcast over heads)."""
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by its positions' angles, in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the merged [T, 2 * I] gate/up projection."""
    if use_triton(x):
        return kernels.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class Attention(nn.Module):
    """Rotary paged attention of this rank's heads: (Qwen3) RMSNorm of each q and k head, rotary
    embedding of q and k, the new K/V stored by slot mapping, then attention over the block tables.
    `k_cache` / `v_cache` ([num_blocks, block_size, num_kv_heads, head_dim]) are bound by the model
    runner before the first forward."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None,
    ) -> torch.Tensor:
        """q [T, num_heads, d], k/v [T, num_kv_heads, d] as the QKV projection gives them (strided views;
        the Triton path rotates q and k in place), cos/sin from `RotaryEmbedding` -> [T, num_heads, d]."""
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("attention has no KV cache; the model runner binds one with bind_kv_cache")
        metadata = get_attention_metadata()
        if use_triton(q):
            return self._forward_triton(q, k, v, cos, sin, q_norm, k_norm, metadata)
        if q_norm is not None and k_norm is not None:
            q, k = q_norm(q), k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        reference.store_kvcache(k, v, self.k_cache, self.v_cache, metadata.slot_mapping)
        if metadata.is_decode:
            return reference.paged_decode(
                q, self.k_cache, self.v_cache, metadata.block_tables, metadata.context_lens, self.scale
            )
        return reference.paged_prefill(
            q, self.k_cache, self.v_cache, metadata.block_tables, metadata.query_start_loc,
            metadata.context_lens, self.scale,
        )

    def _forward_triton(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        q_norm: RMSNorm | None, k_norm: RMSNorm | None, metadata: AttentionMetadata,
    ) -> torch.Tensor:
        # Norms, rotary and the K/V write are one launch; attention then reads K/V from the pool only.
        kernels.rotary_store_kv_(
            q, k, v, cos, sin, self.k_cache, self.v_cache, metadata.slot_mapping,
            q_norm_weight=None if q_norm is None else q_norm.weight,
            k_norm_weight=None if k_norm is None else k_norm.weight,
            eps=0.0 if q_norm is None else q_norm.eps,  # q_norm and k_norm share the model's rms_norm_eps
        )
        if metadata.is_decode:
            return kernels.paged_decode(
                q, self.k_cache, self.v_cache, metadata.block_tables, metadata.context_lens, scale=self.scale,
                num_splits=metadata.decode_splits, row_order=metadata.decode_row_order,
            )
        return kernels.paged_prefill(
            q, self.k_cache, self.v_cache, metadata.block_tables, metadata.query_start_loc,
            metadata.context_lens, scale=self.scale,
        )

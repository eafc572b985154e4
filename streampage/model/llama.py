"""The Llama-family decoder. Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 and Qwen3 share one graph and differ
only in flags read from the Hugging Face config: q/k/v (and o) biases, q/k RMSNorm, tied embeddings,
the rope type and an attention window.

Batches are flat: `forward(input_ids [T], positions [T])` runs every token of every sequence of the step
together; attention layers find which tokens belong to which sequence in the forward context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from streampage.model.layers import (
    SUPPORTED_ROPE_TYPES,
    Attention,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    silu_and_mul,
)

# Hugging Face architecture name -> family (the model_type of its config).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class DecoderSpec:
    """What the decoder needs from a Hugging Face config, the same across families and transformers
    versions. Head counts are totals over all tensor-parallel ranks."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None = default rope; else has "rope_type" and its parameters
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None  # attention window of (some) layers; None = full attention everywhere
    initializer_range: float

    @classmethod
    def from_hf_config(cls, config: Any) -> DecoderSpec:
        """Read a transformers config; raises ValueError for what this decoder cannot run."""
        architecture = _architecture(config)
        family = SUPPORTED_ARCHITECTURES[architecture]
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; the decoder uses silu")
        attention_bias = bool(getattr(config, "attention_bias", False))
        num_heads = config.num_attention_heads
        rope_theta, rope_scaling = _rope_settings(config)
        return cls(
            architecture=architecture,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            max_position_embeddings=config.max_position_embeddings,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=attention_bias or family == "qwen2",  # Qwen2 always biases q/k/v, never o
            o_bias=attention_bias and family != "qwen2",
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=_sliding_window(config),
            initializer_range=float(getattr(config, "initializer_range", 0.02)),
        )


def _architecture(config: Any) -> str:
    architectures = getattr(config, "architectures", None) or []
    if not architectures:  # configs saved without `architectures`: go by model_type
        by_type = {family: name for name, family in SUPPORTED_ARCHITECTURES.items()}
        architectures = [by_type.get(getattr(config, "model_type", ""), f"model_type={config.model_type}")]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {architectures[0]!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return architectures[0]


def _rope_settings(config: Any) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = {**(getattr(config, "rope_scaling", None) or {}), "rope_theta": getattr(config, "rope_theta", 1e4)}
    params = dict(params)
    theta = float(params.pop("rope_theta", 1e4))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return theta, None if rope_type == "default" else {**params, "rope_type": rope_type}


def _sliding_window(config: Any) -> int | None:
    """The attention window if any layer uses one: Mistral sets `sliding_window`; Qwen2/3 also need
    `use_sliding_window` and, in transformers 5, mark the windowed layers in `layer_types`."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def checkpoint_tensor_shapes(spec: DecoderSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face checkpoint of this spec, by name, with its full (unsharded) shape."""
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    layer: dict[str, tuple[int, ...]] = {
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
    }
    if spec.qkv_bias:
        layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    if spec.o_bias:
        layer["self_attn.o_proj.bias"] = (h,)
    if spec.mlp_bias:
        layer |= {"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,), "mlp.down_proj.bias": (h,)}
    if spec.qk_norm:
        layer |= {"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for index in range(spec.num_layers):
        shapes |= {f"model.layers.{index}.{name}": shape for name, shape in layer.items()}
    shapes["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


class LlamaAttention(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        d = spec.head_dim
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, d, spec.num_heads, spec.num_kv_heads, spec.qkv_bias)
        self.o_proj = RowParallelLinear(spec.num_heads * d, spec.hidden_size, bias=spec.o_bias, projection="o")
        self.q_norm = RMSNorm(d, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(d, spec.rms_norm_eps) if spec.qk_norm else None
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, d, scale=d**-0.5)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        d = self.attn.head_dim
        q, k, v = self.qkv_proj(hidden).split(self.qkv_proj.split_sizes, dim=-1)
        q, k, v = q.unflatten(-1, (-1, d)), k.unflatten(-1, (-1, d)), v.unflatten(-1, (-1, d))
        out = self.attn(q, k, v, cos, sin, self.q_norm, self.k_norm)  # q/k norm (Qwen3) and rotary inside
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        size = spec.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(spec.hidden_size, [size, size], bias=spec.mlp_bias,
                                                       projection="gate_up")
        self.down_proj = RowParallelLinear(size, spec.hidden_size, bias=spec.mlp_bias, projection="down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(spec)
        self.mlp = LlamaMLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block. The residual stream travels beside the block's output so that each norm adds
        it in: returns (mlp output, residual), whose sum is the block's output. On the fused (CUDA) path
        the norms work in place: the `hidden` and `residual` passed in are overwritten."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta, spec.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin)
        return self.norm.add_and_norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """The decoder plus its (vocabulary-parallel) LM head. Module names follow the Hugging Face
    checkpoint except for the merged projections in `packed_modules`."""

    # checkpoint module name -> (our merged module, shard id passed to its weight_loader)
    packed_modules: ClassVar[dict[str, tuple[str, Any]]] = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = LlamaModel(spec)
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> hidden states [T, hidden_size] (before the LM head)."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, hidden_size] -> logits [N, vocab_size] in the model's dtype (the same on every
        rank), written into `out` when given."""
        return self.lm_head.compute_logits(hidden, out)

    def attention_layers(self) -> list[Attention]:
        """The attention layers in order; layer i uses pool[i] of the KV pool."""
        return [layer.self_attn.attn for layer in self.model.layers]

    def bind_kv_cache(self, kv_pool: torch.Tensor) -> None:
        """Give every attention layer its views of the pool
        [num_layers, 2, num_blocks, block_size, num_kv_heads (this rank), head_dim]."""
        layers = self.attention_layers()
        expected = (len(layers), 2, layers[0].num_kv_heads, layers[0].head_dim)
        shape = tuple(kv_pool.shape)
        if len(shape) != 6 or (*shape[:2], *shape[4:]) != expected:
            raise ValueError(
                f"KV pool of shape {shape} does not fit the model: expected "
                f"[{expected[0]}, 2, num_blocks, block_size, {expected[2]}, {expected[3]}]"
            )
        for index, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = kv_pool[index, 0], kv_pool[index, 1]

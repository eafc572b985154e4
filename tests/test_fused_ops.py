"""The fused kernels of `streampage.kernels.fused_ops` against the PyTorch code they replace in
`streampage.model.layers`.

Without CUDA the kernels run on CPU tensors through the Triton interpreter (tests/conftest.py), on tiny
shapes in fp32 and fp16; with CUDA the same cases run on the GPU, in bf16 too. The GPU-only tests
compare a whole bf16 decoder layer at real sizes, fused against PyTorch, and replay the fused layer's
decode step from a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
import torch
from transformers import AutoConfig

from streampage import kernels
from streampage.config import gemv_projections
from streampage.kernels import reference
from streampage.model import layers
from streampage.model.demo import SHAPES
from streampage.model.forward_context import AttentionMetadata, forward_context
from streampage.model.layers import RMSNorm, RotaryEmbedding, apply_rotary, silu_and_mul
from streampage.model.llama import DecoderSpec, LlamaDecoderLayer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it)", allow_module_level=True)

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# The kernels round where PyTorch rounds; what is left is float32 summation order and rsqrt / exp
# approximations, which at most flip a rounding of the activation dtype (a few units in the last place).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024}


@pytest.fixture(autouse=True)
def pytorch_layers(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The layers' PyTorch code is the oracle on every device; tests call the kernels directly."""
    monkeypatch.setattr(layers, "use_triton", lambda x: False)
    return monkeypatch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **kwargs: Any) -> None:
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, **kwargs)


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator)).to(device=DEVICE, dtype=dtype)


def random_norm(size: int, eps: float, dtype: torch.dtype, seed: int) -> RMSNorm:
    norm = RMSNorm(size, eps).to(device=DEVICE, dtype=dtype)
    norm.weight.data = 1.0 + randn(size, dtype=dtype, seed=seed, scale=0.2)
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 96), (5, 88), (2, 3, 64)], ids=["96", "88", "3d-64"])
def test_rms_norm_matches_pytorch(shape, dtype):
    norm = random_norm(shape[-1], 1e-5, dtype, seed=1)
    x = randn(*shape, dtype=dtype, seed=2, scale=3.0)
    before = x.clone()
    assert_close(kernels.rms_norm(x, norm.weight, norm.eps), norm(x))
    assert torch.equal(x, before)  # out of place


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 88, 64])
def test_add_rms_norm_works_in_place_and_matches_pytorch(hidden, dtype):
    norm = random_norm(hidden, 1e-6, dtype, seed=3)
    storage = randn(5, hidden + 8, dtype=dtype, seed=4)
    x = storage[:, :hidden]  # rows with a stride wider than the row
    residual = randn(5, hidden, dtype=dtype, seed=5, scale=2.0)
    expected_out, expected_residual = norm.add_and_norm(x.clone(), residual.clone())
    padding = storage[:, hidden:].clone()

    out, new_residual = kernels.add_rms_norm_(x, residual, norm.weight, norm.eps)
    assert out is x and new_residual is residual
    assert_close(residual, expected_residual)
    assert_close(x, expected_out)
    assert torch.equal(storage[:, hidden:], padding)


def split_qkv(num_tokens: int, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """q, k, v as the model has them: strided head views of one QKV projection output."""
    qkv = randn(num_tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=6, scale=2.0)
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.unflatten(-1, (-1, head_dim)), k.unflatten(-1, (-1, head_dim)), v.unflatten(-1, (-1, head_dim))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk-norm"])
@pytest.mark.parametrize("scaling", [None, LLAMA3_ROPE], ids=["default-rope", "llama3-rope"])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rotary_store_kv_matches_norm_rotary_and_store(head_dim, scaling, qk_norm, dtype):
    q_heads, kv_heads, block_size = 6, 2, 8  # 6 query heads: a padded head tile
    positions = torch.tensor([0, 1, 17, 300, 2047, 4000], device=DEVICE)
    slot_mapping = torch.tensor([5, -1, 12, 0, 31, 20], device=DEVICE)  # row 1 is padding
    q, k, v = split_qkv(len(positions), q_heads, kv_heads, head_dim, dtype)
    cos, sin = RotaryEmbedding(head_dim, 4096, 500000.0, scaling).to(DEVICE)(positions)
    norms = (random_norm(head_dim, 1e-6, dtype, seed=7), random_norm(head_dim, 1e-6, dtype, seed=8)) if qk_norm \
        else None
    k_cache = torch.full((4, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()

    expected_q, expected_k = (norms[0](q), norms[1](k)) if norms else (q, k)
    expected_q, expected_k = apply_rotary(expected_q, cos, sin), apply_rotary(expected_k, cos, sin)
    expected_k_cache, expected_v_cache = k_cache.clone(), v_cache.clone()
    reference.store_kvcache(expected_k, v, expected_k_cache, expected_v_cache, slot_mapping)
    v_before = v.clone()

    kernels.rotary_store_kv_(
        q, k, v, cos, sin, k_cache, v_cache, slot_mapping,
        q_norm_weight=norms[0].weight if norms else None, k_norm_weight=norms[1].weight if norms else None,
        eps=1e-6,
    )
    assert_close(q, expected_q)
    assert_close(k, expected_k)
    assert_close(k_cache, expected_k_cache, equal_nan=True)  # NaN where no slot was written
    assert torch.equal(v_cache.nan_to_num(7.0), expected_v_cache.nan_to_num(7.0))
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [88, 96, 1500])  # 1500: two column blocks per row
def test_silu_and_mul_matches_pytorch(size, dtype):
    x = randn(4, 2 * size + 5, dtype=dtype, seed=9, scale=3.0)[:, : 2 * size]  # strided rows
    assert_close(kernels.silu_and_mul(x), silu_and_mul(x))


def test_shape_errors_name_the_problem():
    q, k, v = split_qkv(2, 4, 2, 16, torch.float32)
    cache = torch.zeros(2, 8, 2, 16, device=DEVICE)
    cos = sin = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="both q_norm_weight and k_norm_weight"):
        kernels.rotary_store_kv_(q, k, v, cos, sin, cache, cache, torch.zeros(2, dtype=torch.int64, device=DEVICE),
                                 q_norm_weight=torch.ones(16, device=DEVICE))
    with pytest.raises(ValueError, match="even, contiguous last dimension"):
        kernels.silu_and_mul(torch.zeros(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="weight has shape"):
        kernels.rms_norm(torch.zeros(2, 8, device=DEVICE), torch.ones(9, device=DEVICE), 1e-6)


# ---- GPU: a whole decoder layer at real sizes ----------------------------------------------------------

BLOCK_SIZE = 16


def layer_spec(shape: str) -> DecoderSpec:
    fields = dict(SHAPES[shape])
    spec = DecoderSpec.from_hf_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    return dataclasses.replace(spec, max_position_embeddings=4096)


def random_layer(spec: DecoderSpec, dtype: torch.dtype, seed: int = 0) -> tuple[LlamaDecoderLayer, torch.Tensor]:
    """A decoder layer with random weights (norm weights near 1) bound to a zeroed KV pool of its own."""
    with torch.device(DEVICE):
        layer = LlamaDecoderLayer(spec).to(dtype)
    generator = torch.Generator(DEVICE).manual_seed(seed)
    for param in layer.parameters():
        if param.dim() == 1:
            param.data = 1.0 + 0.1 * torch.randn(param.shape, generator=generator, device=DEVICE, dtype=dtype)
        else:
            param.data.normal_(0.0, spec.initializer_range, generator=generator)
    attention = layer.self_attn.attn
    pool = torch.zeros((2, 64, BLOCK_SIZE, attention.num_kv_heads, attention.head_dim), dtype=dtype, device=DEVICE)
    attention.k_cache, attention.v_cache = pool[0], pool[1]
    return layer, pool


def step_metadata(lengths: list[int], new_tokens: list[int]) -> tuple[AttentionMetadata, torch.Tensor]:
    """Sequence i owns blocks 4i, 4i+1, ... (up to 64 tokens) and gets new_tokens[i] at the end of
    lengths[i] tokens of context."""
    positions = torch.cat([torch.arange(n - q, n) for n, q in zip(lengths, new_tokens, strict=True)])
    seq_of_token = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(new_tokens))
    block_tables = 4 * torch.arange(len(lengths))[:, None] + torch.arange(4)[None, :]
    slots = block_tables[seq_of_token, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
    metadata = AttentionMetadata(
        slot_mapping=slots.to(DEVICE),
        block_tables=block_tables.to(device=DEVICE, dtype=torch.int32),
        context_lens=torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor([0, *torch.tensor(new_tokens).cumsum(0).tolist()], dtype=torch.int32,
                                     device=DEVICE),
        is_decode=all(q == 1 for q in new_tokens),
    )
    return metadata, positions.to(DEVICE)


@torch.no_grad()
def prefill_then_decode(layer: LlamaDecoderLayer, rotary: RotaryEmbedding, dtype: torch.dtype) -> list[torch.Tensor]:
    """A prefill of two sequences (the first layer's form: no residual yet) and a decode step of both (a
    later layer's form). Inputs are rebuilt per call: the fused path overwrites them."""
    hidden_size = layer.input_layernorm.weight.shape[0]
    outputs: list[torch.Tensor] = []
    steps = [([37, 20], [37, 20], None), ([38, 21], [1, 1], 11)]
    for seed, (lengths, new_tokens, residual_seed) in enumerate(steps):
        metadata, positions = step_metadata(lengths, new_tokens)
        hidden = randn(sum(new_tokens), hidden_size, dtype=dtype, seed=10 + seed)
        residual = None if residual_seed is None else randn(sum(new_tokens), hidden_size, dtype=dtype,
                                                            seed=residual_seed)
        with forward_context(metadata):
            outputs += layer(hidden, residual, *rotary(positions))
    return outputs


@pytest.fixture(params=[False, True], ids=["cublas", "gemv-pdl"])
def decode_kernels(request):
    """The decode step's projections by cuBLAS, or by the split-K GEMV with every Triton kernel of
    the step launched with PDL (the runner's decode_gemv and programmatic_launch options)."""
    layers.configure_decode_kernels(programmatic_launch=request.param,
                                    gemv_projections=gemv_projections("all" if request.param else "off"))
    yield request.param
    layers.configure_decode_kernels(programmatic_launch=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", ["llama3.2-1b", "llama3-8b", "qwen3-0.6b"])
def test_bf16_decoder_layer_fused_matches_pytorch(pytorch_layers, decode_kernels, shape):
    spec = layer_spec(shape)
    rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta, spec.rope_scaling)
    rotary = rotary.to(DEVICE)
    layer, pool = random_layer(spec, torch.bfloat16)
    expected = prefill_then_decode(layer, rotary, torch.bfloat16)
    expected_pool = pool.clone()
    pool.zero_()

    pytorch_layers.setattr(layers, "use_triton", lambda x: x.is_cuda)
    actual = prefill_then_decode(layer, rotary, torch.bfloat16)
    # Two bf16 pipelines that round at different points differ element-wise by a few ulps (an ulp
    # is 1/64 at 2-4, so elementwise tolerances flake at large hidden sizes); the relative error of
    # the whole tensor is the meaningful measure: bf16 operands land near 4e-3, a real bug near 1.
    for got, want in [*zip(actual, expected, strict=True), (pool, expected_pool)]:
        error = (got.float() - want.float()).norm() / want.float().norm()
        assert error < 1e-2, f"relative error {error:.2e}"
        assert torch.isfinite(got).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_fused_decode_step_replays_from_a_cuda_graph(pytorch_layers, decode_kernels):
    """Capture fails on any host synchronisation; replay with new inputs must compute what an eager step
    computes (Qwen3: every fused kernel, q/k norm included)."""
    pytorch_layers.setattr(layers, "use_triton", lambda x: x.is_cuda)
    spec = layer_spec("qwen3-0.6b")
    rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta, spec.rope_scaling)
    rotary = rotary.to(DEVICE)
    layer, _ = random_layer(spec, torch.bfloat16)
    prefill_then_decode(layer, rotary, torch.bfloat16)  # 38 and 21 tokens in the cache
    metadata, positions = step_metadata([39, 22], [1, 1])
    hidden_in = randn(2, spec.hidden_size, dtype=torch.bfloat16, seed=20)
    residual_in = randn(2, spec.hidden_size, dtype=torch.bfloat16, seed=21)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        with forward_context(metadata):  # the fused norms overwrite their inputs: give them copies
            return layer(hidden_in.clone(), residual_in.clone(), *rotary(positions))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile every kernel outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    hidden_in.copy_(randn(2, spec.hidden_size, dtype=torch.bfloat16, seed=22))
    residual_in.copy_(randn(2, spec.hidden_size, dtype=torch.bfloat16, seed=23))
    graph.replay()
    for got, want in zip(captured, step(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)

"""The decoder against transformers: every family, through a paged KV pool with shuffled blocks, in
prefill, chunked prefill, mixed and decode batches (float32 on CPU, the reference attention path)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from checkpoints import FAMILIES, load_reference_model, make_checkpoint

from streampage.distributed import TensorParallelState, init_tp
from streampage.model import layers
from streampage.model.demo import SHAPES
from streampage.model.forward_context import AttentionMetadata, forward_context
from streampage.model.layers import rope_inv_freq
from streampage.model.llama import LlamaForCausalLM
from streampage.model.loader import load_model

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


class PagedKV:
    """A KV pool filled with NaN (a read of an unwritten slot poisons the output) whose physical blocks
    are handed out in shuffled order, and the metadata of each step, laid out as the runner does."""

    def __init__(self, model: LlamaForCausalLM, block_size: int, num_blocks: int = 24, seed: int = 0) -> None:
        attention = model.attention_layers()[0]
        shape = (model.spec.num_layers, 2, num_blocks, block_size, attention.num_kv_heads, attention.head_dim)
        self.pool = torch.full(shape, float("nan"))
        model.bind_kv_cache(self.pool)
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.block_size = block_size
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def step(self, chunks: dict[int, int]) -> tuple[AttentionMetadata, torch.Tensor]:
        """Metadata and positions for one step; chunks: sequence id -> number of new tokens."""
        slots: list[int] = []
        positions: list[int] = []
        starts = [0]
        for seq, count in chunks.items():
            begin = self.lengths.get(seq, 0)
            table = self.tables.setdefault(seq, [])
            while len(table) * self.block_size < begin + count:
                table.append(self.free.pop())
            positions += range(begin, begin + count)
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size for p in positions[-count:]]
            starts.append(starts[-1] + count)
            self.lengths[seq] = begin + count
        width = max(len(self.tables[seq]) for seq in chunks)
        tables = [self.tables[seq] + [0] * (width - len(self.tables[seq])) for seq in chunks]
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            context_lens=torch.tensor([self.lengths[seq] for seq in chunks], dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            is_decode=all(count == 1 for count in chunks.values()),
        )
        return metadata, torch.tensor(positions, dtype=torch.int64)


@torch.no_grad()
def run_step(model: LlamaForCausalLM, kv: PagedKV, tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    """One forward over every sequence's new tokens; returns each sequence's logits [new tokens, vocab]."""
    metadata, positions = kv.step({seq: len(ids) for seq, ids in tokens.items()})
    input_ids = torch.tensor([t for ids in tokens.values() for t in ids], dtype=torch.int64)
    with forward_context(metadata):
        logits = model.compute_logits(model(input_ids, positions))
    return dict(zip(tokens, logits.split([len(ids) for ids in tokens.values()]), strict=True))


@torch.no_grad()
def reference_logits(path, token_ids: list[int]) -> torch.Tensor:
    return load_reference_model(path)(torch.tensor([token_ids])).logits[0].float()


def random_tokens(count: int, vocab_size: int, seed: int) -> list[int]:
    return torch.randint(0, vocab_size, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_matches_transformers(tmp_path, family):
    path = make_checkpoint(tmp_path, family)
    model = load_model(path, progress=False).model
    prompt = random_tokens(37, model.spec.vocab_size, seed=1)
    logits = run_step(model, PagedKV(model, block_size=16), {0: prompt})[0]
    torch.testing.assert_close(logits, reference_logits(path, prompt), **TOLERANCE)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_prefill_mixed_and_decode_steps_match_transformers(tmp_path, family):
    path = make_checkpoint(tmp_path, family)
    model = load_model(path, progress=False).model
    a = random_tokens(34, model.spec.vocab_size, seed=2)
    b = random_tokens(22, model.spec.vocab_size, seed=3)
    kv = PagedKV(model, block_size=8)
    steps = [
        {0: a[:15], 1: b[:10]},  # two first chunks
        {0: a[15:30]},  # the rest of a's prompt, over its cached first half
        {0: a[30:31], 1: b[10:19]},  # a decode row inside a prefill batch
        *({0: [a[i]], 1: [b[i - 12]]} for i in range(31, 34)),  # decode-only batches
    ]
    outputs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for step in steps:
        for seq, logits in run_step(model, kv, step).items():
            outputs[seq].append(logits)
    torch.testing.assert_close(torch.cat(outputs[0]), reference_logits(path, a), **TOLERANCE)
    torch.testing.assert_close(torch.cat(outputs[1]), reference_logits(path, b), **TOLERANCE)


def test_linear_rope_scaling_matches_transformers(tmp_path):
    path = make_checkpoint(tmp_path, "llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    model = load_model(path, progress=False).model
    prompt = random_tokens(20, model.spec.vocab_size, seed=4)
    logits = run_step(model, PagedKV(model, block_size=8), {0: prompt})[0]
    torch.testing.assert_close(logits, reference_logits(path, prompt), **TOLERANCE)


def test_multi_query_attention_matches_transformers(tmp_path):
    path = make_checkpoint(tmp_path, "qwen2", num_key_value_heads=1)
    model = load_model(path, progress=False).model
    prompt = random_tokens(19, model.spec.vocab_size, seed=5)
    logits = run_step(model, PagedKV(model, block_size=8), {0: prompt})[0]
    torch.testing.assert_close(logits, reference_logits(path, prompt), **TOLERANCE)


def test_padding_rows_write_nothing_and_leave_real_rows_alone(tmp_path):
    """Decode batches padded for a CUDA graph bucket carry rows with slot -1 and context length 0."""
    model = load_model(make_checkpoint(tmp_path, "llama"), progress=False).model
    prompt = random_tokens(9, model.spec.vocab_size, seed=6)
    kv = PagedKV(model, block_size=8)
    run_step(model, kv, {0: prompt[:8]})
    metadata, positions = kv.step({0: 1})
    expected = _decode(model, metadata, positions, prompt[8])
    pool_before = kv.pool.clone()
    padded = AttentionMetadata(
        slot_mapping=torch.cat([metadata.slot_mapping, torch.tensor([-1])]),
        block_tables=torch.cat([metadata.block_tables, metadata.block_tables]),
        context_lens=torch.cat([metadata.context_lens, torch.tensor([0], dtype=torch.int32)]),
        query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32),
        is_decode=True,
    )
    padded_logits = _decode(model, padded, torch.cat([positions, torch.tensor([0])]), prompt[8], 0)
    torch.testing.assert_close(padded_logits[:1], expected, **TOLERANCE)
    # only the real row's slot is rewritten (with the same K/V); a stray write would replace a NaN
    torch.testing.assert_close(kv.pool, pool_before, **TOLERANCE, equal_nan=True)


@torch.no_grad()
def _decode(model: LlamaForCausalLM, metadata: AttentionMetadata, positions: torch.Tensor, *ids: int) -> torch.Tensor:
    with forward_context(metadata):
        return model.compute_logits(model(torch.tensor(ids), positions))


def test_bfloat16_random_model_stays_finite(tmp_path):
    """Random weights at the config's initializer range keep bf16 activations finite."""
    config = {**SHAPES["llama3.2-1b"], "num_hidden_layers": 2, "hidden_size": 512, "intermediate_size": 2048,
              "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(config))  # a real configuration, cut down
    model = load_model(tmp_path, torch.bfloat16, random_weights=True, progress=False).model
    prompt = random_tokens(24, 1000, seed=7)
    logits = run_step(model, PagedKV(model, block_size=16), {0: prompt})[0]
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.01  # not collapsed to a constant


def test_bind_kv_cache_rejects_a_pool_of_the_wrong_shape(tmp_path):
    model = load_model(make_checkpoint(tmp_path, "llama"), progress=False).model
    with pytest.raises(ValueError, match=r"expected \[2, 2, num_blocks, block_size, 2, 16\]"):
        model.bind_kv_cache(torch.zeros(2, 2, 4, 8, 4, 16))


def test_attention_without_a_bound_cache_says_so(tmp_path):
    model = load_model(make_checkpoint(tmp_path, "llama"), progress=False).model
    with pytest.raises(RuntimeError, match="bind_kv_cache"), torch.no_grad():
        model(torch.tensor([1, 2]), torch.tensor([0, 1]))


def test_llama3_rope_keeps_high_frequencies_and_stretches_low_ones():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    plain = rope_inv_freq(128, 500000.0, None)
    scaled = rope_inv_freq(128, 500000.0, scaling)
    assert scaled[0] == plain[0]  # wavelength 2*pi: far below 8192 / 4
    assert torch.allclose(scaled[-1], plain[-1] / 8)  # wavelength far above 8192
    assert ((scaled <= plain) & (scaled >= plain / 8)).all()


def test_unsupported_rope_type_is_refused():
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported; supported: default, linear, llama3"):
        rope_inv_freq(16, 10000.0, {"rope_type": "yarn", "factor": 4.0})


def _prefill_then_decode(model: LlamaForCausalLM) -> torch.Tensor:
    prompt = random_tokens(21, model.spec.vocab_size, seed=8)
    kv = PagedKV(model, block_size=8)
    logits = [run_step(model, kv, {0: prompt[:18]})[0]]
    logits += [run_step(model, kv, {0: [token]})[0] for token in prompt[18:]]
    return torch.cat(logits)


def _tensor_parallel_worker(rank: int, world_size: int, paths: list, out_dir) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world_size
    )
    init_tp(TensorParallelState(rank, world_size, torch.distributed.group.WORLD))
    results = [_prefill_then_decode(load_model(path, progress=False).model) for path in paths]
    torch.save(results, out_dir / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_compute_the_single_rank_logits(tmp_path):
    """Column/row/vocabulary splits, an odd vocabulary padded per rank, KV heads split (llama: 2 heads)
    and replicated (qwen2 with one KV head, biased q/k/v), over gloo with two CPU processes."""
    paths = [make_checkpoint(tmp_path, "llama"), make_checkpoint(tmp_path, "qwen2", num_key_value_heads=1)]
    expected = [_prefill_then_decode(load_model(path, progress=False).model) for path in paths]
    torch.multiprocessing.spawn(_tensor_parallel_worker, args=(2, paths, tmp_path), nprocs=2)
    for rank in range(2):
        for got, want in zip(torch.load(tmp_path / f"rank{rank}.pt"), expected, strict=True):
            torch.testing.assert_close(got, want, **TOLERANCE)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter (conftest)")
@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_triton_path_matches_transformers(tmp_path, monkeypatch, family):
    """The CUDA path of the decoder (fused norms, q/k norm + rotary + K/V write, SiLU-and-mul, paged
    prefill and decode from streampage.kernels), run on CPU through the Triton interpreter: checks how
    the model calls the kernels, in place where they work in place."""
    monkeypatch.setattr(layers, "use_triton", lambda x: True)
    path = make_checkpoint(tmp_path, family, num_hidden_layers=2)
    model = load_model(path, progress=False).model
    prompt = random_tokens(11, model.spec.vocab_size, seed=9)
    kv = PagedKV(model, block_size=8)
    logits = [run_step(model, kv, {0: prompt[:5]})[0], run_step(model, kv, {0: prompt[5:9]})[0]]
    logits += [run_step(model, kv, {0: [token]})[0] for token in prompt[9:]]
    torch.testing.assert_close(torch.cat(logits), reference_logits(path, prompt), **TOLERANCE)

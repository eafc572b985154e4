"""The engine on a CUDA device: bf16 logits against transformers, CUDA graphs (decode and mixed steps)
against eager steps, async scheduling against synchronous steps. Skipped without CUDA; run on the GPU
host."""

from __future__ import annotations

import pytest
import torch
from checkpoints import load_reference_model, make_checkpoint

from streampage import LLM, SamplingParams
from streampage.model.forward_context import AttentionMetadata, forward_context
from streampage.model.loader import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[5, 17, 99, 3, 250, 41, 8], [300, 12], list(range(20, 61)), [7] * 19, [101, 102] * 30]


@pytest.fixture(scope="module", params=["llama3", "qwen3"])
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gpu"), request.param)


@torch.inference_mode()
def test_bf16_prefill_logits_stay_within_bf16_tolerance_of_transformers(checkpoint):
    prompt = list(range(3, 60))
    reference = load_reference_model(checkpoint).to("cuda", torch.bfloat16)
    want = reference(torch.tensor([prompt], device="cuda")).logits[0].float()
    loaded = load_model(checkpoint, torch.bfloat16, torch.device("cuda"), progress=False)
    shape, block_size = loaded.shape, 16
    blocks = -(-len(prompt) // block_size)
    pool = torch.zeros((shape.num_layers, 2, blocks, block_size, shape.num_kv_heads, shape.head_dim),
                       dtype=torch.bfloat16, device="cuda")
    loaded.model.bind_kv_cache(pool)
    n = len(prompt)
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(n, device="cuda"),
        block_tables=torch.arange(blocks, dtype=torch.int32, device="cuda")[None],
        context_lens=torch.tensor([n], dtype=torch.int32, device="cuda"),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device="cuda"),
        is_decode=False)
    with forward_context(metadata):
        hidden = loaded.model(torch.tensor(prompt, device="cuda"), torch.arange(n, device="cuda"))
    got = loaded.model.compute_logits(hidden)
    error = (got - want).norm() / want.norm()
    assert error < 2e-2, f"relative error {error:.2e}"


def greedy_tokens(checkpoint, **options) -> list[list[int]]:
    # fp32: split-KV decode sums in a different order at each batch size, which in bf16 can flip a
    # near-tie between graph buckets and eager steps; in fp32 any difference is a bug.
    llm = LLM(str(checkpoint), **{"dtype": "float32", "num_gpu_blocks": 256, "max_num_seqs": 8, **options})
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert llm.engine.kv.num_free_blocks == 256
    return [o.outputs[0].token_ids for o in outputs]


def test_cuda_graphs_and_eager_steps_give_the_same_tokens(checkpoint):
    assert greedy_tokens(checkpoint) == greedy_tokens(checkpoint, enforce_eager=True)


def test_mixed_steps_replayed_from_cuda_graphs_give_the_eager_tokens(checkpoint, monkeypatch):
    """A 32-token step budget cuts the prompts into chunks that run beside other requests' decode rows:
    with mixed-step graphs those steps replay a graph (counted) and every token matches eager steps."""
    from streampage.runner.mixed_graphs import MixedGraphs

    replays = []
    real_run = MixedGraphs.run

    def counted(self, input_ids, *args, **kwargs):
        replays.append(len(input_ids))
        return real_run(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(MixedGraphs, "run", counted)
    eager = greedy_tokens(checkpoint, max_num_batched_tokens=32)
    assert not replays
    assert greedy_tokens(checkpoint, max_num_batched_tokens=32, mixed_graph_max_tokens=32) == eager
    assert len(replays) >= 4 and max(replays) <= 32


def test_programmatic_launch_gives_the_same_tokens(checkpoint):
    """PDL changes when the decode kernels start, never what they compute (a kernel reading its input
    before the previous one finished would)."""
    assert greedy_tokens(checkpoint, programmatic_launch=False) == greedy_tokens(checkpoint, programmatic_launch=True)


@pytest.mark.parametrize("gemv", ["all", "row-parallel"])
def test_bf16_decode_through_the_gemv_with_programmatic_launch_runs_to_the_end(checkpoint, gemv):
    """bf16 with both decode options: every request produces its tokens and frees its blocks (the
    numerics are checked layer by layer in tests/test_fused_ops.py)."""
    tokens = greedy_tokens(checkpoint, dtype="bfloat16", decode_gemv=gemv, programmatic_launch=True)
    assert [len(t) for t in tokens] == [24] * len(PROMPTS)


def test_decode_graphs_taking_rows_longest_first_give_the_same_tokens(checkpoint):
    """`decode_longest_first` changes only the attention programs' launch order over the rows."""
    assert greedy_tokens(checkpoint, decode_longest_first=False) == greedy_tokens(checkpoint, decode_longest_first=True)


def test_async_scheduling_gives_the_same_tokens_with_graphs_and_padding(checkpoint):
    """Five prompts of different lengths finish at different steps: graph buckets pad, placeholders
    come from the device, and padding rows must never carry a stale placeholder."""
    assert greedy_tokens(checkpoint, async_scheduling=True) == greedy_tokens(checkpoint, async_scheduling=False)


def test_a_started_engine_builds_no_kernel_in_its_first_requests(checkpoint):
    """The warm-up at start-up built every Triton variant that the first requests need: greedy and
    sampled rows, one sequence and a batch past 16, prefill and decode."""
    from streampage import kernels

    llm = LLM(str(checkpoint), dtype="bfloat16", device="cuda", num_gpu_blocks=256)
    prompts = [[5 + i, 17, 99, 3, 250, 41][: 3 + i % 4] * (1 + i % 3) for i in range(20)]
    with kernels.new_variants() as built:
        llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
        llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.8), use_tqdm=False)  # the Triton sampler
    assert built == []

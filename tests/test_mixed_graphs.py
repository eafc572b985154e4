"""Mixed-step CUDA graphs (`streampage.runner.mixed_graphs`): how a step is padded to a graph's
buckets, and that the padded forward a graph records gives the unpadded step's logits. Without CUDA
the model's Triton path runs through the interpreter (tests/conftest.py); the graphs themselves are
checked against eager steps on the GPU (tests/test_gpu_engine.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from checkpoints import VOCAB_SIZE, make_checkpoint

from streampage import LLM, SamplingParams
from streampage.config import ConfigError, EngineConfig
from streampage.model import layers
from streampage.model.forward_context import AttentionMetadata, forward_context
from streampage.model.loader import load_model
from streampage.runner.mixed_graphs import (
    MixedBuffers,
    MixedGraphs,
    padded_forward,
    stage_mixed_rows,
    token_buckets,
)
from streampage.runner.profiling import mixed_graph_reserve_bytes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 16


def test_token_buckets_double_to_512_then_grow_by_512_up_to_the_limit() -> None:
    assert token_buckets(512) == [32, 64, 128, 256, 512]
    assert token_buckets(2048) == [32, 64, 128, 256, 512, 1024, 1536, 2048]
    assert token_buckets(1300) == [32, 64, 128, 256, 512, 1024, 1300]
    assert token_buckets(100) == [32, 64, 100]
    assert token_buckets(32) == [32]
    assert token_buckets(8) == [8]


def test_mixed_graph_max_tokens_is_bounded() -> None:
    assert EngineConfig.create(mixed_graph_max_tokens=512).runner.mixed_graph_max_tokens == 512
    for bad in (-1, 4097):
        with pytest.raises(ConfigError, match=r"mixed_graph_max_tokens must be in \[0, 4096\]"):
            EngineConfig.create(mixed_graph_max_tokens=bad)


def test_the_kv_budget_keeps_back_what_the_mixed_graphs_hold() -> None:
    """Their largest bucket's share of the profiled step's activations, and their logits rows."""
    off = EngineConfig.create()
    assert mixed_graph_reserve_bytes(off, 1 << 30, 1000, 2) == 0
    on = EngineConfig.create(mixed_graph_max_tokens=512, max_num_batched_tokens=8192, max_num_seqs=256)
    assert mixed_graph_reserve_bytes(on, 1 << 30, 1000, 2) == (1 << 30) // 16 + 256 * 1000 * 2
    capped = EngineConfig.create(mixed_graph_max_tokens=4096, max_num_batched_tokens=1024, max_num_seqs=8)
    assert mixed_graph_reserve_bytes(capped, 1 << 30, 1000, 2) == (1 << 30) + 8 * 1000 * 2


def test_staging_pads_tokens_to_the_bucket_and_sequences_to_every_row() -> None:
    tokens, seqs = np.full((3, 16), 99), np.full((3, 6), 99)
    stage_mixed_rows(tokens, seqs, input_ids=np.array([5, 6, 7]), positions=np.array([9, 0, 1]),
                     slot_mapping=np.array([40, 0, 1]), context_lens=np.array([10, 2]),
                     query_start_loc=np.array([0, 1, 3]), last_tokens=np.array([0, 2]), bucket=8)
    np.testing.assert_array_equal(tokens[:, :8], [[5, 6, 7, 0, 0, 0, 0, 0], [9, 0, 1, 0, 0, 0, 0, 0],
                                                  [40, 0, 1, -1, -1, -1, -1, -1]])
    assert (tokens[:, 8:] == 99).all()  # past the bucket: the graph never reads it
    np.testing.assert_array_equal(seqs, [[10, 2, 0, 0, 0, 0],  # padding sequences: context 0
                                         [0, 1, 3, 3, 3, 3],  # ... and empty chunks after the last token
                                         [0, 2, 0, 0, 0, 0]])  # unused gathers read token 0
    # A smaller step after a larger one rewrites every padding field.
    stage_mixed_rows(tokens, seqs, input_ids=np.array([4]), positions=np.array([3]), slot_mapping=np.array([3]),
                     context_lens=np.array([4]), query_start_loc=np.array([0, 1]), last_tokens=np.array([0]),
                     bucket=8)
    np.testing.assert_array_equal(tokens[2, :8], [3, -1, -1, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(seqs[:, :3], [[4, 0, 0], [0, 1, 1], [0, 0, 0]])


@pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it)")
# Padding tokens' attention rows are left as the buffer held them (by design: no real row reads
# them), so the interpreter may square garbage in the next RMSNorm.
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@torch.inference_mode()
def test_padded_forward_gives_the_unpadded_steps_logits(tmp_path, monkeypatch) -> None:
    """Sequence A (9 tokens cached) decodes its 10th while sequence B prefills 7 tokens: the step as a
    graph of a larger or an exact bucket computes it gives the eager step's logits for both sampled rows."""
    monkeypatch.setattr(layers, "use_triton", lambda x: True)  # the kernels a graph records
    loaded = load_model(make_checkpoint(tmp_path, "llama"), torch.float32, torch.device(DEVICE), progress=False)
    model, shape = loaded.model, loaded.shape
    pool = torch.zeros((shape.num_layers, 2, 4, BLOCK_SIZE, shape.num_kv_heads, shape.head_dim), device=DEVICE)
    model.bind_kv_cache(pool)
    tables = np.array([[0, 3], [1, 3]], dtype=np.int32)  # A in block 0, B in block 1
    prompt_a = torch.arange(3, 12, device=DEVICE)
    prefill = AttentionMetadata(torch.arange(9, device=DEVICE), torch.tensor(tables[:1], device=DEVICE),
                                torch.tensor([9], dtype=torch.int32, device=DEVICE),
                                torch.tensor([0, 9], dtype=torch.int32, device=DEVICE), is_decode=False)
    with forward_context(prefill):
        model(prompt_a, torch.arange(9, device=DEVICE))

    ids = np.array([50, 20, 21, 22, 23, 24, 25, 26], dtype=np.int64)
    positions = np.array([9, 0, 1, 2, 3, 4, 5, 6], dtype=np.int64)
    slots = np.array([9, 16, 17, 18, 19, 20, 21, 22], dtype=np.int64)
    lens, starts, last_tokens = np.array([10, 7], np.int32), np.array([0, 1, 8], np.int32), np.array([0, 7])
    step = AttentionMetadata(torch.tensor(slots, device=DEVICE), torch.tensor(tables, device=DEVICE),
                             torch.tensor(lens, device=DEVICE), torch.tensor(starts, device=DEVICE), is_decode=False)
    with forward_context(step):
        hidden = model(torch.tensor(ids, device=DEVICE), torch.tensor(positions, device=DEVICE))
    expected = model.compute_logits(hidden[torch.tensor(last_tokens, device=DEVICE)])

    # 32 tokens over 5 sequence rows; then 8 tokens (exactly the step's) with room for 40 sequences,
    # of which an 8-token bucket uses 8 rows.
    for max_seqs, bucket, rows in ((5, 32, 5), (40, 8, 8)):
        buffers = MixedBuffers.allocate(32, max_seqs, 4, torch.device(DEVICE))
        buffers.load(ids, positions, slots, lens, starts, last_tokens, tables, bucket=bucket)
        padded = padded_forward(model, buffers, bucket)
        assert padded.shape == (rows, shape.vocab_size)
        torch.testing.assert_close(padded[:2], expected, rtol=1e-4, atol=1e-4)


class _NoEvent:
    """torch.cuda.Event's part that MixedGraphs uses, for a CPU run."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _EagerReplay:
    """A captured graph's stand-in on the CPU: replaying runs what the capture would have recorded."""

    def __init__(self, graphs: MixedGraphs, bucket: int, replays: list[int]) -> None:
        self.graphs, self.bucket, self.replays = graphs, bucket, replays

    def replay(self) -> None:
        self.replays.append(self.bucket)
        padded_forward(self.graphs.model, self.graphs.buffers, self.bucket, self.graphs.buffers.logits)


def test_engine_steps_staged_for_mixed_graphs_give_the_eager_tokens(tmp_path, monkeypatch) -> None:
    """The runner's mixed-graph path end to end on the CPU, each replay standing in for a graph by
    running the padded forward: staging over many steps (placeholders of async scheduling, padding
    rewritten as steps shrink, the sampled rows' logits) gives the eager engine's tokens."""
    model_dir = make_checkpoint(tmp_path, "llama")
    prompts = [[5, 17, 99, 3, 250, 41, 8], [300, 12], list(range(20, 61)), [7] * 19, [101, 102] * 30]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    options = {"device": "cpu", "dtype": "float32", "max_num_seqs": 8, "max_num_batched_tokens": 32}

    def tokens(llm: LLM) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    eager = tokens(LLM(str(model_dir), **options))
    llm = LLM(str(model_dir), **options)
    runner = llm.engine.executor.runner
    monkeypatch.setattr(torch.cuda, "Event", _NoEvent)
    graphs = MixedGraphs(runner.model, 32, 8, runner.inputs.mirror.table.shape[1], torch.device("cpu"))
    graphs.buffers.logits = torch.empty(8, VOCAB_SIZE)  # what the largest bucket's capture allocates
    replays: list[int] = []
    graphs.graphs = {bucket: _EagerReplay(graphs, bucket, replays) for bucket in graphs.buckets}
    runner.mixed_graphs = graphs
    assert tokens(llm) == eager
    assert len(replays) >= 4 and set(replays) <= {32}


def test_a_step_fits_a_graph_when_its_bucket_holds_its_tokens_and_rows(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "Event", _NoEvent)
    graphs = MixedGraphs(None, 128, 40, 4, torch.device("cpu"))  # buckets 32, 64, 128; 40 sequence rows
    assert not graphs.fits(10, 2)  # nothing captured yet
    graphs.graphs = dict.fromkeys(graphs.buckets)
    assert graphs.fits(30, 30) and graphs.fits(128, 40) and graphs.fits(1, 1)
    assert not graphs.fits(129, 1)  # past the largest bucket
    assert not graphs.fits(30, 33)  # more rows than the 32-token bucket has
    assert not graphs.fits(100, 41)  # more sequences than rows


def test_capture_buckets_runs_largest_first_and_shares_the_largest_output(monkeypatch) -> None:
    """The capture loop both graph kinds use, with CUDA's graph calls stubbed: each bucket runs once
    eagerly then once captured, largest first; the largest bucket's captured output is the buffer the
    others are given."""
    import contextlib

    from streampage.runner import cuda_graphs

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (0, 0))
    calls = []

    def forward(bucket: int, out: torch.Tensor | None) -> torch.Tensor:
        calls.append((bucket, None if out is None else out.shape[0]))
        return torch.zeros(bucket) if out is None else out[:bucket]

    graphs, out = cuda_graphs.capture_buckets([8, 1, 4], forward, pool=(0, 0), what="test")
    assert sorted(graphs) == [1, 4, 8] and out.shape == (8,)
    assert calls == [(8, None), (8, None), (4, 8), (4, 8), (1, 8), (1, 8)]

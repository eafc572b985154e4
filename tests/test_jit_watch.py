"""kernels.new_variants: the benches' report of Triton kernels built inside a timed run. On the CPU
(Triton's interpreter builds nothing) the hook's plumbing, and the padding that keeps step-sized row
strides in one specialisation class; on CUDA, that a new batch size builds no new variant of the
kernels whose launches vary with the step (sampling, paged prefill, eager decode)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from streampage import kernels

knobs = pytest.importorskip("triton").knobs


def test_the_hook_records_each_build_and_is_restored_even_after_an_error() -> None:
    outer: list[str] = []
    knobs.runtime.jit_cache_hook = lambda **kwargs: outer.append(kwargs["fn"].name)
    try:
        with pytest.raises(RuntimeError), kernels.new_variants() as built:
            knobs.runtime.jit_cache_hook(fn=SimpleNamespace(name="_prefill_kernel"), key=None)
            knobs.runtime.jit_cache_hook(fn=SimpleNamespace(name="_sample_kernel"), key=None)
            raise RuntimeError("the timed run failed")
        assert built == ["_prefill_kernel", "_sample_kernel"]
        assert outer == ["_prefill_kernel", "_sample_kernel"]  # a hook installed before still sees them
        knobs.runtime.jit_cache_hook(fn=SimpleNamespace(name="after"), key=None)
        assert built == ["_prefill_kernel", "_sample_kernel"] and outer[-1] == "after"
    finally:
        knobs.runtime.jit_cache_hook = None


def test_row_strides_that_follow_the_step_stay_multiples_of_16() -> None:
    """The attention kernels keep their row strides specialised (one variant per class: 1, a multiple
    of 16, other; and a multiple of 16 keeps vector loads aligned), so whatever follows the step is
    padded: decode partials for any split count, and the runner's block tables for any context."""
    from streampage.kernels import DecodeWorkspace
    from streampage.runner.step_inputs import StepInputBuilder

    for num_splits in (2, 3, 8, 17, 64):
        workspace = DecodeWorkspace.allocate(3, 32, 128, num_splits, "cpu")
        strides = workspace.partial_out.stride()[:3] + workspace.partial_lse.stride()[:2]
        assert all(stride % 16 == 0 for stride in strides), (num_splits, strides)
    builder = StepInputBuilder(block_size=16, max_blocks_per_seq=300)
    assert builder.mirror.table.shape[1] == 304
    for step, context in enumerate((1, 16, 17, 257, 4000)):
        seq = SimpleNamespace(seq_id=step, token_ids=list(range(context)), num_computed_tokens=0)
        out = SimpleNamespace(seqs=[seq], block_tables=[list(range(-(-context // 16)))], rewritten_seq_ids=set(),
                              dropped_seq_ids=[step - 1] if step else [], is_decode_only=False,
                              num_new_tokens=[context], num_batched_tokens=context)
        assert builder.build(out).block_tables.shape[1] % 16 == 0, context


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_and_attention_build_one_variant_for_every_batch_size() -> None:
    """Sizes 17..256 rows (sampling), 1..256 sequences with block tables as wide as the runner makes
    them (prefill), and eager decode's split counts and table widths: after the first of each variant
    range, none builds a kernel. A variant per size would compile inside a serving run (session 5 saw
    seconds of it)."""
    from test_kernels import build_batch

    vocab = 151936
    temperature = torch.full((256,), 0.7, device="cuda")
    seed = torch.tensor([1], dtype=torch.int64, device="cuda")
    for rows in (17, 256):  # the first size of each variant range builds it
        kernels.sample_tokens(torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16),
                              temperature[:rows], seed)
    with kernels.new_variants() as built:
        for rows in (18, 33, 64, 100, 129, 255):
            kernels.sample_tokens(torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16),
                                  temperature[:rows], seed)
    assert built == []

    def batch(num_seqs: int, context: int, query: int):
        """Block tables padded like an eager step's (`kernels.aligned_width`)."""
        made = build_batch([context] * num_seqs, [query] * num_seqs, block_size=16, q_heads=8, kv_heads=2,
                           head_dim=64, dtype=torch.bfloat16, device="cuda")
        width = kernels.aligned_width(made.block_tables.shape[1])
        made.block_tables = torch.nn.functional.pad(made.block_tables, (0, width - made.block_tables.shape[1]))
        return made

    def prefill(num_seqs: int, context: int) -> None:
        b = batch(num_seqs, context, 3)
        kernels.paged_prefill(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.context_lens, 0.125)

    def decode(num_seqs: int, context: int, num_splits: int) -> None:
        b = batch(num_seqs, context, 1)
        kernels.paged_decode(b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, 0.125,
                             num_splits=num_splits, config=kernels.DecodeConfig(64, 4, 3))

    prefill(1, 40)
    prefill(17, 40)
    for num_splits in (1, 4, 32):  # the merge's tile follows the split count's power of two
        decode(3, 700, num_splits)
    with kernels.new_variants() as built:
        for num_seqs, context in ((18, 40), (40, 5), (100, 300), (200, 250), (256, 17), (2, 60)):
            prefill(num_seqs, context)  # table widths 16 and 32
        for num_seqs, context, num_splits in ((1, 4000, 32), (5, 900, 4), (64, 300, 3), (7, 5000, 17), (2, 20, 1)):
            decode(num_seqs, context, num_splits)  # table widths 16 to 320, partials of 1 to 64 rows
    assert built == []

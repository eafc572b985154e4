"""Triton kernels against `streampage.kernels.reference`.

Without CUDA they run on CPU tensors through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET before any kernel is defined), in fp32 and fp16 (bf16 tl.dot is wrong in the
interpreter); with CUDA the same cases run on the GPU. Shapes are tiny: the interpreter costs
milliseconds per program. Every pool slot that no sequence owns holds NaN, and unused block-table
columns point at an all-NaN block, so any read outside a sequence's context shows up in the output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streampage import kernels
from streampage.kernels import reference
from streampage.kernels.arrival_counters import all_zero
from streampage.kernels.paged_attention import (
    GRAPH_PROGRAMS_PER_SM,
    MAX_SPLITS,
    MIN_SPLIT_TOKENS,
    SATURATING_TILES,
    DecodeConfig,
    DecodeWorkspace,
    PrefillConfig,
    decode_split_plan,
    graph_split_plan,
    min_split_tokens,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it)", allow_module_level=True)

TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
# Small tiles so that tiny contexts still take several iterations, splits and masked tails.
SMALL_DECODE = DecodeConfig(block_n=16, num_warps=4, num_stages=2)
SMALL_PREFILL = PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)
# Key tiles of several pages for blocks of 8-32 (one page at 64), Q fed from registers, a register cap
# (ignored by the interpreter, exercised on a GPU).
WIDE_PREFILL = PrefillConfig(block_m=32, block_n=64, num_warps=4, num_stages=2, q_in_registers=True, maxnreg=128)


@dataclass
class PagedBatch:
    k_cache: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    q: torch.Tensor  # [num_tokens, q_heads, head_dim]


def build_batch(
    context_lens: list[int], query_lens: list[int], *, q_heads: int, kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, device: str = DEVICE, seed: int = 0, spare_blocks: int = 2,
) -> PagedBatch:
    """Sequences on shuffled physical blocks; slots outside every context hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_needed) + spare_blocks + 1
    physical = torch.randperm(num_blocks, generator=gen)
    poison = int(physical[-1])  # an all-NaN block that every unused table column points at
    tables = torch.full((len(context_lens), max(blocks_needed, default=0) + 1), poison, dtype=torch.int32)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    next_block = 0
    for i, (length, count) in enumerate(zip(context_lens, blocks_needed, strict=True)):
        tables[i, :count] = physical[next_block : next_block + count].to(torch.int32)
        next_block += count
        for j in range(count):
            owned[tables[i, j], : min(block_size, length - j * block_size)] = True
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).masked_fill(~owned[..., None, None], float("nan"))
    v = torch.randn(shape, generator=gen).masked_fill(~owned[..., None, None], float("nan"))
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], q_heads, head_dim, generator=gen)
    return PagedBatch(
        k.to(device, dtype), v.to(device, dtype), tables.to(device),
        torch.tensor(context_lens, dtype=torch.int32, device=device),
        torch.tensor(starts, dtype=torch.int32, device=device),
        q.to(device, dtype),
    )


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Elementwise |a - e| <= tol * (1 + |e|); on failure name the rows (tokens) and heads that differ."""
    nonfinite = ~torch.isfinite(actual)
    assert not nonfinite.any(), f"{what}: non-finite at (row, head) {nonfinite.any(-1).nonzero().tolist()[:20]}"
    err = (actual.float() - expected.float()).abs()
    bad = err > tol * (1 + expected.float().abs())
    if bad.any():
        worst = divmod(int(err.argmax()), err.shape[-1])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off; max error {float(err.max()):.3g} "
            f"at flat (row*head, dim) {worst}; bad (row, head): {bad.any(-1).nonzero().tolist()[:20]}"
        )


def run_decode(batch: PagedBatch, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    scale = batch.q.shape[-1] ** -0.5
    if "num_splits" in kwargs:  # tiny contexts: splits as short as a tile, so that they split at all
        kwargs.setdefault("min_split_len", 1)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens, scale)
    return kernels.paged_decode(*args, **kwargs), reference.paged_decode(*args)


def run_prefill(batch: PagedBatch, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    scale = batch.q.shape[-1] ** -0.5
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.query_start_loc,
            batch.context_lens)
    actual = kernels.paged_prefill(*args, scale, **kwargs)
    return actual, reference.paged_prefill(*args, scale)


# (block_size, head_dim, q_heads, kv_heads): every block size, both head dims, GQA groups 1, 3, 4, 8.
LAYOUTS = [(8, 64, 2, 2), (16, 128, 8, 2), (32, 64, 8, 1), (64, 64, 6, 2)]
DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("block_size", "head_dim", "q_heads", "kv_heads"), LAYOUTS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference(block_size, head_dim, q_heads, kv_heads, dtype, num_splits) -> None:
    lengths = [1, 15, 16, 17, 0, 2 * block_size + 1, 70]
    batch = build_batch(lengths, [1] * len(lengths), q_heads=q_heads, kv_heads=kv_heads,
                        head_dim=head_dim, block_size=block_size, dtype=dtype)
    actual, expected = run_decode(batch, num_splits=num_splits, config=SMALL_DECODE)
    assert_matches(actual, expected, TOLERANCE[dtype], f"decode lengths={lengths}")
    assert not actual[4].any(), "a row with context_len 0 must give zeros"


def test_decode_empty_splits_reused_workspace_and_out() -> None:
    """More splits than tiles (most splits empty), one oversized workspace for two launches, out=."""
    workspace = DecodeWorkspace.allocate(8, 8, 64, 12, DEVICE)
    out = torch.full((3, 8, 64), float("nan"), device=DEVICE)
    for seed, lengths in enumerate([[0, 1, 17], [33, 0, 5]]):
        batch = build_batch(lengths, [1, 1, 1], q_heads=8, kv_heads=2, head_dim=64, block_size=16,
                            dtype=torch.float32, seed=seed)
        actual, expected = run_decode(batch, num_splits=8, workspace=workspace, out=out, config=SMALL_DECODE)
        assert actual is out
        assert_matches(actual, expected, TOLERANCE[torch.float32], f"decode lengths={lengths}")


@pytest.mark.parametrize("min_split", [1, 16, 20, 48, 1000])
def test_decode_min_split_len_balances_mixed_lengths(min_split) -> None:
    """With a minimum split length, long rows use several splits, merged by the last to finish, and
    short ones one (written directly): lengths on both sides of every split boundary, a row of 0, one
    workspace reused with a stale partial from a launch where the same row used more splits."""
    workspace = DecodeWorkspace.allocate(6, 8, 64, 4, DEVICE)
    out = torch.full((6, 8, 64), float("nan"), device=DEVICE)
    for seed, lengths in enumerate([[70, 1, 0, 16, 17, 49], [3, 70, 33, 0, 48, 15]]):
        batch = build_batch(lengths, [1] * 6, q_heads=8, kv_heads=2, head_dim=64, block_size=8,
                            dtype=torch.float32, seed=seed)
        actual, expected = run_decode(batch, num_splits=4, workspace=workspace, out=out, config=SMALL_DECODE,
                                      min_split_len=min_split)
        assert_matches(actual, expected, TOLERANCE[torch.float32], f"decode lengths={lengths} min {min_split}")
        assert not actual[lengths.index(0)].any()
        assert all_zero(), "the last split of a row must put its arrival counter back to zero"


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_rows_taken_in_any_launch_order_give_the_same_outputs(num_splits) -> None:
    """row_order only changes which program takes which row: longest first, a shuffle and the
    identity give each row the output it has without an order (and the reference's)."""
    lengths = [5, 70, 0, 33, 17, 49]
    batch = build_batch(lengths, [1] * 6, q_heads=8, kv_heads=2, head_dim=64, block_size=8, dtype=torch.float32)
    plain, expected = run_decode(batch, num_splits=num_splits, config=SMALL_DECODE)
    assert_matches(plain, expected, TOLERANCE[torch.float32], "decode without an order")
    longest_first = sorted(range(6), key=lambda i: -lengths[i])
    for order in (longest_first, [3, 0, 5, 1, 4, 2], list(range(6))):
        rows = torch.tensor(order, dtype=torch.int32, device=DEVICE)
        actual, _ = run_decode(batch, num_splits=num_splits, config=SMALL_DECODE, row_order=rows)
        torch.testing.assert_close(actual, plain, rtol=0, atol=0, msg=f"order {order}")
        assert all_zero()


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(8, 2), (8, 1), (4, 4)])
def test_decode_merges_many_splits_in_chunks(q_heads, kv_heads) -> None:
    """Up to 13 splits of one row merged by the last to finish, several SPLIT_CHUNK steps of the
    vectorised merge (groups of 4, 8 and 1 query heads per KV head), beside one-split and empty rows."""
    batch = build_batch([200, 130, 1, 0, 64], [1] * 5, q_heads=q_heads, kv_heads=kv_heads, head_dim=64,
                        block_size=8, dtype=torch.float32, seed=3)
    actual, expected = run_decode(batch, num_splits=20, config=SMALL_DECODE)
    assert_matches(actual, expected, TOLERANCE[torch.float32], f"decode q {q_heads} kv {kv_heads}")
    assert all_zero()


def test_graph_split_plan() -> None:
    """Decode graphs aim for GRAPH_PROGRAMS_PER_SM programs per SM whatever the lengths turn out to be."""
    assert GRAPH_PROGRAMS_PER_SM * 132 == 2112
    assert graph_split_plan(256, 8, 132) == 1
    assert graph_split_plan(128, 8, 132) == 2
    assert graph_split_plan(64, 8, 132) == 4
    assert graph_split_plan(16, 8, 132) == 16
    assert graph_split_plan(1, 8, 132) == MAX_SPLITS
    assert graph_split_plan(1024, 8, 132) == 1


def test_min_split_tokens_drops_to_one_tile_only_while_sms_would_idle() -> None:
    assert min_split_tokens(1, 8, 132) == 1  # 8 programs: split short contexts tile by tile
    assert min_split_tokens(8, 8, 132) == 1
    assert min_split_tokens(9, 8, 132) == MIN_SPLIT_TOKENS  # 72 programs fill half the SMs
    assert min_split_tokens(256, 8, 132) == MIN_SPLIT_TOKENS
    assert min_split_tokens(1, 8, 1) == MIN_SPLIT_TOKENS  # the CPU interpreter: one "SM"


def test_decode_default_plan_and_strided_query() -> None:
    """Default tiles and split plan; q is a view into a fused QKV activation (row stride > heads*dim)."""
    lengths = [130, 64, 3]
    batch = build_batch(lengths, [1, 1, 1], q_heads=4, kv_heads=1, head_dim=64, block_size=16,
                        dtype=torch.float16)
    fused = torch.randn(3, 6 * 64, device=DEVICE, dtype=torch.float16)
    fused[:, : 4 * 64] = batch.q.flatten(1)
    batch.q = fused[:, : 4 * 64].view(3, 4, 64)
    actual, expected = run_decode(batch)
    assert_matches(actual, expected, TOLERANCE[torch.float16], "decode, strided q")


@pytest.mark.parametrize("config", [SMALL_PREFILL, WIDE_PREFILL], ids=["n16", "n64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("block_size", "head_dim", "q_heads", "kv_heads"), LAYOUTS)
@pytest.mark.parametrize(
    ("context_lens", "query_lens"),
    [
        ([1, 15, 16, 17, 40], [1, 15, 16, 17, 40]),  # whole prompts
        ([40, 33, 17, 16], [8, 17, 1, 16]),  # chunks over a cached prefix (prefix-cache hits)
        ([30, 20, 50, 0, 12, 45], [1, 20, 9, 0, 0, 1]),  # mixed: decode rows, prompt, chunk, idle rows
    ],
    ids=["prompts", "chunked", "mixed"],
)
def test_prefill_matches_reference(
    block_size, head_dim, q_heads, kv_heads, dtype, context_lens, query_lens, config
) -> None:
    batch = build_batch(context_lens, query_lens, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                        block_size=block_size, dtype=dtype)
    actual, expected = run_prefill(batch, config=config)
    assert_matches(actual, expected, TOLERANCE[dtype], f"prefill ctx={context_lens} q={query_lens}")


# Every (block size, key tile) pair; GQA groups 1, 4 and 8 in turn; diagonal tiles of 64 keys (or the
# whole tile) and of 16.
TILE_GEOMETRIES = [(bs, bn, (1, 4, 8)[i % 3], (64, 16)[i % 2])
                   for i, (bs, bn) in enumerate((bs, bn) for bs in (8, 16, 32, 64) for bn in (16, 32, 64, 128))]


@pytest.mark.parametrize(("block_size", "block_n", "group", "block_n_diag"), TILE_GEOMETRIES)
def test_prefill_page_granular_tiles(block_size, block_n, group, block_n_diag) -> None:
    """Key tiles of one to sixteen whole pages, or a slice of one page, addressed page by page;
    diagonal tiles narrower than the others. Ragged prompts, chunks over cached prefixes whose start
    is not tile- or page-aligned, a decode row and an idle row, key ranges ending mid-page and
    mid-tile."""
    context_lens = [130, 77, 64, 9, 40, 0]
    query_lens = [130, 30, 1, 9, 17, 0]
    batch = build_batch(context_lens, query_lens, q_heads=2 * group, kv_heads=2, head_dim=32,
                        block_size=block_size, dtype=torch.float32, seed=block_size + block_n + group)
    config = PrefillConfig(block_m=max(16, 8 * group), block_n=block_n, num_warps=4, num_stages=2,
                           block_n_diag=block_n_diag)
    actual, expected = run_prefill(batch, config=config)
    assert_matches(actual, expected, TOLERANCE[torch.float32], f"prefill block_size={block_size} {config}")


def test_prefill_launch_padded_as_a_cuda_graph_pads_it() -> None:
    """A mixed-step CUDA graph launches for its token and sequence buckets: q has rows no chunk covers,
    query_start_loc ends with empty chunks (context 0). The covered rows match the reference and the
    uncovered rows of `out` are left as they were."""
    batch = build_batch([30, 50, 12, 45], [1, 9, 12, 1], q_heads=8, kv_heads=2, head_dim=32, block_size=16,
                        dtype=torch.float32)
    expected = reference.paged_prefill(batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                                       batch.query_start_loc, batch.context_lens, 32**-0.5)
    tokens, pad_tokens, pad_seqs = batch.q.shape[0], 9, 21  # 25 sequences: past one compiled variant (16)
    q = torch.cat([batch.q, torch.randn(pad_tokens, *batch.q.shape[1:], device=DEVICE)])
    starts = torch.cat([batch.query_start_loc, torch.full((pad_seqs,), tokens, dtype=torch.int32, device=DEVICE)])
    lens = torch.cat([batch.context_lens, torch.zeros(pad_seqs, dtype=torch.int32, device=DEVICE)])
    tables = torch.cat([batch.block_tables, batch.block_tables[:1].expand(pad_seqs, -1)])
    out = torch.full_like(q, 7.0)
    kernels.paged_prefill(q, batch.k_cache, batch.v_cache, tables, starts, lens, 32**-0.5, out=out,
                          config=SMALL_PREFILL)
    assert_matches(out[:tokens], expected, TOLERANCE[torch.float32], "prefill, padded launch")
    assert torch.equal(out[tokens:], torch.full_like(out[tokens:], 7.0))


def widen_v(batch: PagedBatch) -> PagedBatch:
    """The batch with its V pool moved into a view of wider rows (NaN past each head's 32 values):
    the same values under other strides than K's."""
    wide = torch.full((*batch.v_cache.shape[:3], 48), float("nan"), device=DEVICE)
    wide[..., :32] = batch.v_cache
    batch.v_cache = wide[..., :32]
    assert batch.v_cache.stride() != batch.k_cache.stride()
    return batch


def test_prefill_distinct_k_and_v_layouts() -> None:
    """K and V pools with different strides (V a view into wider rows) take separate offsets."""
    batch = widen_v(build_batch([90, 33], [50, 33], q_heads=8, kv_heads=2, head_dim=32, block_size=16,
                                dtype=torch.float32))
    actual, expected = run_prefill(batch, config=WIDE_PREFILL)
    assert_matches(actual, expected, TOLERANCE[torch.float32], "prefill, V strides differ from K")


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_distinct_k_and_v_layouts(num_splits) -> None:
    """K and V pools with different strides (V a view into wider rows) take separate offsets; with
    the same strides the kernel reuses K's (SAME_KV_LAYOUT)."""
    lengths = [1, 15, 16, 17, 0, 70]
    batch = widen_v(build_batch(lengths, [1] * len(lengths), q_heads=8, kv_heads=2, head_dim=32, block_size=16,
                                dtype=torch.float32))
    actual, expected = run_decode(batch, num_splits=num_splits)
    assert_matches(actual, expected, TOLERANCE[torch.float32], "decode, V strides differ from K")


def test_prefill_default_config() -> None:
    """Largest tiles that fit the device's shared memory; 64 x 64 for wide heads and fp32."""
    hopper, ampere, small = 227 * 1024, 163 * 1024, 99 * 1024
    assert PrefillConfig.default(128, torch.bfloat16, hopper) == PrefillConfig(128, 128, 8, 3)
    assert PrefillConfig.default(128, torch.float16, None) == PrefillConfig(128, 128, 8, 3)
    assert PrefillConfig.default(128, torch.bfloat16, ampere) == PrefillConfig(128, 64, 8, 3)
    assert PrefillConfig.default(128, torch.bfloat16, small) == PrefillConfig(64, 64, 4, 2)
    assert PrefillConfig.default(64, torch.bfloat16, ampere) == PrefillConfig(128, 128, 8, 3)
    assert PrefillConfig.default(256, torch.bfloat16, hopper) == PrefillConfig(64, 64, 4, 2)
    assert PrefillConfig.default(128, torch.float32, hopper) == PrefillConfig(64, 64, 4, 2)


def test_prefill_default_tiles_and_out() -> None:
    batch = build_batch([150, 70], [150, 6], q_heads=8, kv_heads=2, head_dim=64, block_size=16,
                        dtype=torch.float16)
    out = torch.empty_like(batch.q)
    actual, expected = run_prefill(batch, out=out)
    assert actual is out
    assert_matches(actual, expected, TOLERANCE[torch.float16], "prefill, default tiles")


def test_gluon_prefill_refuses_what_it_cannot_run_and_names_why() -> None:
    """The Gluon kernel runs only on sm_90+ GPUs (its GPU tests are in tests/test_kernels_gpu.py);
    elsewhere, or with a config it cannot honour, a call asking for it fails with the reason, and the
    checks cover dtype and head size whatever the device."""
    from streampage.kernels.paged_prefill_gluon import gluon_prefill_unsupported

    batch = build_batch([40], [40], q_heads=8, kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"gluon=True.*Hopper GPU \(compute capability 9\.x\)"):
        run_prefill(batch, config=PrefillConfig(128, 128, 8, 3, gluon=True))
    refused = (PrefillConfig(64, 64, 8, 3, gluon=True), PrefillConfig(128, 64, 8, 3, maxnreg=128, gluon=True),
               PrefillConfig(128, 128, 8, 2, gluon=True), PrefillConfig(64, 64, 4, 3, q_in_registers=True, gluon=True),
               PrefillConfig(128, 64, 8, 4, gluon=True, gather_warps=2))
    for config in refused:
        with pytest.raises(ValueError, match=r"needs \(block_m, num_warps\) in \(\(64, 4\), \(128, 8\)\), at least"):
            run_prefill(batch, config=config)
    with pytest.raises(ValueError, match="gathers with its own warps only for 128 rows"):
        run_prefill(batch, config=PrefillConfig(64, 64, 4, 3, gluon=True, gather_warps=4))
    if not torch.cuda.is_available():
        return
    cuda = build_batch([40], [40], q_heads=8, kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16,
                       device="cuda")
    config = PrefillConfig(128, 128, 8, 3, gluon=True)
    assert gluon_prefill_unsupported(cuda.q.float(), cuda.k_cache, cuda.v_cache, 4, config) is not None
    assert "head_dim 64 or 128" in gluon_prefill_unsupported(cuda.q[..., :32], cuda.k_cache, cuda.v_cache, 4, config)


batches = st.lists(
    st.integers(0, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0 if n == 0 else 1, n))),
    min_size=1, max_size=4,
)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seqs=batches, block_size=st.sampled_from([8, 16]), kv_heads=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_random_batches_match_reference(seqs, block_size, kv_heads, group, seed) -> None:
    context_lens = [n for n, _ in seqs]
    query_lens = [m for _, m in seqs]
    layout = dict(q_heads=kv_heads * group, kv_heads=kv_heads, head_dim=32, block_size=block_size,
                  dtype=torch.float32, seed=seed)
    batch = build_batch(context_lens, query_lens, **layout)
    actual, expected = run_prefill(batch, config=SMALL_PREFILL)
    assert_matches(actual, expected, 1e-4, f"prefill ctx={context_lens} q={query_lens}")
    batch = build_batch(context_lens, [1] * len(seqs), **layout)
    actual, expected = run_decode(batch, num_splits=1 + seed % 4, config=SMALL_DECODE)
    assert_matches(actual, expected, 1e-4, f"decode ctx={context_lens}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [8, 16])
def test_store_kvcache_matches_reference(dtype, block_size) -> None:
    gen = torch.Generator().manual_seed(block_size)
    fused = torch.randn(6, 3, 2, 32, generator=gen).to(DEVICE)  # [tokens, q/k/v, kv_heads, head_dim]
    key, value = fused[:, 1], fused[:, 2]  # strided views, fp32 into a cache of `dtype`
    slots = torch.tensor([3, -1, 2 * block_size + 1, 5 * block_size - 1, 0, -1], device=DEVICE)
    caches = [torch.zeros(5, block_size, 2, 32, dtype=dtype, device=DEVICE) for _ in range(4)]
    kernels.store_kvcache(key, value, caches[0], caches[1], slots)
    reference.store_kvcache(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2])
    assert torch.equal(caches[1], caches[3])


def test_copy_blocks_matches_reference() -> None:
    pool = torch.randn(3, 2, 7, 8, 2, 32, device=DEVICE)
    expected = pool.clone()
    mapping = torch.tensor([[0, 4], [2, 5], [0, 6]], device=DEVICE)
    kernels.copy_blocks(pool, mapping)
    reference.copy_blocks(expected, mapping)
    assert torch.equal(pool, expected)
    kernels.copy_blocks(pool, mapping[:0])
    assert torch.equal(pool, expected)


def test_decode_split_plan() -> None:
    assert decode_split_plan(64, 8, 2048, 132) == 1  # 512 programs already fill the GPU
    assert decode_split_plan(256, 8, 1024, 132) == 1
    assert decode_split_plan(1, 8, 8192, 132) == 8192 // MIN_SPLIT_TOKENS  # bounded by split length
    assert decode_split_plan(4, 8, 8192, 132) == 8  # about two programs per SM
    assert decode_split_plan(16, 8, 4096, 132) == 2
    assert decode_split_plan(32, 8, 8192, 132) == 1  # 256 programs: close enough to two per SM
    assert decode_split_plan(1, 8, 100, 132) == 1  # too short to split
    assert decode_split_plan(1, 1, 10**6, 132) == MAX_SPLITS


def test_decode_stages_follow_the_wave_model() -> None:
    """H200 (132 SMs, 228 KB of shared memory each), the 8B heads: five programs an SM at two stages,
    three at three. The stage count whose last wave keeps HBM busy wins; ties keep the rule by
    programs an SM, which is all there is without the SM's shared memory."""
    sms, shared = 132, 233472
    assert DecodeConfig(64, 4, 2).shared_bytes(128) == 38912  # as Triton 3.6 lays the kernel out for sm_90
    assert DecodeConfig(64, 4, 3).shared_bytes(128) == 71680
    assert DecodeConfig.default(128, 256, sms, shared).num_stages == 3  # B32/8k: under two an SM
    assert DecodeConfig.default(128, 512, sms, shared).num_stages == 2  # B64/2k: one wave at five an SM
    # B256/1k: 2048 programs leave 68 for a fourth wave of 660 (one tile each in flight: too few) or
    # a sixth of 396 (two tiles each)
    assert DecodeConfig(64, 4, 2).wave_cost(2048, sms, shared, 128) == 3 * 660 + SATURATING_TILES
    assert DecodeConfig.default(128, 2048, sms, shared).num_stages == 3
    assert DecodeConfig.default(128, 1792, sms, shared).num_stages == 2  # B224/1k: a last wave of 472 ties
    assert DecodeConfig.default(128, 1536, sms, shared).num_stages == 3  # B192/1k: 216 at five an SM
    assert DecodeConfig.default(128, 2048, sms).num_stages == 2
    assert DecodeConfig.default(128, 256, sms).num_stages == 3
    assert DecodeConfig.default(64, 2048, sms, shared).block_n == 128  # 16 KB tiles of K


def test_rejects_unsupported_shapes() -> None:
    batch = build_batch([4], [1], q_heads=4, kv_heads=2, head_dim=32, block_size=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        kernels.paged_decode(batch.q[:, :3], batch.k_cache, batch.v_cache, batch.block_tables,
                             batch.context_lens, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        kernels.paged_decode(batch.q[..., :24], batch.k_cache[..., :24], batch.v_cache[..., :24],
                             batch.block_tables, batch.context_lens, 1.0)
    batch = build_batch([30], [30], q_heads=4, kv_heads=2, head_dim=32, block_size=24, dtype=torch.float32)
    with pytest.raises(ValueError, match="power-of-two block size"):
        run_prefill(batch)


def test_launch_wrappers_integer_helpers_match_triton() -> None:
    """kernels/host_math.py replaces triton.cdiv / next_power_of_2 in the launch wrappers (those are
    constexpr functions, slow to call from Python): same results."""
    import triton

    from streampage.kernels.host_math import cdiv, next_power_of_2

    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 300) for b in range(1, 40))

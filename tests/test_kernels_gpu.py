"""Triton kernels on a CUDA device at real sizes: bf16/fp16/fp32 against the reference, replay inside a
CUDA graph with new inputs, and pools past 2^31 elements (64-bit offsets). Skipped without CUDA.

Failures name the sequence rows and heads that differ; `pytest -s` also prints each case's split plan.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import TOLERANCE, assert_matches, build_batch, run_decode, run_prefill

from streampage import kernels
from streampage.bench.kernels import config_name, prefill_candidates
from streampage.kernels import reference
from streampage.kernels.arrival_counters import all_zero
from streampage.kernels.paged_attention import DecodeWorkspace, decode_split_plan, num_sms

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# (block_size, head_dim, q_heads, kv_heads, dtype): the Llama-3-8B shape first, then the edges.
LAYOUTS = [
    (16, 128, 32, 8, torch.bfloat16),
    (8, 64, 8, 8, torch.bfloat16),  # MHA
    (32, 128, 56, 8, torch.float16),  # group 7 (padded to 8 rows per token)
    (64, 256, 16, 2, torch.bfloat16),  # group 8, wide heads
    (16, 128, 32, 8, torch.float32),
]
LAYOUT_IDS = [f"bs{b}-d{d}-q{q}-kv{kv}-{str(t)[6:]}" for b, d, q, kv, t in LAYOUTS]


@pytest.mark.parametrize(("block_size", "head_dim", "q_heads", "kv_heads", "dtype"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("num_splits", [None, 1, 7, 32])
def test_decode_matches_reference(block_size, head_dim, q_heads, kv_heads, dtype, num_splits) -> None:
    lengths = [1, 15, 16, 17, 0, 1000, 4097, 8192]
    batch = build_batch(lengths, [1] * len(lengths), q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                        block_size=block_size, dtype=dtype, device="cuda")
    actual, expected = run_decode(batch, num_splits=num_splits)
    plan = decode_split_plan(len(lengths), kv_heads, batch.block_tables.shape[1] * block_size,
                             num_sms(batch.q.device))
    print(f"decode splits={num_splits} (plan {plan}) lengths={lengths}")
    assert_matches(actual, expected, TOLERANCE[dtype], f"decode splits={num_splits} lengths={lengths}")
    assert not actual[4].any(), "a row with context_len 0 must give zeros"
    assert all_zero(), "the last split of every row must put its arrival counter back to zero"


@pytest.mark.parametrize(("block_size", "head_dim", "q_heads", "kv_heads", "dtype"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize(
    ("context_lens", "query_lens"),
    [
        ([1, 15, 16, 17, 1000, 2048], [1, 15, 16, 17, 1000, 2048]),  # whole prompts
        ([3000, 2049, 700], [500, 1, 129]),  # chunks over cached prefixes
        ([300, 1024, 0, 77, 5000], [1, 1024, 0, 0, 1]),  # mixed: decode rows, a prompt, idle rows
    ],
    ids=["prompts", "chunked", "mixed"],
)
def test_prefill_matches_reference(
    block_size, head_dim, q_heads, kv_heads, dtype, context_lens, query_lens
) -> None:
    batch = build_batch(context_lens, query_lens, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                        block_size=block_size, dtype=dtype, device="cuda")
    actual, expected = run_prefill(batch)
    assert_matches(actual, expected, TOLERANCE[dtype], f"prefill ctx={context_lens} q={query_lens}")


@pytest.mark.parametrize("config", prefill_candidates(), ids=config_name)
@pytest.mark.parametrize(
    ("context_lens", "query_lens"),
    [([2048, 1000, 17], [2048, 1000, 17]), ([3000, 2049, 700, 300], [500, 1, 129, 1])],
    ids=["prompts", "chunked"],
)
def test_prefill_sweep_candidates(config, context_lens, query_lens) -> None:
    """Every config `streampage bench kernels --prefill-sweep` times, on the Llama-3-8B shape in bf16,
    including chunks over cached prefixes and decode rows (the sweep itself checks whole prompts)."""
    batch = build_batch(context_lens, query_lens, q_heads=32, kv_heads=8, head_dim=128, block_size=16,
                        dtype=torch.bfloat16, device="cuda")
    actual, expected = run_prefill(batch, config=config)
    assert_matches(actual, expected, TOLERANCE[torch.bfloat16], f"prefill {config_name(config)} ctx={context_lens}")


GLUON_LAYOUTS = [layout for layout in LAYOUTS if layout[1] in (64, 128) and layout[4] != torch.float32]
GLUON_CONFIGS = [config for config in prefill_candidates() if config.gluon]


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9,
                    reason="the Gluon prefill needs a Hopper GPU")
@pytest.mark.parametrize("config", GLUON_CONFIGS, ids=config_name)
@pytest.mark.parametrize(("block_size", "head_dim", "q_heads", "kv_heads", "dtype"), GLUON_LAYOUTS,
                         ids=[LAYOUT_IDS[LAYOUTS.index(layout)] for layout in GLUON_LAYOUTS])
@pytest.mark.parametrize(
    ("context_lens", "query_lens"),
    [([1, 15, 16, 17, 1000, 2048], [1, 15, 16, 17, 1000, 2048]), ([3000, 2049, 700], [500, 1, 129]),
     ([300, 1024, 0, 77, 5000], [1, 1024, 0, 0, 1])],
    ids=["prompts", "chunked", "mixed"],
)
def test_gluon_prefill_matches_reference(block_size, head_dim, q_heads, kv_heads, dtype, config, context_lens,
                                         query_lens) -> None:
    """The Gluon prefill on every 16-bit layout it takes (MHA, 16 rows per token, block sizes 8-32)
    and on prompts, chunks over cached prefixes and mixed batches, as the Triton kernel is tested."""
    batch = build_batch(context_lens, query_lens, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                        block_size=block_size, dtype=dtype, device="cuda")
    actual, expected = run_prefill(batch, config=config)
    assert_matches(actual, expected, TOLERANCE[dtype], f"gluon prefill {config_name(config)} ctx={context_lens}")


def test_prefill_default_is_the_gluon_kernel_on_hopper_where_it_applies() -> None:
    """On a Hopper GPU `paged_prefill` without a config runs HOPPER_PREFILL on 16-bit caches with
    head_dim 64 or 128, and the Triton kernel's default elsewhere (fp32, other GPUs)."""
    from streampage.kernels.paged_attention import HOPPER_PREFILL, _default_prefill, is_hopper

    bf16 = build_batch([40], [40], q_heads=32, kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16,
                       device="cuda")
    chosen = _default_prefill(bf16.q, bf16.k_cache, bf16.v_cache, 4, 128)
    assert chosen == HOPPER_PREFILL if is_hopper(bf16.q.device) else not chosen.gluon
    fp32 = build_batch([40], [40], q_heads=32, kv_heads=8, head_dim=128, block_size=16, dtype=torch.float32,
                       device="cuda")
    assert not _default_prefill(fp32.q, fp32.k_cache, fp32.v_cache, 4, 128).gluon


@pytest.mark.parametrize("stages", [2, 3])
def test_decode_shared_memory_is_what_the_wave_model_counts(stages) -> None:
    """`DecodeConfig.shared_bytes`, with which `wave_cost` counts programs an SM, is the shared memory
    of the kernel Triton compiles for the 8B heads (K and V of one layout, as the cache engine makes)."""
    from streampage.kernels.paged_attention import DecodeConfig, _decode_kernel

    batch = build_batch([300, 40], [1, 1], q_heads=32, kv_heads=8, head_dim=128, block_size=16,
                        dtype=torch.bfloat16, device="cuda")
    config = DecodeConfig(64, 4, stages)
    actual, expected = run_decode(batch, num_splits=1, config=config)
    assert_matches(actual, expected, TOLERANCE[torch.bfloat16], f"decode at {stages} stages")

    def constant(kernel, name: str) -> object:
        return kernel.src.constants.get((_decode_kernel.arg_names.index(name),))

    compiled = [kernel for kernel in _decode_kernel.device_caches[torch.cuda.current_device()][0].values()
                if kernel.metadata.num_stages == stages and kernel.src.signature["k_ptr"] == "*bf16"
                and [constant(kernel, name) for name in ("HEAD_DIM", "GROUP", "BLOCK_N", "SAME_KV_LAYOUT", "SPLIT")]
                == [128, 4, 64, True, False]]
    assert compiled and {kernel.metadata.shared for kernel in compiled} == {config.shared_bytes(128)}


@pytest.mark.parametrize("num_seqs", [8, 64])
def test_store_and_decode_replay_in_cuda_graph(num_seqs) -> None:
    """Capture store_kvcache + paged_decode once, as the runner does for a batch-size bucket, then replay
    with new queries, context lengths, block tables and slots (padding rows: slot -1, length 0)."""
    q_heads, kv_heads, head_dim, block_size, max_context = 32, 8, 128, 16, 4096
    dtype, device = torch.bfloat16, torch.device("cuda")
    max_blocks = max_context // block_size
    num_blocks = num_seqs * max_blocks + 1
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    q = torch.zeros(num_seqs, q_heads, head_dim, dtype=dtype, device=device)
    new_k = torch.zeros(num_seqs, kv_heads, head_dim, dtype=dtype, device=device)
    new_v = torch.zeros_like(new_k)
    slots = torch.full((num_seqs,), -1, dtype=torch.int64, device=device)
    tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int32, device=device)
    lengths = torch.zeros(num_seqs, dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    num_splits = decode_split_plan(num_seqs, kv_heads, max_context, num_sms(device))
    workspace = DecodeWorkspace.allocate(num_seqs, q_heads, head_dim, num_splits, device)
    scale = head_dim**-0.5

    def step() -> None:
        kernels.store_kvcache(new_k, new_v, k_cache, v_cache, slots)
        kernels.paged_decode(q, k_cache, v_cache, tables, lengths, scale, out=out, num_splits=num_splits,
                             workspace=workspace)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles every kernel before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    gen = torch.Generator().manual_seed(num_seqs)
    for trial in range(4):
        new_lengths = torch.randint(0, max_context + 1, (num_seqs,), generator=gen)
        new_lengths[: min(4, num_seqs)] = torch.tensor([1, 17, max_context, 0][: min(4, num_seqs)])
        if trial == 3:
            new_lengths[:] = 0  # an all-padding batch
        table = torch.randperm(num_blocks - 1, generator=gen)[: num_seqs * max_blocks].view(num_seqs, -1) + 1
        new_slots = torch.where(
            new_lengths > 0,
            table.gather(1, ((new_lengths - 1).clamp(min=0) // block_size)[:, None])[:, 0] * block_size
            + (new_lengths - 1).clamp(min=0) % block_size,
            -1,
        )
        q.copy_(torch.randn(q.shape, generator=gen))
        new_k.copy_(torch.randn(new_k.shape, generator=gen))
        new_v.copy_(torch.randn(new_v.shape, generator=gen))
        tables.copy_(table)
        lengths.copy_(new_lengths)
        slots.copy_(new_slots)
        graph.replay()
        torch.cuda.synchronize()
        written = new_slots >= 0
        blocks, offsets = new_slots[written] // block_size, new_slots[written] % block_size
        assert torch.equal(k_cache[blocks.to(device), offsets.to(device)], new_k[written.to(device)])
        assert torch.equal(v_cache[blocks.to(device), offsets.to(device)], new_v[written.to(device)])
        expected = reference.paged_decode(q, k_cache, v_cache, tables, lengths, scale)
        print(f"graph replay {trial}: splits={num_splits} lengths={new_lengths.tolist()}")
        assert_matches(out, expected, TOLERANCE[dtype], f"graph replay {trial}, lengths {new_lengths.tolist()}")
        assert not out[new_lengths.to(device) == 0].any(), "padding rows must give zeros"
        assert all_zero(), "a replay left an arrival counter set"


def test_pool_past_int32_offsets() -> None:
    """Blocks whose element offsets exceed 2^31: store, decode, prefill and copy_blocks all reach them."""
    block_size, kv_heads, head_dim, q_heads, dtype = 16, 8, 128, 32, torch.bfloat16
    block_numel = block_size * kv_heads * head_dim
    num_blocks = 2**31 // block_numel + 64
    k_cache = torch.empty(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
    v_cache = torch.empty_like(k_cache)
    high = torch.arange(num_blocks - 1, num_blocks - 41, -1, device="cuda")  # the last 40 blocks
    k_cache[high] = torch.randn(40, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
    v_cache[high] = torch.randn(40, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
    tables = high.view(2, 20).to(torch.int32)
    lengths = torch.tensor([320, 250], dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5

    new_k = torch.randn(2, kv_heads, head_dim, dtype=dtype, device="cuda")
    new_v = torch.randn_like(new_k)
    slots = (tables[:, -1].long() * block_size + torch.tensor([15, 9], device="cuda"))
    kernels.store_kvcache(new_k, new_v, k_cache, v_cache, slots)
    assert torch.equal(k_cache[tables[:, -1].long(), torch.tensor([15, 9], device="cuda")], new_k)
    assert torch.equal(v_cache[tables[:, -1].long(), torch.tensor([15, 9], device="cuda")], new_v)

    q = torch.randn(2, q_heads, head_dim, dtype=dtype, device="cuda")
    for splits in (1, 4):
        actual = kernels.paged_decode(q, k_cache, v_cache, tables, lengths, scale, num_splits=splits)
        expected = reference.paged_decode(q, k_cache, v_cache, tables, lengths, scale)
        assert_matches(actual, expected, TOLERANCE[dtype], f"decode past 2^31, splits={splits}")

    starts = torch.tensor([0, 100, 101], dtype=torch.int32, device="cuda")
    qp = torch.randn(101, q_heads, head_dim, dtype=dtype, device="cuda")
    actual = kernels.paged_prefill(qp, k_cache, v_cache, tables, starts, lengths, scale)
    expected = reference.paged_prefill(qp, k_cache, v_cache, tables, starts, lengths, scale)
    assert_matches(actual, expected, TOLERANCE[dtype], "prefill past 2^31")
    del k_cache, v_cache

    pool = torch.empty(2, 2, 2**31 // (4 * block_numel) + 8, block_size, kv_heads, head_dim, dtype=dtype,
                       device="cuda")
    last = pool.shape[2] - 1
    pool[:, :, last - 1] = torch.randn(2, 2, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
    expected_block = pool[:, :, last - 1].clone()
    kernels.copy_blocks(pool, torch.tensor([[last - 1, last]], device="cuda"))
    assert torch.equal(pool[:, :, last], expected_block)

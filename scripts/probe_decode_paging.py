"""What paging costs `paged_decode` under other tile configs and split counts: for each, the graphs on
contiguous and on scattered block tables replayed alternately (ABBA, as the kernel table's paging
column), at the table's shapes where paging costs the most (B32/8k: 2.2-3.0% against a 2% bar).
Prints scattered and contiguous us and the paging cost per config; the default (`DecodeConfig.default`
at the planned split count) is the first row of each shape.

`--windows` also times the default on tables scattered only within windows of 64 pages (2 MB of K at
the 8B shape: one GPU large page): if paging costs as much there, the cost is not address
translation (the TLB) but the order in which the pool's pages are read.

`--reads` times instead kernels that only read the pool at B32/8k (`_read_kv`: the decode kernel's
grid, tiles, stages and cp.async pipelining, two MMAs a tile), a program reading one KV head's
256-byte rows (the decode kernel's walk) or 2, 4 or 8 heads of each token together. `--chain` adds
the per-head walk with the decode kernel's online softmax, then with its masked loads too, and the
decode kernel itself; `--bisect` (implies `--chain`) adds that walk with each remaining piece of the
decode kernel, then all of them: what the memory system charges for scattered pages, and which
part of the decode kernel pays more.

    python3 scripts/probe_decode_paging.py [--reps 5] [--windows] [--reads [--chain] [--bisect]]
"""

import argparse

import torch
import triton
import triton.language as tl

from streampage.bench.kernels import HEAD_DIM, KV_HEADS, Q_HEADS, DecodeInputs, Timer
from streampage.kernels import DecodeConfig, DecodeWorkspace, decode_split_plan
from streampage.kernels.paged_attention import _split_span, _tile_pages, num_sms, sm_shared_memory

SHAPES = [(32, 8192), (16, 4096), (64, 2048), (4, 8192)]
WINDOW_PAGES = 64
# Session 9 (calls 2 and 7): other tiles, warps, stages, split counts and L2 prefetching lowered the
# paging cost only by slowing the contiguous case as much. Session 10 (calls 1 and 2): programs
# reading 2, 4 or all 8 KV heads (each token's heads one run of bytes, or each page whole) did the
# same, and were removed (docs/benchmarks.md). None reads scattered tables faster than the default.
CANDIDATES = [DecodeConfig(64, 4, 4), DecodeConfig(64, 8, 3), DecodeConfig(32, 4, 4)]


# (KV heads a program reads, tokens a tile, splits of a sequence, stages): 256 programs as the decode
# kernel's grid at B32/8k, tiles of 16 KB of K (and of V), three stages (two programs an SM), and one
# walk of whole 32 KB pages with two.
READ_WALKS = [(1, 64, 1, 3), (2, 32, 2, 3), (4, 16, 4, 3), (8, 8, 8, 3), (8, 16, 8, 2)]
# Session 10 (calls 6-11): every walk reads at 4.37-4.45 TB/s and pays 0.5-2.1% for scattered tables,
# about 1% typically, the decode kernel 2.5-3.0%. `--chain` adds the decode kernel's online softmax
# to the per-head walk, then its masked loads, and times the decode kernel itself beside them.


@triton.jit
def _read_kv(k_ptr, v_ptr, table_ptr, out_ptr, context_lens_ptr, q_ptr, qk_scale, tokens_per_program, stride_bt,
             stride_b, stride_t, stride_h, stride_q_s, stride_q_h,
             HEADS: tl.constexpr, TILE_TOKENS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
             CHAIN: tl.constexpr = False, MASKED: tl.constexpr = False, SPAN: tl.constexpr = False,
             TABLE: tl.constexpr = False, WHERE: tl.constexpr = False, QOUT: tl.constexpr = False):
    """Read the K and V rows of HEADS neighbouring KV heads over one split of a sequence, tile rows in
    the pool's token-major order (a token's heads adjacent), and fold them into a number through two
    MMAs a tile, as the decode kernel does, so Triton software-pipelines the loads with cp.async as it
    does the decode kernel's (the page numbers read a tile ahead for the same reason). The result
    only keeps the loads alive; the addressing was checked against PyTorch as a plain sum. With CHAIN
    the tiles go through the decode kernel's online softmax (P @ V after it, O rescaled by the new
    max); with MASKED the K/V and table loads are masked as the decode kernel's are.

    The bisection switches (`--bisect`, HEADS 1 and one split) each take one more piece of the decode
    kernel: SPAN its range (the context length loaded, `_split_span`), TABLE its page reads
    (`_tile_pages`, before and inside the loop), WHERE its score mask (-inf past the range), QOUT its
    query (the q tensor's group rows, the scale a runtime argument) and its output rows."""
    rows = tl.arange(0, TILE_TOKENS * HEADS)
    head = tl.program_id(0) * HEADS + rows % HEADS
    seq = tl.program_id(1)
    dims = tl.arange(0, HEAD_DIM)
    if SPAN:
        span, _ = _split_span(tl.load(context_lens_ptr + seq), 1, 0, TILE_TOKENS)
        start = tl.program_id(2) * span
        end = tl.minimum(start + span, tl.load(context_lens_ptr + seq))
    else:
        start = tl.program_id(2) * tokens_per_program
        end = start + tokens_per_program
    table = table_ptr + seq.to(tl.int64) * stride_bt
    ones = tl.full([16, TILE_TOKENS * HEADS], 1.0, tl.float32).to(k_ptr.dtype.element_ty)
    group = tl.arange(0, 16)
    if QOUT:  # the group's 4 query heads of this KV head, 12 padding rows
        q = tl.load(q_ptr + seq * stride_q_s + (tl.program_id(0) * 4 + group)[:, None] * stride_q_h + dims[None, :],
                    mask=(group < 4)[:, None], other=0.0)
        scale = qk_scale
    else:
        q = tl.load(k_ptr + group[:, None] * 0 + dims[None, :])  # any [16, HEAD_DIM] operand
        scale = 0.088
    acc = tl.zeros([16, HEAD_DIM], tl.float32)
    m = tl.full([16], float("-inf"), tl.float32)
    row_sum = tl.zeros([16], tl.float32)
    if TABLE:
        page = _tile_pages(table, start + rows, end, BLOCK_SIZE)
    else:
        page = tl.load(table + (start + rows // HEADS) // BLOCK_SIZE).to(tl.int64)
    for tile_start in range(start, end, TILE_TOKENS):  # the table read a tile ahead, as in the decode kernel
        token = tile_start + rows // HEADS
        if TABLE:
            next_page = _tile_pages(table, token + TILE_TOKENS, end, BLOCK_SIZE)
        elif MASKED:  # as the decode kernel's `_tile_pages`: entries past the range not read (0)
            next_page = tl.load(table + (token + TILE_TOKENS) // BLOCK_SIZE, mask=token + TILE_TOKENS < end,
                                other=0).to(tl.int64)
        else:
            next_token = tl.minimum(token + TILE_TOKENS, end - 1)
            next_page = tl.load(table + next_token // BLOCK_SIZE).to(tl.int64)
        offsets = page * stride_b + (token % BLOCK_SIZE) * stride_t + head * stride_h
        if MASKED:  # the decode kernel's loads: rows past the range masked (cp.async with zero fill)
            valid = (token < end)[:, None]
            k = tl.load(k_ptr + offsets[:, None] + dims[None, :], mask=valid, other=0.0)
            v = tl.load(v_ptr + offsets[:, None] + dims[None, :], mask=valid, other=0.0)
        else:
            k = tl.load(k_ptr + offsets[:, None] + dims[None, :])
            v = tl.load(v_ptr + offsets[:, None] + dims[None, :])
        scores = tl.dot(q, tl.trans(k))
        if CHAIN:  # the decode kernel's online softmax: P @ V waits for it, O rescaled by the new max
            scores = scores * scale
            if WHERE:
                scores = tl.where((token < end)[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp2(scores - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            row_sum = row_sum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        else:
            acc = tl.dot(ones, v, acc + tl.sum(scores, axis=1)[:, None])
        page = next_page
    result = acc / tl.maximum(row_sum, 1.0)[:, None]
    program = (seq * tl.num_programs(0) + tl.program_id(0)) * tl.num_programs(2) + tl.program_id(2)
    if QOUT:  # the group's rows, as the decode kernel stores its output
        tl.store(out_ptr + program * 16 * HEAD_DIM + group[:, None] * HEAD_DIM + dims[None, :], result,
                 mask=(group < 4)[:, None])
    else:
        tl.store(out_ptr + program * HEAD_DIM + dims, tl.sum(result, axis=0) / 16)


def read_calls(inputs: DecodeInputs, layout: str, heads: int, tile_tokens: int, splits: int, stages: int,
               **switches: bool) -> list:
    """One launch of `_read_kv` per input set of `inputs` over its `layout` table; `switches` are its
    CHAIN, MASKED, SPAN, TABLE, WHERE and QOUT."""
    table = inputs.tables[layout]
    out = torch.empty(inputs.num_seqs * (KV_HEADS // heads) * splits, 16, HEAD_DIM, device="cuda")

    def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        _read_kv[(KV_HEADS // heads, inputs.num_seqs, splits)](
            k, v, table, out, inputs.lengths, q, HEAD_DIM**-0.5 * 1.4426950408889634, inputs.context // splits,
            table.stride(0), k.stride(0), k.stride(1), k.stride(2), q.stride(0), q.stride(1),
            HEADS=heads, TILE_TOKENS=tile_tokens, BLOCK_SIZE=k.shape[1], HEAD_DIM=HEAD_DIM,
            num_warps=4, num_stages=stages, **{name.upper(): on for name, on in switches.items()})

    return [lambda q=q, k=k, v=v: launch(q, k, v) for q, (k, v) in zip(inputs.queries, inputs.pools, strict=True)]


# `--bisect`: the per-head walk with the decode kernel's loop (CHAIN, MASKED), then with each other
# piece of the kernel, then all of them.
BISECT = [{"span": True}, {"table": True}, {"where": True}, {"qout": True},
          {"span": True, "table": True, "where": True, "qout": True}]


def time_reads(timer: Timer, chain: bool, bisect: bool) -> None:
    """Paired scattered / contiguous replays of each walk in READ_WALKS at B32/8k; with `chain`, the
    per-head walk with the decode kernel's online softmax, then also its masked loads, and the decode
    kernel; with `bisect` (and `chain`), that walk with each further piece of the kernel (BISECT)."""
    inputs = DecodeInputs(32, 8192)
    gb = inputs.kv_bytes / 1e9
    print(f"\nreads alone, B32/8192 ({gb:.2f} GB of K and V)")
    print(f"{'heads':>5} {'tokens':>6} {'splits':>6} {'stages':>6} | {'scattered':>9} {'contig':>8} {'TB/s':>5} "
          f"{'paging':>7}")
    walks = [(walk, {}) for walk in READ_WALKS]
    walks += [(READ_WALKS[0], {"chain": True}), (READ_WALKS[0], {"chain": True, "masked": True})] if chain else []
    walks += [(READ_WALKS[0], {"chain": True, "masked": True, **more}) for more in BISECT] if bisect else []
    for walk, switches in walks:
        contig, scattered, ratio = timer.graph_pair(read_calls(inputs, "contiguous", *walk, **switches),
                                                    read_calls(inputs, "scattered", *walk, **switches))
        print(" ".join(f"{n:>{w}}" for n, w in zip(walk, (5, 6, 6, 6), strict=True))
              + f" | {scattered:>9.1f} {contig:>8.1f} {gb / contig * 1e3:>5.2f} {100 * (ratio - 1):>6.2f}%"
              + "".join(f" +{name}" for name in switches), flush=True)
    if chain:
        calls = {layout: inputs.paged_calls(layout, num_splits=1) for layout in ("contiguous", "scattered")}
        contig, scattered, ratio = timer.graph_pair(calls["contiguous"], calls["scattered"])
        print(f"{'paged_decode, default':>26} | {scattered:>9.1f} {contig:>8.1f} {gb / contig * 1e3:>5.2f} "
              f"{100 * (ratio - 1):>6.2f}%", flush=True)


def windowed_table(contiguous: torch.Tensor, window: int) -> torch.Tensor:
    """The contiguous table with its pages shuffled only within aligned windows of `window` pages."""
    flat = contiguous.flatten()
    windows = flat.view(-1, window)
    order = torch.argsort(torch.rand(windows.shape, device=flat.device), dim=1)
    return torch.gather(windows, 1, order).view_as(contiguous).contiguous()


def label(cfg: DecodeConfig | None, default: DecodeConfig) -> str:
    if cfg is None:
        return "default at 2x splits"
    return f"{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}" + (" (default)" if cfg == default else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--windows", action="store_true")
    parser.add_argument("--reads", action="store_true")
    parser.add_argument("--chain", action="store_true", help="with --reads: the decode kernel's loop, and the kernel")
    parser.add_argument("--bisect", action="store_true", help="with --reads: the decode kernel's pieces one by one")
    args = parser.parse_args()
    timer = Timer(args.reps)
    if args.reads:
        time_reads(timer, args.chain or args.bisect, args.bisect)
        return
    sms = num_sms(torch.device("cuda"))
    print(f"{'shape':>9} {'splits':>6} {'config':<28} | {'scattered':>9} {'contig':>8} {'paging':>7}")
    for num_seqs, context in SHAPES:
        inputs = DecodeInputs(num_seqs, context)
        if args.windows:
            inputs.tables["windowed"] = windowed_table(inputs.tables["contiguous"], WINDOW_PAGES)
        plan = decode_split_plan(num_seqs, KV_HEADS, context, sms)
        default = DecodeConfig.default(HEAD_DIM, num_seqs * KV_HEADS * plan, sms,
                                       sm_shared_memory(torch.device("cuda")))
        runs = [(plan, default, "scattered")] + [(plan, cfg, "scattered") for cfg in CANDIDATES if cfg != default]
        runs += [(2 * plan, None, "scattered")] + ([(plan, default, "windowed")] if args.windows else [])
        for splits, cfg, layout in runs:
            workspace = DecodeWorkspace.allocate(num_seqs, Q_HEADS, HEAD_DIM, splits, "cuda")
            calls = {name: inputs.paged_calls(name, num_splits=splits, workspace=workspace, config=cfg)
                     for name in ("contiguous", layout)}
            try:
                contig, scattered, ratio = timer.graph_pair(calls["contiguous"], calls[layout])
            except Exception as exc:  # a config the SM cannot fit is reported, not fatal
                print(f"B{num_seqs}/{context} {cfg}: {type(exc).__name__}: {str(exc)[:160]}")
                continue
            text = label(cfg, default) + (" windowed" if layout == "windowed" else "")
            print(f"{f'B{num_seqs}/{context}':>9} {splits:>6} {text:<28} | {scattered:>9.1f} {contig:>8.1f} "
                  f"{100 * (ratio - 1):>6.2f}%", flush=True)
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

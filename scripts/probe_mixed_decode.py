"""paged_decode on mixed context lengths (uniform in [100, 2048], the nano-vllm workload's spread)
and on equal ones, for fixed split counts and for what a decode CUDA graph uses (`graph_split_plan`):
does splitting balance long and short rows? Then two questions for the graph plan: do mixed batches
run faster with their rows ordered longest first (the GPU starts programs in launch order, so the
longest would no longer be left running alone at the end)? And at batch 1-8, do short contexts run
faster cut into one-tile splits (`min_split_tokens`) than in splits of two tiles or of at least 256
tokens (session 6: one program beat one-tile splits at 128 tokens)? Last,
the paging cost (scattered against contiguous block tables, alternating replays as `streampage
bench kernels` times it) of other tile sizes, warps, stages and split counts at the two shapes
where the default sits at or above the 2% bar (B32/8k, B16/4k). (cuBLAS at 1-8 rows: `streampage
bench kernels --gemv`.)

    python3 scripts/probe_mixed_decode.py
"""

import torch

from streampage.bench.kernels import DTYPE, HEAD_DIM, KV_HEADS, Q_HEADS, DecodeInputs, Timer, copy_bandwidth
from streampage.kernels import DecodeWorkspace, decode_split_plan, graph_split_plan
from streampage.kernels.paged_attention import MIN_SPLIT_TOKENS, DecodeConfig, num_sms, sm_shared_memory

MAX_CONTEXT = 2048


def time_decode(timer: Timer, inputs: DecodeInputs, splits: int, **options) -> float:
    """Graph-replayed us per paged_decode call over the rotated input sets, with `splits` splits."""
    workspace = DecodeWorkspace.allocate(inputs.num_seqs, Q_HEADS, HEAD_DIM, splits, "cuda")
    return timer.graph(inputs.paged_calls("scattered", num_splits=splits, workspace=workspace, **options))


def graph_splits(batch: int) -> int:
    return graph_split_plan(batch, KV_HEADS, num_sms(torch.device("cuda")))


def mixed_decode(timer: Timer, bandwidth: float) -> None:
    print("paged_decode, contexts uniform in [100, 2048] (or all equal: '=N'), scattered pages; us and share "
          "of copy bandwidth; at most N splits of >= 256 tokens")
    print(f"{'batch':>10} " + " ".join(f"{'splits ' + str(s):>16}" for s in (1, 2, 4, 8)) + f" {'graph plan':>16}")
    generator = torch.Generator().manual_seed(0)
    cases = [(16, None), (64, None), (128, None), (256, None), (64, 2048), (256, 1024)]  # None: mixed
    for batch, uniform in cases:
        lengths = (torch.randint(100, MAX_CONTEXT + 1, (batch,), generator=generator) if uniform is None
                   else torch.full((batch,), uniform))
        inputs = DecodeInputs(batch, MAX_CONTEXT)  # pools and tables for full contexts; lengths below
        inputs.lengths = lengths.to(torch.int32).cuda()
        kv_bytes = 2 * int(lengths.sum()) * KV_HEADS * HEAD_DIM * DTYPE.itemsize
        cells = []
        for splits in (1, 2, 4, 8):
            us = time_decode(timer, inputs, splits)
            cells.append(f"{us:8.1f} {kv_bytes / us / 1e6 / bandwidth:6.1%}")
        splits = graph_splits(batch)  # what a decode graph runs
        us = time_decode(timer, inputs, splits)
        cells.append(f"{splits:3d}:{us:7.1f} {kv_bytes / us / 1e6 / bandwidth:5.1%}")
        label = f"{batch}" + ("" if uniform is None else f" ={uniform}")
        print(f"{label:>10} " + " ".join(f"{c:>16}" for c in cells))
        del inputs
        torch.cuda.empty_cache()


def longest_first(timer: Timer, bandwidth: float) -> None:
    print("\ngraph plan, contexts uniform in [100, 2048]: rows in random order, rows sorted longest first, "
          "and random rows launched longest first (paged_decode's row_order, what --decode-longest-first does)")
    print(f"{'batch':>6} {'random':>16} {'sorted rows':>16} {'row_order':>16}")
    generator = torch.Generator().manual_seed(1)
    for batch in (16, 64, 128, 256):
        lengths = torch.randint(100, MAX_CONTEXT + 1, (batch,), generator=generator)
        kv_bytes = 2 * int(lengths.sum()) * KV_HEADS * HEAD_DIM * DTYPE.itemsize
        inputs = DecodeInputs(batch, MAX_CONTEXT)
        row_order = lengths.argsort(descending=True, stable=True).to(torch.int32).cuda()
        cells = []
        for order, options in ((lengths, {}), (lengths.sort(descending=True).values, {}),
                               (lengths, {"row_order": row_order})):
            inputs.lengths = order.to(torch.int32).cuda()
            us = time_decode(timer, inputs, graph_splits(batch), **options)
            cells.append(f"{us:8.1f} {kv_bytes / us / 1e6 / bandwidth:6.1%}")
        print(f"{batch:>6} " + " ".join(f"{c:>16}" for c in cells))
        del inputs
        torch.cuda.empty_cache()


def short_contexts(timer: Timer) -> None:
    tile = DecodeConfig.default(HEAD_DIM, 0, 1).block_n
    print(f"\ngraph plan at batch 1-8, equal short contexts: us with splits of >= {MIN_SPLIT_TOKENS} tokens, "
          f"of two tiles ({2 * tile} tokens) and of one tile (the default at batch 1-8)")
    print(f"{'batch':>6} {'context':>8} {'>= ' + str(MIN_SPLIT_TOKENS):>10} {'two tiles':>10} {'one tile':>10}")
    for batch in (1, 4, 8):
        for context in (128, 192, 256, 512, 1024):
            inputs = DecodeInputs(batch, context)
            cells = [time_decode(timer, inputs, graph_splits(batch), min_split_len=m)
                     for m in (MIN_SPLIT_TOKENS, 2 * tile, 1)]
            print(f"{batch:>6} {context:>8} " + " ".join(f"{us:>10.1f}" for us in cells))
            del inputs


def paging_configs(timer: Timer) -> None:
    print("\npaging cost by decode config: us per call with contiguous / scattered tables (paired replays)")
    print(f"{'shape':>9} {'splits':>6} {'config':>14} {'contig':>8} {'scattered':>9} {'paging':>7}")
    sms = num_sms(torch.device("cuda"))
    for batch, context in ((32, 8192), (16, 4096)):
        inputs = DecodeInputs(batch, context)
        planned = decode_split_plan(batch, KV_HEADS, context, sms)
        default = DecodeConfig.default(HEAD_DIM, batch * KV_HEADS * planned, sms,
                                       sm_shared_memory(torch.device("cuda")))
        shapes = [(n, w, st) for n in (32, 64, 128) for w, st in ((4, 2), (4, 3), (4, 4), (8, 3))]
        configs = [default] + [DecodeConfig(*shape) for shape in shapes  # K and V stages within 192 KB
                               if 2 * shape[2] * shape[0] * HEAD_DIM * DTYPE.itemsize <= 192 * 1024]
        for splits in (planned, 2 * planned):
            workspace = DecodeWorkspace.allocate(batch, Q_HEADS, HEAD_DIM, splits, "cuda")
            for cfg in dict.fromkeys(configs):  # the default first, no repeats
                calls = {layout: inputs.paged_calls(layout, num_splits=splits, workspace=workspace, config=cfg)
                         for layout in ("contiguous", "scattered")}
                contig, scattered, ratio = timer.graph_pair(calls["contiguous"], calls["scattered"])
                name = f"{cfg.block_n}/w{cfg.num_warps}/s{cfg.num_stages}" + (" *" if cfg == default else "")
                print(f"{f'B{batch}/{context}':>9} {splits:>6} {name:>14} {contig:>8.1f} {scattered:>9.1f} "
                      f"{100 * (ratio - 1):>6.1f}%")
        del inputs
        torch.cuda.empty_cache()


def main() -> None:
    timer = Timer(9)
    bandwidth = copy_bandwidth(timer)
    print(f"copy bandwidth {bandwidth:.2f} TB/s")
    mixed_decode(timer, bandwidth)
    longest_first(timer, bandwidth)
    short_contexts(timer)
    paging_configs(timer)


if __name__ == "__main__":
    main()

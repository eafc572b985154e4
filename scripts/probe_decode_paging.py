"""What paging costs `paged_decode` under other tile configs and split counts: for each, the graphs on
contiguous and on scattered block tables replayed alternately (ABBA, as the kernel table's paging
column), at the table's shapes where paging costs the most (B32/8k: 2.3-2.8% against a 2% bar).
Prints scattered and contiguous us and the paging cost per config; the default (`DecodeConfig.default`
at the planned split count) is the first row of each shape.

`--windows` also times the default on tables scattered only within windows of 64 pages (2 MB of K at
the 8B shape: one GPU large page): if paging costs as much there, the cost is not address
translation (the TLB) but the order in which the pool's pages are read.

    python3 scripts/probe_decode_paging.py [--reps 5] [--windows]
"""

import argparse

import torch

from streampage.bench.kernels import HEAD_DIM, KV_HEADS, Q_HEADS, DecodeInputs, Timer
from streampage.kernels import DecodeConfig, DecodeWorkspace, decode_split_plan
from streampage.kernels.paged_attention import num_sms

SHAPES = [(32, 8192), (16, 4096), (64, 2048), (4, 8192)]
WINDOW_PAGES = 64
# Session 9 (calls 2 and 7): other tiles, warps, stages, split counts and L2 prefetching lowered the
# paging cost only by slowing the contiguous case as much. Session 10 (calls 1 and 2): programs
# reading 2, 4 or all 8 KV heads (each token's heads one run of bytes, or each page whole) did the
# same, and were removed (docs/benchmarks.md). None reads scattered tables faster than the default.
CANDIDATES = [DecodeConfig(64, 4, 4), DecodeConfig(64, 8, 3), DecodeConfig(32, 4, 4)]


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
    args = parser.parse_args()
    timer = Timer(args.reps)
    sms = num_sms(torch.device("cuda"))
    print(f"{'shape':>9} {'splits':>6} {'config':<28} | {'scattered':>9} {'contig':>8} {'paging':>7}")
    for num_seqs, context in SHAPES:
        inputs = DecodeInputs(num_seqs, context)
        if args.windows:
            inputs.tables["windowed"] = windowed_table(inputs.tables["contiguous"], WINDOW_PAGES)
        plan = decode_split_plan(num_seqs, KV_HEADS, context, sms)
        default = DecodeConfig.default(HEAD_DIM, num_seqs * KV_HEADS * plan / sms)
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

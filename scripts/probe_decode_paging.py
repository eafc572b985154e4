"""What paging costs `paged_decode` under other tile configs and split counts: for each, the graphs on
contiguous and on scattered block tables replayed alternately (ABBA, as the kernel table's paging
column), at the table's shapes with few programs per SM, where paging costs the most (B32/8k: 2.4-2.8%
against a 2% bar), and with one program reading pages whole for every KV head (`all_heads`, at its
own split plan). Prints scattered and contiguous us and the paging cost per config; the default
(`DecodeConfig.default` at the planned split count) is the first row of each shape.

    python3 scripts/probe_decode_paging.py [--reps 5]
"""

import argparse

import torch

from streampage.bench.kernels import HEAD_DIM, KV_HEADS, Q_HEADS, DecodeInputs, Timer
from streampage.kernels import DecodeConfig, DecodeWorkspace, decode_split_plan
from streampage.kernels.paged_attention import num_sms

SHAPES = [(32, 8192), (16, 4096), (64, 2048), (4, 8192)]
# Session 9 (calls 2 and 7): other tiles, warps, stages, split counts and L2 prefetching lowered the
# paging cost only by slowing the contiguous case as much. Next: one program per (sequence, split)
# reading pages whole for every KV head (`all_heads`; block_n rows = tokens x 8 heads).
CANDIDATES = [DecodeConfig(64, 4, 4), DecodeConfig(64, 8, 3), DecodeConfig(32, 4, 4),
              DecodeConfig(64, 4, 3, all_heads=True), DecodeConfig(64, 4, 2, all_heads=True),
              DecodeConfig(128, 4, 2, all_heads=True), DecodeConfig(128, 8, 3, all_heads=True),
              DecodeConfig(32, 4, 4, all_heads=True)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    timer = Timer(args.reps)
    sms = num_sms(torch.device("cuda"))
    print(f"{'shape':>9} {'splits':>6} {'config':<28} | {'scattered':>9} {'contig':>8} {'paging':>7}")
    for num_seqs, context in SHAPES:
        inputs = DecodeInputs(num_seqs, context)
        plan = decode_split_plan(num_seqs, KV_HEADS, context, sms)
        default = DecodeConfig.default(HEAD_DIM, num_seqs * KV_HEADS * plan / sms)
        runs = [(plan, default)] + [(plan, cfg) for cfg in CANDIDATES if cfg != default] + [(2 * plan, None)]
        for splits, cfg in runs:
            if cfg is not None and cfg.all_heads:  # one program per (sequence, split): its own plan
                splits = decode_split_plan(num_seqs, 1, context, sms)
            workspace = DecodeWorkspace.allocate(num_seqs, Q_HEADS, HEAD_DIM, splits, "cuda")
            calls = {layout: inputs.paged_calls(layout, num_splits=splits, workspace=workspace, config=cfg)
                     for layout in ("contiguous", "scattered")}
            try:
                contig, scattered, ratio = timer.graph_pair(calls["contiguous"], calls["scattered"])
            except Exception as exc:  # a config the SM cannot fit is reported, not fatal
                print(f"B{num_seqs}/{context} {cfg}: {type(exc).__name__}: {str(exc)[:160]}")
                continue
            label = "default at 2x splits" if cfg is None else f"{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}" \
                + (" all heads" if cfg.all_heads else "")
            if cfg == default:
                label += " (default)"
            print(f"{f'B{num_seqs}/{context}':>9} {splits:>6} {label:<28} | {scattered:>9.1f} {contig:>8.1f} "
                  f"{100 * (ratio - 1):>6.2f}%", flush=True)
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""paged_prefill's candidate configs (`streampage bench kernels --prefill-sweep`'s list) against causal
SDPA as the kernel table times them: each candidate's CUDA graph replayed alternately with SDPA's
(ABBA, so clock drift cancels within a pair), at the table's six shapes, after checking its output
against SDPA's ('!' marks one off by more than the sweep's tolerance; it is never the best). Prints
throughput x SDPA per config and shape, and the best correct config per shape. For a per-shape
default: the sweep's unpaired times drift by more than the differences between configs.

    python3 scripts/probe_prefill_configs.py [--reps 5] [--match g4]
"""

import argparse

import torch

from streampage.bench.kernels import (
    PREFILL_BATCH,
    PREFILL_TOKENS,
    SWEEP_TOLERANCE,
    PrefillInputs,
    Timer,
    config_name,
    max_relative_error,
    prefill_candidates,
    sdpa_prefill_calls,
    sdpa_prefill_output,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--match", default="", help="only configs whose label contains this (and the defaults)")
    args = parser.parse_args()
    timer = Timer(args.reps)
    every = prefill_candidates()
    candidates = [cfg for i, cfg in enumerate(every) if i < 2 or args.match in config_name(cfg)]
    shapes = [(tokens, seqs) for tokens in PREFILL_TOKENS for seqs in (1, PREFILL_BATCH)]
    found: dict[tuple[str, int, int], float] = {}
    wrong: set[tuple[str, int, int]] = set()
    for tokens, seqs in shapes:
        inputs = PrefillInputs(tokens, seqs)
        sdpa = sdpa_prefill_calls(inputs)
        sdpa_us = {variant: timer.graph([call]) for variant, call in sdpa.items()}
        best = min(sdpa_us, key=sdpa_us.__getitem__)
        expected = sdpa_prefill_output(inputs)
        for cfg in candidates:
            key = (config_name(cfg), tokens, seqs)
            try:
                if max_relative_error(inputs.paged_call(config=cfg)(), expected) > SWEEP_TOLERANCE:
                    wrong.add(key)
                _, _, ratio = timer.graph_pair([sdpa[best]], [inputs.paged_call(config=cfg)])
                found[key] = 1 / ratio
            except Exception as exc:  # a config that cannot compile or fit is reported, not fatal
                print(f"{config_name(cfg)} at {tokens} x {seqs}: {type(exc).__name__}: {str(exc)[:200]}")
        del inputs, sdpa, expected
        torch.cuda.empty_cache()
    names = [config_name(c) for c in candidates]
    print(f"{'config (x SDPA, paired)':<24}" + "".join(f" | {f'{t} x{s}':>8}" for t, s in shapes))
    for name in names:
        print(f"{name:<24}" + "".join(f" | {found.get((name, t, s), float('nan')):>7.3f}"
                                      f"{'!' if (name, t, s) in wrong else ' '}" for t, s in shapes))
    for t, s in shapes:
        scores = {n: found[(n, t, s)] for n in names if (n, t, s) in found and (n, t, s) not in wrong}
        if not scores:
            print(f"best at {t} x {s}: no config ran correctly")
            continue
        top = max(scores, key=scores.__getitem__)
        print(f"best at {t} x {s}: {top} {scores[top]:.3f} (default {scores.get(names[0], float('nan')):.3f})")


if __name__ == "__main__":
    main()

"""paged_prefill with the softmax's exponentials in packed bf16 (`PrefillConfig.packed_exp2`, the
default) against one fp32 exponential per score, at the kernel table's six shapes: CUDA-graph replays
of the two alternated (ABBA), so clock drift cancels within each pair; also each one's largest error
against SDPA's output, |paged - SDPA| / (1 + |SDPA|).

    python3 scripts/probe_prefill_exp2.py
"""

import dataclasses

import torch

from streampage.bench.kernels import (
    PREFILL_BATCH,
    PREFILL_TOKENS,
    PrefillInputs,
    Timer,
    prefill_flops,
    sdpa_prefill_calls,
)
from streampage.kernels import PrefillConfig


def main() -> None:
    timer = Timer(7)
    packed = PrefillConfig.default(128, torch.bfloat16)
    plain = dataclasses.replace(packed, packed_exp2=False)
    print(f"{'tokens x seqs':>14} | {'fp32 exp2 us':>12} {'TFLOP/s':>7} {'err':>7} | {'packed us':>9} "
          f"{'TFLOP/s':>7} {'err':>7} | packed / fp32")
    for tokens in PREFILL_TOKENS:
        for num_seqs in (1, PREFILL_BATCH):
            inputs = PrefillInputs(tokens, num_seqs)
            expected = sdpa_prefill_calls(inputs)["enable_gqa"]().transpose(1, 2).reshape(inputs.q.shape).float()
            errors = []
            for cfg in (plain, packed):
                actual = inputs.paged_call(config=cfg)().float()
                errors.append(float(((actual - expected).abs() / (1 + expected.abs())).max()))
            plain_us, packed_us, ratio = timer.graph_pair([inputs.paged_call(config=plain)],
                                                          [inputs.paged_call(config=packed)])
            tflop = prefill_flops(tokens, num_seqs) / 1e12
            print(f"{tokens:>8} x {num_seqs:>3} | {plain_us:>12.1f} {tflop / plain_us * 1e6:>7.0f} {errors[0]:>7.4f} | "
                  f"{packed_us:>9.1f} {tflop / packed_us * 1e6:>7.0f} {errors[1]:>7.4f} | {ratio:.3f}")
            del inputs, expected
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

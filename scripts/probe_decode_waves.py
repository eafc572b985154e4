"""Does `paged_decode` at many programs an SM lose time to a last, thin wave, and does
`DecodeConfig.default` (its `wave_cost`) pick the faster stage count? Session 11 (call 1): with K
and V of one layout (SAME_KV_LAYOUT) the kernel needs 96 registers a thread instead of 103, so five
programs share an SM instead of four at two stages, and B256/1k went from 250 to 268 us: 2048
programs fill 3.1 waves of 660 slots but 3.9 of 528, and the 68 programs of the last wave cannot
keep HBM busy alone.

For batch sizes around B256 at 1k tokens (and B128/2k), times on contiguous tables: the default, two
and three stages, two stages with V's pages padded (a distinct layout: the 103-register code, four
programs an SM), and two splits. Prints microseconds per shape, then each compiled variant's
registers, shared memory and programs an SM.

    python3 scripts/probe_decode_waves.py [--reps 5]
"""

import argparse

import torch

from streampage.bench.kernels import HEAD_DIM, KV_HEADS, Q_HEADS, DecodeInputs, Timer
from streampage.kernels import DecodeConfig, DecodeWorkspace, decode_split_plan
from streampage.kernels.paged_attention import _decode_kernel, num_sms, sm_shared_memory

SHAPES = [(192, 1024), (224, 1024), (256, 1024), (288, 1024), (320, 1024), (128, 2048), (64, 2048), (32, 8192)]


def padded_v(v: torch.Tensor) -> torch.Tensor:
    """V with each page one token longer in memory (same values, 16-byte aligned rows): the pools'
    strides differ, so the kernel computes V's addresses apart from K's."""
    wide = torch.empty(v.shape[0], v.shape[1] + 1, *v.shape[2:], dtype=v.dtype, device=v.device)
    wide[:, : v.shape[1]].copy_(v)
    return wide[:, : v.shape[1]]


def variants_report() -> None:
    device = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(device)
    for kernel in _decode_kernel.device_caches[device][0].values():
        regs, shared, warps = kernel.n_regs, kernel.metadata.shared, kernel.metadata.num_warps
        slots = min(props.regs_per_multiprocessor // (regs * 32 * warps),
                    props.shared_memory_per_multiprocessor // (shared + 1024))
        print(f"variant: {regs} registers, {shared} B shared, {warps} warps, stages {kernel.metadata.num_stages} "
              f"-> {slots} programs an SM")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    timer = Timer(args.reps)
    device = torch.device("cuda")
    sms, sm_shared = num_sms(device), sm_shared_memory(device)
    names = ["default", "2 stages", "3 stages", "2st distinct", "default 2x spl"]
    print(f"{'shape':>10} {'programs':>8} {'stages':>6} | " + " ".join(f"{n:>14}" for n in names))
    for num_seqs, context in SHAPES:
        inputs = DecodeInputs(num_seqs, context)
        plan = decode_split_plan(num_seqs, KV_HEADS, context, sms)
        programs = num_seqs * KV_HEADS * plan
        default = DecodeConfig.default(HEAD_DIM, programs, sms, sm_shared)
        two, three = (DecodeConfig(default.block_n, default.num_warps, stages) for stages in (2, 3))
        one_split = DecodeWorkspace.allocate(num_seqs, Q_HEADS, HEAD_DIM, plan, "cuda")
        two_splits = DecodeWorkspace.allocate(num_seqs, Q_HEADS, HEAD_DIM, 2 * plan, "cuda")
        times = [timer.graph(inputs.paged_calls("contiguous", num_splits=plan, workspace=one_split, config=cfg))
                 for cfg in (None, two, three)]
        same_pools = inputs.pools
        inputs.pools = [(k, padded_v(v)) for k, v in same_pools]
        times.append(timer.graph(inputs.paged_calls("contiguous", num_splits=plan, workspace=one_split, config=two)))
        inputs.pools = same_pools
        times.append(timer.graph(inputs.paged_calls("contiguous", num_splits=2 * plan, workspace=two_splits)))
        print(f"{f'B{num_seqs}/{context}':>10} {programs:>8} {default.num_stages:>6} | "
              + " ".join(f"{t:>14.1f}" for t in times), flush=True)
        del inputs, same_pools
        torch.cuda.empty_cache()
    variants_report()
    print(f"{sms} SMs, {sm_shared} B of shared memory an SM")


if __name__ == "__main__":
    main()

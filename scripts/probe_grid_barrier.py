"""What a grid-wide barrier inside one persistent Triton kernel costs, beside what a kernel boundary
costs in a CUDA graph with and without PDL. The figure that decides whether a persistent decode-layer
kernel, with its phases separated by barriers instead of launches, could beat batch-1 decode's eleven
kernels a layer, each of which loses a few microseconds at its start and end (docs/benchmarks.md,
Decode latency). Not yet run (session 11 wrote it after its device time was spent).

Each phase of the persistent kernel reads a neighbour program's value and stores its own, so a
missing or broken barrier shows as a wrong final sum (checked). Barrier cost = (time with N phases
and barriers - time with N phases and none) / N, each timed as one kernel per call in a CUDA graph.
Boundary cost = time per tiny kernel in a graph of 32 back to back, each `grid` programs that load
and store one value, with PDL (a kernel starts while the one before finishes, then waits) and
without.

    python3 scripts/probe_grid_barrier.py [--reps 7]     # CUDA only; a hang means programs were not co-resident
"""

import argparse

import torch
import triton
import triton.language as tl

from streampage.bench.kernels import Timer
from streampage.kernels import pdl
from streampage.kernels.paged_attention import num_sms
from streampage.kernels.pdl import wait_for_previous_kernel

PHASES = 32
SPIN_LIMIT = tl.constexpr(1 << 22)  # polls before a program gives up waiting (and the run is reported as failed)


@triton.jit
def _grid_barrier(counter_ptr, target):
    """Every program of the grid arrives, then waits until `target` arrivals (the counter only grows
    within a launch: phase p's target is p times the grid). The CTA barrier before the arrival
    orders all warps' stores of the phase before its release; the one after makes the acquire hold
    for all of them. Returns 1 if the wait gave up after SPIN_LIMIT polls."""
    tl.debug_barrier()
    seen = tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu") + 1
    polls = tl.full([], 0, tl.int32)
    while (seen < target) & (polls < SPIN_LIMIT):
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        polls += 1
    tl.debug_barrier()
    return (seen < target).to(tl.int32)


@triton.jit
def _phases_kernel(counter_ptr, data_ptr, failed_ptr, PHASES: tl.constexpr, BARRIER: tl.constexpr):
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    value = tl.load(data_ptr + program)
    failed = tl.full([], 0, tl.int32)
    for phase in range(PHASES):
        value += tl.load(data_ptr + (program + 1) % programs, volatile=True)
        if BARRIER:  # everyone has read the phase's values before anyone overwrites one
            failed |= _grid_barrier(counter_ptr, (2 * phase + 1) * programs)
        tl.store(data_ptr + program, value)
        if BARRIER:
            failed |= _grid_barrier(counter_ptr, (2 * phase + 2) * programs)
    tl.atomic_or(failed_ptr, failed)


@triton.jit
def _tiny_kernel(data_ptr, PDL: tl.constexpr):
    program = tl.program_id(0)
    wait_for_previous_kernel(PDL)
    tl.store(data_ptr + program, tl.load(data_ptr + program) + 1.0)


def expected_sums(programs: int) -> torch.Tensor:
    """The phases kernel's result with barriers, computed in PyTorch: program i starts at i + 1, and
    every phase adds to it the right-hand neighbour's value of the phase before."""
    value = torch.arange(1, programs + 1, dtype=torch.float64)
    for _ in range(PHASES):
        value = value + value.roll(-1)
    return value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    timer = Timer(args.reps)
    device = torch.device("cuda")
    sms = num_sms(device)
    print(f"{'programs':>8} | {'barrier us':>10} {'no-barrier kernel us':>20} | {'boundary us':>11} "
          f"{'with PDL':>9}")
    for programs in (sms, 2 * sms):
        counter = torch.zeros(1, dtype=torch.int32, device=device)
        failed = torch.zeros(1, dtype=torch.int32, device=device)
        start = torch.arange(1, programs + 1, dtype=torch.float64, device=device)  # exact sums (below 2^53)
        data = torch.empty_like(start)

        def phases(barrier: bool, programs: int = programs, counter=counter, data=data, start=start,
                   failed=failed) -> None:
            counter.zero_()
            data.copy_(start)
            _phases_kernel[(programs,)](counter, data, failed, PHASES=PHASES, BARRIER=barrier)

        phases(True)
        torch.cuda.synchronize()
        sums_ok = torch.equal(data.cpu(), expected_sums(programs))
        if failed.item() or not sums_ok:
            print(f"{programs:>8} | barrier failed (gave up: {bool(failed.item())}, sums right: {sums_ok})")
            continue
        with_barriers = timer.graph([lambda: phases(True)])
        without = timer.graph([lambda: phases(False)])

        def chain(with_pdl: bool, programs: int = programs, data=data) -> None:
            pdl.enable(with_pdl)
            options = pdl.launch_options(device)
            for _ in range(32):
                _tiny_kernel[(programs,)](data, **options)

        boundary = timer.graph([lambda: chain(False)]) / 32
        boundary_pdl = timer.graph([lambda: chain(True)]) / 32
        pdl.enable(False)
        print(f"{programs:>8} | {(with_barriers - without) / (2 * PHASES):>10.2f} {without:>20.1f} | "
              f"{boundary:>11.2f} {boundary_pdl:>9.2f}", flush=True)


if __name__ == "__main__":
    main()

"""Profile decode steps on the GPU: per batch size, wall time per step against the time the GPU
spent in kernels (a gap means the GPU waited for the host), the top kernels, and the host calls
that took longest (a long cudaStreamSynchronize or cudaMemcpy means the host waited for the GPU).

    python3 scripts/profile_decode.py MODEL_OR_SHAPE BATCH [BATCH...] [--timeline N] [ENGINE OPTIONS,
        e.g. --no-async-scheduling --decode-gemv row-parallel --programmatic-launch]

`--mixed N` adds a request with an N-token prompt before every step, so each step prefills one prompt
beside the decode rows and runs eagerly (no CUDA graph): is such a step bound by the host's launches?
The wall time per step is taken over steps run without the profiler (which slows the host), the
kernel time over as many run under it.

`--timeline N` also prints N consecutive kernels of the last profiled step in launch order, each with
its duration and the idle gap before it (negative: it overlapped the previous one, as PDL allows):
where a layer's time goes kernel by kernel, launch gaps included.

Last comes each kernel's advance: how far it moved the end of the GPU's work (its end minus the
previous kernel's end, in launch order), averaged by kernel name over every profiled step. Under PDL
a kernel starts early and its duration includes waiting; the advances do not double count (an idle
gap counts to the kernel after it), and they sum to the span from the first kernel's start to the
last one's end: comparing two routings by advance shows which kernel's share of the step changed.
"""

import argparse
import time

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from streampage.bench.workloads import fixed_workload, max_token_id, resolve_model
from streampage.cli import add_engine_arguments, engine_options
from streampage.llm import LLM
from streampage.sampling_params import SamplingParams

STEPS = 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("batches", type=int, nargs="+")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--timeline", type=int, default=0, metavar="N", help="print N kernels in order")
    parser.add_argument("--mixed", type=int, default=0, metavar="N", help="prefill an N-token prompt every step")
    add_engine_arguments(parser, skip=("model",))  # every engine option, e.g. --no-async-scheduling
    args = parser.parse_args()
    # Room for the --mixed prompts beside the decode rows (each finishes as soon as it is prefilled).
    max_seqs = max(args.batches) + (8 if args.mixed else 0)
    options = {"max_num_seqs": max_seqs, "max_model_len": 4096, **engine_options(args, skip=("model",))}
    model = resolve_model(args.model)
    limit = max_token_id(model)
    llm = LLM(model, **options)
    engine = llm.engine
    params = SamplingParams(max_tokens=64, temperature=args.temperature, ignore_eos=True)
    # One prompt for every step of the two timed runs of each batch.
    extra = iter(fixed_workload(2 * STEPS * len(args.batches), max(args.mixed, 1), 1, seed=-1,
                                max_token_id=limit).prompts)
    extra_params = SamplingParams(max_tokens=1, temperature=args.temperature, ignore_eos=True)

    def step() -> None:
        if args.mixed:
            engine.add_request(f"mixed-{time.perf_counter_ns()}", next(extra), extra_params)
        engine.step()

    for batch in args.batches:
        for i, prompt in enumerate(fixed_workload(batch, 128, 64, seed=batch, max_token_id=limit).prompts):
            engine.add_request(f"p{batch}-{i}", prompt, params)
        for _ in range(8):
            engine.step()
        start = time.perf_counter()
        for _ in range(STEPS):
            step()
        wall = (time.perf_counter() - start) / STEPS * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(STEPS):
                step()
        events = prof.key_averages()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        gpu = sum(e.device_time for e in kernels) / STEPS / 1e3
        what = f", a {args.mixed}-token prompt prefilled every step" if args.mixed else ""
        print(f"\n=== batch {batch}{what}: {wall:.3f} ms per step wall, {gpu:.3f} ms of kernels "
              f"(async scheduling {args.async_scheduling}) ===")
        print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
        if args.timeline:
            print_timeline(kernels, args.timeline)
        print_advances([(e.name, e.time_range.start, e.time_range.end) for e in kernels], STEPS)
        while engine.has_unfinished_requests():
            engine.step()


def print_timeline(kernels: list, count: int) -> None:
    """`count` kernels from the middle of the last step (a few layers in, past the embedding)."""
    kernels = sorted(kernels, key=lambda e: e.time_range.start)
    per_step = len(kernels) // STEPS
    first = len(kernels) - per_step + per_step // 3
    count = min(count, len(kernels) - first)
    print(f"{'kernel':<64}{'us':>8}{'gap us':>8}")
    for prev, event in zip(kernels[first - 1:first + count - 1], kernels[first:first + count], strict=True):
        gap = event.time_range.start - prev.time_range.end
        print(f"{event.name[:63]:<64}{event.time_range.elapsed_us():>8.1f}{gap:>8.1f}")


def print_advances(kernels: list[tuple[str, float, float]], steps: int) -> None:
    """Per kernel name (name, start us, end us): calls and mean duration per step, and the mean and
    per-step total of its advance, max(0, end - the latest end before it) in launch order."""
    by_name: dict[str, list[float]] = {}
    latest_end = None
    for name, start, end in sorted(kernels, key=lambda k: k[1]):
        advance = end - start if latest_end is None else max(0.0, end - latest_end)
        latest_end = end if latest_end is None else max(latest_end, end)
        by_name.setdefault(name, []).extend((end - start, advance))
    print(f"{'kernel (by advance per step)':<64}{'calls':>7}{'us':>8}{'adv us':>8}{'adv ms/step':>12}")
    rows = [(name, values[0::2], values[1::2]) for name, values in by_name.items()]
    for name, durations, advances in sorted(rows, key=lambda r: -sum(r[2])):
        print(f"{name[:63]:<64}{len(durations) / steps:>7.0f}{sum(durations) / len(durations):>8.1f}"
              f"{sum(advances) / len(advances):>8.1f}{sum(advances) / steps / 1e3:>12.3f}")
    total = sum(sum(a) for _, _, a in rows) / steps / 1e3
    print(f"{'all kernels: span per step, idle gaps included':<64}{'':>23}{total:>12.3f}")


if __name__ == "__main__":
    main()

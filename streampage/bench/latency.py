"""`streampage bench latency`: per-token decode latency against the weight-read floor, and host time per step.

For each batch size, B requests of fixed prompt and output length (`ignore_eos`) are prefilled, then
every decode step is timed. The floor is the time to read the model's weights once at the device copy
bandwidth measured in the same run (batch 1 decode cannot beat it). Host time per step is the step's
wall time minus the time the host spent blocked waiting for the GPU: scheduling, input preparation,
graph launch, sampling set-up and output processing.

With tensor parallelism the floor is one rank's weights (each GPU reads its shard), and a few decode
steps per batch size run under the profiler to read the collectives' device time per step on rank 0:
the NCCL kernels' time, which includes any wait for the slower rank.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from streampage.bench.workloads import fixed_workload, resolve_model
from streampage.cli import add_engine_arguments, engine_options
from streampage.sampling_params import SamplingParams


def copy_bandwidth(device: torch.device, num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(num_bytes // 2, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


PROFILED_STEPS = 10


def collective_ms_per_step(engine, steps: int) -> tuple[float, int]:
    """Run `steps` engine steps under the profiler; the device time of NCCL kernels per step (ms) and
    how many NCCL kernels ran (CUDA graph replays report their kernels one by one)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    nccl = [e for e in prof.events() if e.device_type == DeviceType.CUDA and "nccl" in e.name.lower()]
    return sum(e.device_time for e in nccl) / steps / 1e3, len(nccl)


def decode_steps(llm, batch: int, input_len: int, output_len: int, profile_collectives: bool = False) -> dict:
    """Per-token latency at `batch` running sequences; with `profile_collectives`, the first decode steps
    run under the profiler (untimed) to measure the collectives per step."""
    engine = llm.engine
    runner = engine.executor.runner
    workload = fixed_workload(batch, input_len, output_len, seed=batch)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(workload.prompts):
        engine.add_request(f"lat-{batch}-{i}", prompt, params)
    sched = engine.scheduler
    while sched.waiting or any(s.num_uncomputed_tokens > 1 for g in sched.running for s in g.seqs):
        engine.step()  # prefill: not timed
    collectives = collective_ms_per_step(engine, PROFILED_STEPS) if profile_collectives else None
    walls, hosts = [], []
    while engine.has_unfinished_requests():
        running = sum(len(g.seqs) for g in engine.scheduler.running)
        waited = runner.timing["gpu_wait"]
        start = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - start
        if running == batch:
            walls.append(wall)
            hosts.append(wall - (runner.timing["gpu_wait"] - waited))
    walls.sort()
    row = {"batch": batch, "steps": len(walls), "median_ms": statistics.median(walls) * 1e3,
           "p99_ms": walls[int(0.99 * (len(walls) - 1))] * 1e3, "host_ms": statistics.median(hosts) * 1e3}
    if collectives is not None:
        row["collective_ms"], row["collective_kernels"] = collectives
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama3.2-1b", help="checkpoint directory or a shape name")
    parser.add_argument("--batch-sizes", default="1,8,32,64,128,256")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--compare", choices=["hf"], help="also time HF generate at batch 1")
    parser.add_argument("--output", help="write the results as JSON")
    add_engine_arguments(parser, skip=("model",))


def run(args: argparse.Namespace) -> int:
    from streampage.llm import LLM

    if not torch.cuda.is_available():
        print("streampage bench latency needs a CUDA device")
        return 2
    model = resolve_model(args.model)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    options = {"max_num_seqs": max(batches), **engine_options(args, skip=("model",))}
    llm = LLM(model, **options)
    # The copy bandwidth of one H200 reads 4.08-4.21 TB/s from one measurement to the next (session 8),
    # as much as the changes being timed: it is measured before and after the runs, and the floor
    # takes the faster, so that a slow measurement never flatters the ratio.
    bandwidths = [copy_bandwidth(torch.device("cuda"))]
    tp = llm.engine.config.parallel.tensor_parallel_size
    rows = [decode_steps(llm, b, args.input_len, args.output_len, profile_collectives=tp > 1) for b in batches]
    bandwidths.append(copy_bandwidth(torch.device("cuda")))
    bandwidth = max(bandwidths)
    weight_bytes = llm.info.shape.weight_bytes
    floor_ms = weight_bytes / bandwidth * 1e3
    print(f"\n{args.model}, tensor parallel {tp}: weights {weight_bytes / 1e9:.2f} GB per rank, copy bandwidth "
          f"{' / '.join(f'{b / 1e12:.2f}' for b in bandwidths)} TB/s (before / after the runs), weight-read "
          f"floor {floor_ms:.3f} ms at the faster; prompt {args.input_len}, output {args.output_len}")
    print(f"{'batch':>6}{'median ms/token':>17}{'p99 ms':>9}{'x floor':>9}{'host ms/step':>14}{'tok/s':>10}"
          + (f"{'NCCL ms/step':>14}" if tp > 1 else ""))
    for r in rows:
        r["x_floor"] = r["median_ms"] / floor_ms
        print(f"{r['batch']:>6}{r['median_ms']:>17.3f}{r['p99_ms']:>9.3f}{r['x_floor']:>9.2f}{r['host_ms']:>14.3f}"
              f"{r['batch'] / r['median_ms'] * 1e3:>10.0f}"
              + (f"{r['collective_ms']:>14.3f}" if tp > 1 else ""))
    result = {"model": args.model, "tensor_parallel_size": tp, "weight_bytes_per_rank": weight_bytes,
              "copy_tb_s": bandwidth / 1e12, "copy_tb_s_before_after": [b / 1e12 for b in bandwidths],
              "floor_ms": floor_ms, "rows": rows}
    if args.compare == "hf":
        del llm
        torch.cuda.empty_cache()
        from streampage.bench.hf_baselines import hf_generate_latency

        hf = hf_generate_latency(model, 1, args.input_len, args.output_len)
        result["hf"] = hf
        print(f"HF generate (sdpa), batch 1: {hf['ms_per_token']:.3f} ms/token; streampage is "
              f"{hf['ms_per_token'] / rows[0]['median_ms']:.1f}x faster" if batches[0] == 1 else "")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0

"""Profile decode steps on the GPU: per batch size, wall time per step against the time the GPU
spent in kernels (a gap means the GPU waited for the host), the top kernels, and the host calls
that took longest (a long cudaStreamSynchronize or cudaMemcpy means the host waited for the GPU).

    python3 scripts/profile_decode.py MODEL_OR_SHAPE BATCH [BATCH...] [ENGINE OPTIONS, e.g.
        --no-async-scheduling --decode-gemv --programmatic-launch]
"""

import argparse
import time

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from streampage.bench.workloads import fixed_workload, resolve_model
from streampage.cli import add_engine_arguments, engine_options
from streampage.llm import LLM
from streampage.sampling_params import SamplingParams

STEPS = 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("batches", type=int, nargs="+")
    parser.add_argument("--temperature", type=float, default=0.0)
    add_engine_arguments(parser, skip=("model",))  # every engine option, e.g. --no-async-scheduling
    args = parser.parse_args()
    options = {"max_num_seqs": max(args.batches), "max_model_len": 4096, **engine_options(args, skip=("model",))}
    llm = LLM(resolve_model(args.model), **options)
    engine = llm.engine
    params = SamplingParams(max_tokens=64, temperature=args.temperature, ignore_eos=True)
    for batch in args.batches:
        for i, prompt in enumerate(fixed_workload(batch, 128, 64, seed=batch).prompts):
            engine.add_request(f"p{batch}-{i}", prompt, params)
        for _ in range(8):
            engine.step()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(STEPS):
                engine.step()
            wall = (time.perf_counter() - start) / STEPS * 1e3
        events = prof.key_averages()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        gpu = sum(e.device_time for e in kernels) / STEPS / 1e3
        print(f"\n=== batch {batch}: {wall:.3f} ms per step wall, {gpu:.3f} ms of kernels "
              f"(async scheduling {args.async_scheduling}) ===")
        print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
        while engine.has_unfinished_requests():
            engine.step()


if __name__ == "__main__":
    main()

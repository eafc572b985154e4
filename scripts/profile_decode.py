"""Profile decode steps on the GPU: a kernel table (torch.profiler) per batch size.

    python3 scripts/profile_decode.py MODEL_OR_SHAPE BATCH [BATCH...]
"""

import sys

from torch.profiler import ProfilerActivity, profile

from streampage.bench.workloads import fixed_workload, resolve_model
from streampage.llm import LLM
from streampage.sampling_params import SamplingParams


def main() -> None:
    model, batches = resolve_model(sys.argv[1]), [int(b) for b in sys.argv[2:]]
    llm = LLM(model, max_num_seqs=max(batches), max_model_len=4096)
    engine = llm.engine
    for batch in batches:
        for i, prompt in enumerate(fixed_workload(batch, 128, 64, seed=batch).prompts):
            engine.add_request(f"p{batch}-{i}", prompt, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
        for _ in range(8):
            engine.step()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                engine.step()
        print(f"\n=== batch {batch}: 10 decode steps ===")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))
        while engine.has_unfinished_requests():
            engine.step()


if __name__ == "__main__":
    main()

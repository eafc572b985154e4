"""paged_decode on mixed context lengths (uniform in [100, 2048], the nano-vllm workload's spread)
and on equal ones, for fixed split counts and for what a decode CUDA graph uses (`graph_split_plan`):
does splitting balance long and short rows? (cuBLAS at 1-8 rows: `streampage bench kernels --gemv`.)

    python3 scripts/probe_mixed_decode.py
"""

import torch

from streampage.bench.kernels import DTYPE, HEAD_DIM, KV_HEADS, Q_HEADS, DecodeInputs, Timer, copy_bandwidth
from streampage.kernels import DecodeWorkspace, graph_split_plan
from streampage.kernels.paged_attention import num_sms

MAX_CONTEXT = 2048


def time_decode(timer: Timer, inputs: DecodeInputs, splits: int) -> float:
    """Graph-replayed us per paged_decode call over the rotated input sets, with `splits` splits."""
    workspace = DecodeWorkspace.allocate(inputs.num_seqs, Q_HEADS, HEAD_DIM, splits, "cuda")
    return timer.graph(inputs.paged_calls("scattered", num_splits=splits, workspace=workspace))


def mixed_decode(timer: Timer, bandwidth: float) -> None:
    print("paged_decode, contexts uniform in [100, 2048] (or all equal: '=N'), scattered pages; us and share "
          "of copy bandwidth; at most N splits of >= 256 tokens")
    print(f"{'batch':>10} " + " ".join(f"{'splits ' + str(s):>16}" for s in (1, 2, 4, 8)) + f" {'graph plan':>16}")
    generator = torch.Generator().manual_seed(0)
    cases = [(16, None), (64, None), (128, None), (256, None), (64, 2048), (256, 1024)]  # None: mixed
    for batch, uniform in cases:
        lengths = (torch.randint(100, MAX_CONTEXT + 1, (batch,), generator=generator) if uniform is None
                   else torch.full((batch,), uniform))
        inputs = DecodeInputs(batch, MAX_CONTEXT)  # pools and tables for full contexts; lengths below
        inputs.lengths = lengths.to(torch.int32).cuda()
        kv_bytes = 2 * int(lengths.sum()) * KV_HEADS * HEAD_DIM * DTYPE.itemsize
        cells = []
        for splits in (1, 2, 4, 8):
            us = time_decode(timer, inputs, splits)
            cells.append(f"{us:8.1f} {kv_bytes / us / 1e6 / bandwidth:6.1%}")
        splits = graph_split_plan(batch, KV_HEADS, num_sms(torch.device("cuda")))  # what a decode graph runs
        us = time_decode(timer, inputs, splits)
        cells.append(f"{splits:3d}:{us:7.1f} {kv_bytes / us / 1e6 / bandwidth:5.1%}")
        label = f"{batch}" + ("" if uniform is None else f" ={uniform}")
        print(f"{label:>10} " + " ".join(f"{c:>16}" for c in cells))
        del inputs
        torch.cuda.empty_cache()


def main() -> None:
    timer = Timer(9)
    bandwidth = copy_bandwidth(timer)
    print(f"copy bandwidth {bandwidth:.2f} TB/s")
    mixed_decode(timer, bandwidth)


if __name__ == "__main__":
    main()

"""paged_decode on mixed context lengths (uniform in [100, 2048], the nano-vllm workload's spread)
and on equal ones, for fixed split counts and for what a decode CUDA graph uses (`graph_split_plan`):
does splitting balance long and short rows? (cuBLAS at 1-8 rows: `streampage bench kernels --gemv`.)

    python3 scripts/probe_mixed_decode.py
"""

import functools

import torch

from streampage.bench.kernels import BLOCK_SIZE, DTYPE, HEAD_DIM, KV_HEADS, Q_HEADS, Timer, copy_bandwidth
from streampage.kernels import DecodeWorkspace, graph_split_plan, paged_decode
from streampage.kernels.paged_attention import num_sms


def time_decode(timer: Timer, queries: list, pools: list, tables: torch.Tensor, lens: torch.Tensor,
                out: torch.Tensor, splits: int) -> float:
    """Graph-replayed us per paged_decode call over the rotated input sets, with `splits` splits."""
    workspace = DecodeWorkspace.allocate(out.shape[0], Q_HEADS, HEAD_DIM, splits, "cuda")
    return timer.graph([functools.partial(paged_decode, q, k, v, tables, lens, HEAD_DIM**-0.5, out=out,
                                          num_splits=splits, workspace=workspace)
                        for q, (k, v) in zip(queries, pools, strict=True)])


def mixed_decode(timer: Timer, bandwidth: float) -> None:
    print("paged_decode, contexts uniform in [100, 2048] (or all equal: '=N'), scattered pages; us and share "
          "of copy bandwidth; at most N splits of >= 256 tokens")
    print(f"{'batch':>10} " + " ".join(f"{'splits ' + str(s):>16}" for s in (1, 2, 4, 8)) + f" {'graph plan':>16}")
    generator = torch.Generator().manual_seed(0)
    cases = [(16, None), (64, None), (128, None), (256, None), (64, 2048), (256, 1024)]  # None: mixed
    for batch, uniform in cases:
        lengths = (torch.randint(100, 2049, (batch,), generator=generator) if uniform is None
                   else torch.full((batch,), uniform))
        blocks_per_seq = -(-2048 // BLOCK_SIZE)
        total_blocks = batch * blocks_per_seq
        sets = 4
        pools = [tuple(torch.randn(total_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
                       for _ in range(2)) for _ in range(sets)]
        queries = [torch.randn(batch, Q_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda") for _ in range(sets)]
        tables = torch.randperm(total_blocks, device="cuda").to(torch.int32).view(batch, blocks_per_seq)
        lens = lengths.to(torch.int32).cuda()
        kv_bytes = 2 * int(lengths.sum()) * KV_HEADS * HEAD_DIM * 2
        out = torch.empty_like(queries[0])
        cells = []
        for splits in (1, 2, 4, 8):
            us = time_decode(timer, queries, pools, tables, lens, out, splits)
            cells.append(f"{us:8.1f} {kv_bytes / us / 1e6 / bandwidth:6.1%}")
        splits = graph_split_plan(batch, KV_HEADS, num_sms(torch.device("cuda")))  # what a decode graph runs
        us = time_decode(timer, queries, pools, tables, lens, out, splits)
        cells.append(f"{splits:3d}:{us:7.1f} {kv_bytes / us / 1e6 / bandwidth:5.1%}")
        label = f"{batch}" + ("" if uniform is None else f" ={uniform}")
        print(f"{label:>10} " + " ".join(f"{c:>16}" for c in cells))
        del pools
        torch.cuda.empty_cache()


def main() -> None:
    timer = Timer(9)
    bandwidth = copy_bandwidth(timer)
    print(f"copy bandwidth {bandwidth:.2f} TB/s")
    mixed_decode(timer, bandwidth)


if __name__ == "__main__":
    main()

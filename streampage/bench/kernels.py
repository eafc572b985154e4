"""`streampage bench kernels`: the paged-attention kernels against SDPA on contiguous KV (GPU only).

One run measures the device copy bandwidth (the ceiling), then `paged_decode` at the bar shapes (Llama-3-8B
heads: 32 q / 8 kv, d=128, bf16, block 16) with scattered and contiguous block tables, replayed in a CUDA
graph and launched eagerly, against the faster of SDPA with enable_gqa and SDPA on repeated KV, and
PyTorch's paged FlexAttention where it runs; then `paged_prefill` against causal SDPA. Times are
medians of many runs; decode input sets rotate so that no call finds its KV in L2 (prefill is compute
bound and uses one). `--prefill-sweep` also times every candidate `PrefillConfig` (tile shapes, warps,
stages, Q in registers, register caps) at each prefill shape, checks each against SDPA's output and
prints a table with the best config per shape (about a minute more). `--sweep` does that and tries
decode tile configs and split counts (minutes). `--sampler` times only the sampler instead: the fused
one-pass kernel against the PyTorch pipeline at a Qwen3 vocabulary (seconds). `--gemv` times only the
skinny linear layers instead: `skinny_linear` (default config and every sweep candidate) against
`F.linear` at Llama-3.2-1B and Llama-3-8B projection shapes, 1-8 rows (a few minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from streampage.kernels.gemv import GemvConfig
    from streampage.kernels.paged_attention import PrefillConfig

DEVICE = "cuda"
Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
DECODE_SHAPES = [(1, 8192), (4, 8192), (16, 4096), (64, 2048), (256, 1024), (32, 8192)]  # (batch, context)
DECODE_BARS = {(64, 2048): 1.05, (256, 1024): 1.05, (32, 8192): 1.05, (1, 8192): 1.10, (4, 8192): 1.10}
PREFILL_TOKENS = [1024, 4096, 8192]
PREFILL_BATCH = 4  # the batched prefill case: this many sequences of the same length
PREFILL_BAR = 0.7  # minimum throughput relative to SDPA
MIN_SAMPLE_MS = 2.0  # each timed sample runs enough calls to last at least this long
FLEX_PAGE = 128  # FlexAttention's paged path wants pages as large as its KV block
FLEX_BUDGET_S = 90.0  # compile time after which the remaining shapes skip FlexAttention


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", metavar="FILE.json", help="write every number as JSON")
    parser.add_argument("--reps", type=int, default=15, help="timed samples per measurement (median)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles per shape)")
    parser.add_argument("--prefill-sweep", action="store_true",
                        help="also time every candidate prefill config at each prefill shape (about a minute)")
    parser.add_argument("--sweep", action="store_true",
                        help="also sweep decode tile configs and split counts, and prefill configs (minutes)")
    only = parser.add_mutually_exclusive_group()  # each replaces the attention runs
    only.add_argument("--sampler", action="store_true",
                      help="only the sampler: the fused one-pass kernel against the PyTorch pipeline")
    only.add_argument("--gemv", action="store_true",
                      help="only the skinny linear layers: skinny_linear's default and sweep against F.linear, "
                           "1-8 rows at Llama 1B / 8B shapes (a few minutes)")


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("streampage bench kernels: needs a CUDA GPU, and torch sees none "
              f"(torch {torch.__version__}, torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    import triton

    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(DEVICE)
    timer = Timer(args.reps)
    results: dict[str, Any] = {"device": props.name, "sms": props.multi_processor_count,
                               "torch": torch.__version__, "triton": triton.__version__}
    started = time.perf_counter()
    if args.sampler:
        return run_sampler(results, timer, started, args.output)
    results["copy_tb_s"] = copy_bandwidth(timer)
    print(f"{props.name}: device copy {results['copy_tb_s']:.2f} TB/s (read + written)\n")
    if args.gemv:
        return run_gemv(results, timer, started, args.output)
    results["shape"] = {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE,
                        "dtype": "bf16"}
    results["decode"] = []
    flex_seconds = 0.0  # FlexAttention compiles per shape; stop trying once this passes FLEX_BUDGET_S
    for num_seqs, context in DECODE_SHAPES:
        row = bench_decode(num_seqs, context, timer, flex=not args.no_flex and flex_seconds < FLEX_BUDGET_S)
        flex_seconds += row.get("flex_compile_s", 0.0)
        results["decode"].append(row)
        torch.cuda.empty_cache()
    print_decode(results["decode"], results["copy_tb_s"])
    results["prefill"] = []
    for tokens in PREFILL_TOKENS:
        for num_seqs in (1, PREFILL_BATCH):
            results["prefill"].append(bench_prefill(tokens, num_seqs, timer))
            torch.cuda.empty_cache()
    print_prefill(results["prefill"])
    if args.sweep:
        results["sweep"] = sweep(min(args.reps, 7))
    if args.sweep or args.prefill_sweep:
        results["prefill_sweep"] = prefill_sweep(min(args.reps, 7), results["prefill"])
    save_results(results, started, args.output)
    return 0


def save_results(results: dict[str, Any], started: float, output: str | None) -> None:
    """Stamp the run's duration and write everything as JSON (when asked)."""
    results["seconds"] = round(time.perf_counter() - started, 1)
    if output:
        with open(output, "w") as f:
            json.dump(results, f, indent=2)


class Timer:
    """Median microseconds per call of a rotation of callables (one per input set)."""

    def __init__(self, reps: int) -> None:
        self.reps = reps

    def _calls(self, fns: list[Callable[[], Any]]) -> int:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for fn in fns:
            fn()
        torch.cuda.synchronize()
        per_call_ms = (time.perf_counter() - start) * 1e3 / len(fns)
        return max(len(fns), min(200, math.ceil(MIN_SAMPLE_MS / max(per_call_ms, 1e-3))))

    @staticmethod
    def _time_once(sample: Callable[[], None], calls: int) -> float:
        """Microseconds per call of one run of `sample` (which makes `calls` calls), by CUDA events."""
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        sample()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) * 1e3 / calls

    def _median(self, sample: Callable[[], None], calls: int) -> float:
        return statistics.median(self._time_once(sample, calls) for _ in range(self.reps))

    def eager(self, fns: list[Callable[[], Any]]) -> float:
        """Launched from Python one after another: includes launch overhead where it dominates."""
        for fn in fns:  # compile / warm up
            fn()
        calls = self._calls(fns)

        def sample() -> None:
            for i in range(calls):
                fns[i % len(fns)]()

        sample()
        return self._median(sample, calls)

    def _capture(self, fns: list[Callable[[], Any]], calls: int | None = None) -> tuple[torch.cuda.CUDAGraph, int]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for fn in fns:  # compile before capture
                fn()
        torch.cuda.current_stream().wait_stream(side)
        calls = calls or self._calls(fns)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fns[i % len(fns)]()
        graph.replay()
        return graph, calls

    def graph(self, fns: list[Callable[[], Any]]) -> float:
        """Captured back to back in one CUDA graph and replayed: the kernel time a model step sees."""
        graph, calls = self._capture(fns)
        return self._median(graph.replay, calls)

    def graph_pair(self, first: list[Callable[[], Any]], second: list[Callable[[], Any]]) -> tuple[float, float, float]:
        """Two variants' graphs replayed alternately (ABBA order), for a small difference between them:
        clock and thermal drift during a run is larger than a 2% effect, and it cancels within a pair.
        Returns both medians (us per call) and the median of the per-pair ratios second / first."""
        graph_a, calls = self._capture(first)
        graph_b, _ = self._capture(second, calls)
        times_a, times_b = [], []
        for rep in range(3 * self.reps):
            order = ((graph_a, times_a), (graph_b, times_b))
            for graph, times in order if rep % 2 == 0 else reversed(order):
                times.append(self._time_once(graph.replay, calls))
        ratios = [b / a for a, b in zip(times_a, times_b, strict=True)]
        return statistics.median(times_a), statistics.median(times_b), statistics.median(ratios)


def copy_bandwidth(timer: Timer) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    us = timer.eager([lambda: dst.copy_(src)])
    return 2 * src.numel() / us / 1e6


def input_sets(bytes_per_set: int) -> int:
    """Enough sets that a rotation spans several times the L2, so no call finds its inputs cached."""
    l2 = getattr(torch.cuda.get_device_properties(DEVICE), "L2_cache_size", 64 << 20)
    return max(1, min(16, math.ceil(4 * l2 / bytes_per_set)))


def _pool(num_seqs: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_seqs * context // BLOCK_SIZE, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return torch.randn(shape, dtype=DTYPE, device=DEVICE), torch.randn(shape, dtype=DTYPE, device=DEVICE)


def _contiguous(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[num_seqs, kv_heads, context, head_dim]: the same tokens laid out for SDPA."""
    num_seqs = tables.shape[0]
    return cache[tables.long()].view(num_seqs, -1, KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()


class DecodeInputs:
    """Rotating input sets of one decode shape: pools, queries, both table layouts, full contexts."""

    def __init__(self, num_seqs: int, context: int) -> None:
        self.num_seqs, self.context = num_seqs, context
        self.kv_bytes = 2 * num_seqs * context * KV_HEADS * HEAD_DIM * DTYPE.itemsize
        self.sets = input_sets(self.kv_bytes)
        self.pools = [_pool(num_seqs, context) for _ in range(self.sets)]
        self.queries = [torch.randn(num_seqs, Q_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
                        for _ in range(self.sets)]
        blocks = num_seqs * context // BLOCK_SIZE
        self.tables = {
            "contiguous": torch.arange(blocks, dtype=torch.int32, device=DEVICE).view(num_seqs, -1),
            "scattered": torch.randperm(blocks, device=DEVICE).to(torch.int32).view(num_seqs, -1),
        }
        self.lengths = torch.full((num_seqs,), context, dtype=torch.int32, device=DEVICE)
        self.out = torch.empty_like(self.queries[0])

    def paged_calls(self, layout: str, **options: Any) -> list[Callable[[], Any]]:
        from streampage.kernels import paged_decode

        return [functools.partial(paged_decode, q, k, v, self.tables[layout], self.lengths, HEAD_DIM**-0.5,
                                  out=self.out, **options)
                for q, (k, v) in zip(self.queries, self.pools, strict=True)]


def bench_decode(num_seqs: int, context: int, timer: Timer, *, flex: bool) -> dict[str, Any]:
    from streampage.kernels import DecodeWorkspace, decode_split_plan
    from streampage.kernels.paged_attention import num_sms

    inputs = DecodeInputs(num_seqs, context)
    splits = decode_split_plan(num_seqs, KV_HEADS, context, num_sms(torch.device(DEVICE)))
    workspace = DecodeWorkspace.allocate(num_seqs, Q_HEADS, HEAD_DIM, splits, DEVICE)
    row: dict[str, Any] = {"batch": num_seqs, "context": context, "splits": splits, "input_sets": inputs.sets,
                           "kv_bytes": inputs.kv_bytes}
    layouts = {layout: inputs.paged_calls(layout, num_splits=splits, workspace=workspace)
               for layout in ("contiguous", "scattered")}
    contiguous_us, scattered_us, ratio = timer.graph_pair(layouts["contiguous"], layouts["scattered"])
    row["paged_contiguous_graph_us"], row["paged_scattered_graph_us"] = contiguous_us, scattered_us
    row["paging_cost"] = ratio - 1.0  # paired replays: the bar is on this
    for layout, calls in layouts.items():
        row[f"paged_{layout}_eager_us"] = timer.eager(calls)

    # SDPA reads the same tokens laid out contiguously, q as [B, Hq, 1, D].
    scale = HEAD_DIM**-0.5
    sdpa_q = [q.unsqueeze(2) for q in inputs.queries]
    sdpa_kv = [(_contiguous(k, inputs.tables["contiguous"]), _contiguous(v, inputs.tables["contiguous"]))
               for k, v in inputs.pools]
    del inputs
    group = Q_HEADS // KV_HEADS
    sdpa = functools.partial(F.scaled_dot_product_attention, scale=scale)
    variants = {  # repeated KV is 4x larger, already far beyond L2: one set
        "enable_gqa": lambda: [functools.partial(sdpa, q, k, v, enable_gqa=True)
                               for q, (k, v) in zip(sdpa_q, sdpa_kv, strict=True)],
        "repeat_kv": lambda: [functools.partial(sdpa, sdpa_q[0], sdpa_kv[0][0].repeat_interleave(group, 1),
                                                sdpa_kv[0][1].repeat_interleave(group, 1))],
    }
    for variant, make_calls in variants.items():
        try:
            calls = make_calls()
            row[f"sdpa_{variant}_graph_us"] = timer.graph(calls)
            row[f"sdpa_{variant}_eager_us"] = timer.eager(calls)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            row[f"sdpa_{variant}_error"] = str(exc).splitlines()[0]
    measured = {v: row[f"sdpa_{v}_graph_us"] for v in variants if f"sdpa_{v}_graph_us" in row}
    if measured:
        best = min(measured, key=measured.__getitem__)
        row["sdpa_variant"], row["sdpa_graph_us"] = best, measured[best]
        row["sdpa_eager_us"] = row[f"sdpa_{best}_eager_us"]
        row["ratio_to_sdpa"] = row["paged_scattered_graph_us"] / row["sdpa_graph_us"]
        row["bar"] = DECODE_BARS.get((num_seqs, context))
    if flex:
        row.update(bench_flex_decode(sdpa_q, sdpa_kv, scale, timer))
    return row


def bench_flex_decode(queries: list[torch.Tensor], kv: list[tuple[torch.Tensor, torch.Tensor]], scale: float,
                      timer: Timer) -> dict[str, Any]:
    """PyTorch's paged FlexAttention (experimental) on the same tokens, pages of FLEX_PAGE tokens."""
    try:
        from torch.nn.attention.experimental._paged_attention import PagedAttention
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention, noop_mask

        torch._dynamo.reset()  # each shape compiles afresh instead of piling up guards on one cache entry
        num_seqs, _, context, _ = kv[0][0].shape
        pages = num_seqs * -(-context // FLEX_PAGE)
        paged = PagedAttention(pages, FLEX_PAGE, num_seqs, device=DEVICE)
        for i in range(num_seqs):
            paged.reserve(torch.tensor(i, device=DEVICE), torch.tensor(context, device=DEVICE))
        batch = torch.arange(num_seqs, device=DEVICE)
        positions = torch.arange(context, device=DEVICE).expand(num_seqs, context)
        caches = []
        for k, v in kv:
            k_cache = torch.empty(1, KV_HEADS, pages * FLEX_PAGE, HEAD_DIM, dtype=DTYPE, device=DEVICE)
            v_cache = torch.empty_like(k_cache)
            paged.assign(batch, positions, k, v, k_cache, v_cache)
            caches.append((k_cache, v_cache))
        logical = create_block_mask(noop_mask, num_seqs, None, 1, context, BLOCK_SIZE=FLEX_PAGE)
        mask = paged.convert_logical_block_mask(logical)
        score_mod = paged.get_score_mod(None)
        attend = torch.compile(flex_attention, dynamic=False)
        fns = [functools.partial(attend, q, k, v, score_mod=score_mod, block_mask=mask, scale=scale,
                                 enable_gqa=True)
               for q, (k, v) in zip(queries, caches, strict=True)]
        started = time.perf_counter()
        fns[0]()
        result: dict[str, Any] = {"flex_compile_s": round(time.perf_counter() - started, 1)}
        try:
            result["flex_graph_us"] = timer.graph(fns)
        except RuntimeError as exc:  # capture of a compiled callable can fail; eager still measures it
            result["flex_graph_error"] = str(exc).splitlines()[0]
        result["flex_eager_us"] = timer.eager(fns)
        return result
    except Exception as exc:  # experimental API: any failure means "n/a", never a failed bench
        return {"flex_error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


class PrefillInputs:
    """One batch of `num_seqs` whole prompts of `tokens` tokens on scattered blocks (K/V already stored)."""

    def __init__(self, tokens: int, num_seqs: int) -> None:
        total = tokens * num_seqs
        self.tokens, self.num_seqs = tokens, num_seqs
        self.k_cache, self.v_cache = _pool(num_seqs, tokens)
        self.tables = torch.randperm(total // BLOCK_SIZE, device=DEVICE).to(torch.int32).view(num_seqs, -1)
        self.starts = torch.arange(0, total + 1, tokens, dtype=torch.int32, device=DEVICE)
        self.lengths = torch.full((num_seqs,), tokens, dtype=torch.int32, device=DEVICE)
        self.q = torch.randn(total, Q_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        self.out = torch.empty_like(self.q)

    def paged_call(self, **options: Any) -> Callable[[], Any]:
        from streampage.kernels import paged_prefill

        return functools.partial(paged_prefill, self.q, self.k_cache, self.v_cache, self.tables, self.starts,
                                 self.lengths, HEAD_DIM**-0.5, out=self.out, **options)


def sdpa_prefill_calls(inputs: PrefillInputs) -> dict[str, Callable[[], torch.Tensor]]:
    """Causal SDPA on the same tokens laid out contiguously, with enable_gqa and on repeated KV; each
    returns [seqs, q_heads, tokens, head_dim]."""
    num_seqs, tokens = inputs.num_seqs, inputs.tokens
    q = inputs.q.view(num_seqs, tokens, Q_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    k, v = _contiguous(inputs.k_cache, inputs.tables), _contiguous(inputs.v_cache, inputs.tables)
    group = Q_HEADS // KV_HEADS
    sdpa = functools.partial(F.scaled_dot_product_attention, is_causal=True, scale=HEAD_DIM**-0.5)
    return {
        "enable_gqa": functools.partial(sdpa, q, k, v, enable_gqa=True),
        "repeat_kv": functools.partial(sdpa, q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)),
    }


def sdpa_prefill_output(inputs: PrefillInputs) -> torch.Tensor:
    """SDPA's output on `inputs` in paged_prefill's layout [tokens, q_heads, head_dim], fp32: the
    answer every prefill config is checked against before it is timed."""
    return sdpa_prefill_calls(inputs)["enable_gqa"]().transpose(1, 2).reshape(inputs.q.shape).float()


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| / (1 + |expected|): what SWEEP_TOLERANCE bounds."""
    return float(((actual.float() - expected).abs() / (1 + expected.abs())).max())


def bench_prefill(tokens: int, num_seqs: int, timer: Timer) -> dict[str, Any]:
    """paged_prefill against the faster SDPA variant, their graphs replayed alternately: these kernels
    run at the GPU's power limit, where clocks drift by more than 10% over a run (session 6 timed one
    config at 1,353 and 1,211 us a minute apart), and the drift cancels within a pair."""
    inputs = PrefillInputs(tokens, num_seqs)
    row: dict[str, Any] = {"tokens": tokens, "seqs": num_seqs, "tflop": prefill_flops(tokens, num_seqs) / 1e12}
    variants = sdpa_prefill_calls(inputs)
    measured = {}
    for variant, call in variants.items():
        try:
            measured[variant] = timer.graph([call])
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            row[f"sdpa_{variant}_error"] = str(exc).splitlines()[0]
    row.update({f"sdpa_{v}_us": us for v, us in measured.items()})
    if not measured:
        return row
    best = min(measured, key=measured.__getitem__)
    row["sdpa_variant"], row["bar"] = best, PREFILL_BAR
    try:
        row["sdpa_us"], row["paged_us"], ratio = timer.graph_pair([variants[best]], [inputs.paged_call()])
        row["throughput_vs_sdpa"] = 1 / ratio
    except Exception as exc:  # a default that fails to compile or launch must not hide the rest of the run
        row["paged_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        row["sdpa_us"] = measured[best]
    return row


def prefill_flops(tokens: int, num_seqs: int) -> int:
    return 4 * HEAD_DIM * Q_HEADS * num_seqs * tokens * (tokens + 1) // 2  # causal QK^T and PV


def print_decode(rows: list[dict[str, Any]], copy_tb_s: float) -> None:
    print("paged_decode (32 q / 8 kv heads, d 128, bf16, block 16): us per call (median); graph = CUDA "
          "graph replay,\neager = Python launches; TB/s = KV bytes read / time; paging = scattered / contiguous "
          "tables - 1,\nmedian of alternating replays (bar: 2%); ratio = scattered graph / best SDPA graph (bar: at "
          "most)")
    header = (f"{'shape':>10} {'splits':>6} | {'scattered':>9} {'TB/s':>5} {'%copy':>5} {'eager':>7} | "
              f"{'contig':>7} {'paging':>6} | {'SDPA':>7} {'variant':>10} {'eager':>7} | {'ratio':>5} {'bar':>5} "
              f"{'':>4} | {'flex':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        tb_s = r["kv_bytes"] / r["paged_scattered_graph_us"] / 1e6
        ratio, bar = r.get("ratio_to_sdpa"), r.get("bar")
        verdict = "" if ratio is None or bar is None else ("ok" if ratio <= bar else "MISS")
        shape = f"B{r['batch']}/{r['context']}"
        print(f"{shape:>10} {r['splits']:>6} | {r['paged_scattered_graph_us']:>9.1f} {tb_s:>5.2f} "
              f"{100 * tb_s / copy_tb_s:>5.0f} {r['paged_scattered_eager_us']:>7.1f} | "
              f"{r['paged_contiguous_graph_us']:>7.1f} {100 * r['paging_cost']:>5.1f}% | "
              f"{_num(r.get('sdpa_graph_us'))} "
              f"{r.get('sdpa_variant', 'n/a'):>10} {_num(r.get('sdpa_eager_us'))} | {_num(ratio, 5, 2)} "
              f"{_num(bar, 5, 2)} {verdict:>4} | {_num(r.get('flex_graph_us', r.get('flex_eager_us')))}")
        for key in ("sdpa_enable_gqa_error", "sdpa_repeat_kv_error", "flex_error", "flex_graph_error"):
            if key in r:
                print(f"{'':>10}   {key}: {r[key]}")
    print()


def print_prefill(rows: list[dict[str, Any]]) -> None:
    print(f"paged_prefill (causal, scattered blocks) vs causal SDPA: us per call (median of alternating graph "
          f"replays; x SDPA = median of the pairs' ratios); bar: throughput >= {PREFILL_BAR}x SDPA")
    header = (f"{'tokens':>7} {'seqs':>4} | {'paged us':>9} {'TFLOP/s':>7} | {'SDPA us':>9} {'TFLOP/s':>7} "
              f"{'variant':>10} | {'x SDPA':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        sdpa, speed = r.get("sdpa_us"), r.get("throughput_vs_sdpa")
        verdict = "" if speed is None else (" ok" if speed >= PREFILL_BAR else " MISS")
        sdpa_tflops = None if sdpa is None else r["tflop"] / sdpa * 1e6
        paged = r.get("paged_us")
        paged_tflops = None if paged is None else r["tflop"] / paged * 1e6
        print(f"{r['tokens']:>7} {r['seqs']:>4} | {_num(paged, 9)} {_num(paged_tflops, 7, 0)} | "
              f"{_num(sdpa, 9)} {_num(sdpa_tflops, 7, 0)} {r.get('sdpa_variant', 'n/a'):>10} | "
              f"{_num(speed, 6, 2)}{verdict}")
        if "paged_error" in r:
            print(f"{'':>12}   paged_error: {r['paged_error']}")
    print()


def _num(value: float | None, width: int = 7, digits: int = 1) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def sweep(reps: int) -> dict[str, Any]:
    """Tile configs x split counts for decode; scattered tables, graph replay."""
    from streampage.kernels import DecodeConfig

    timer = Timer(reps)
    found: dict[str, Any] = {"decode": []}
    decode_configs = [DecodeConfig(n, w, s) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]
    print("sweep: paged_decode, us per call (graph replay, scattered tables), best three per shape")
    for num_seqs, context in DECODE_SHAPES:
        inputs = DecodeInputs(num_seqs, context)
        timings = []
        for splits in [s for s in (1, 2, 4, 8, 16, 32) if s == 1 or s * 256 <= context]:
            for cfg in decode_configs:
                try:
                    us = timer.graph(inputs.paged_calls("scattered", num_splits=splits, config=cfg))
                except Exception as exc:  # a config the compiler or the SM cannot fit is skipped
                    print(f"  B{num_seqs}/{context} splits {splits} {cfg}: {type(exc).__name__}")
                    continue
                timings.append({"us": us, "splits": splits, **dataclasses.asdict(cfg)})
        timings.sort(key=lambda t: t["us"])
        for t in timings[:3]:
            print(f"  B{num_seqs}/{context}: {t}")
        found["decode"].append({"batch": num_seqs, "context": context, "results": timings})
        del inputs
        torch.cuda.empty_cache()
    return found


def prefill_candidates() -> list[PrefillConfig]:
    """The PrefillConfigs `--prefill-sweep` times, the Hopper default first (`HOPPER_PREFILL`: the
    warp-specialised Gluon kernel, two softmax warpgroups fed by four gathering warps, 128 x 64 tiles,
    four stages), then the Triton kernel's default (128 x 128, two warpgroups, three stages). One
    program per SM: Gluon with six stages, or with the softmax warps gathering too (the softmax of one
    tile under the P @ V of the one before); Triton with 128 x 64 tiles. Two programs per SM (one's
    softmax under the other's MMAs): 64 x 64 tiles with one warpgroup (Triton or Gluon), or 128-row
    tiles with two warpgroups capped at 128 registers a thread."""
    from streampage.kernels import PrefillConfig
    from streampage.kernels.paged_attention import HOPPER_PREFILL

    return [
        HOPPER_PREFILL,
        PrefillConfig(128, 128, 8, 3),
        PrefillConfig(128, 64, 8, 6, gluon=True, gather_warps=4),
        PrefillConfig(128, 128, 8, 3, gluon=True),
        PrefillConfig(128, 64, 8, 4, gluon=True),
        PrefillConfig(64, 64, 4, 3, gluon=True),
        PrefillConfig(128, 128, 8, 3, block_n_diag=128),
        PrefillConfig(128, 128, 8, 2),
        PrefillConfig(128, 64, 8, 3),
        PrefillConfig(128, 64, 8, 4),
        PrefillConfig(128, 64, 8, 3, q_in_registers=True),
        PrefillConfig(64, 64, 4, 3),
        PrefillConfig(64, 64, 4, 2, q_in_registers=True),
        PrefillConfig(64, 64, 4, 3, q_in_registers=True),
        PrefillConfig(128, 64, 8, 2, maxnreg=128),
        PrefillConfig(128, 32, 8, 3, maxnreg=128),
        PrefillConfig(128, 32, 8, 4, maxnreg=128),
    ]


def config_name(cfg: PrefillConfig) -> str:
    """Compact label of a PrefillConfig: '128x128 w8 s3', then ' d64' (diagonal tiles narrower than
    block_n), ' qreg', ' r128', ' g4' (gathering warps) and ' gluon' where they apply."""
    name = f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
    if cfg.block_n_diag < cfg.block_n and not cfg.gluon:  # the Gluon kernel masks whole tiles
        name += f" d{cfg.block_n_diag}"
    return (name + (" qreg" if cfg.q_in_registers else "") + (f" r{cfg.maxnreg}" if cfg.maxnreg else "")
            + (f" g{cfg.gather_warps}" if cfg.gather_warps else "")
            + (" gluon" if cfg.gluon else ""))


def prefill_sweep(reps: int, baseline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every candidate config at every prefill shape (graph replay, scattered tables); each is checked
    against SDPA's output first. `baseline`: the prefill rows of this run, for SDPA's times."""
    timer = Timer(reps)
    shapes = [(tokens, num_seqs) for tokens in PREFILL_TOKENS for num_seqs in (1, PREFILL_BATCH)]
    sdpa_us = {(r["tokens"], r["seqs"]): r.get("sdpa_us") for r in baseline}
    candidates = prefill_candidates()
    found: list[dict[str, Any]] = []
    for tokens, num_seqs in shapes:
        inputs = PrefillInputs(tokens, num_seqs)
        expected = sdpa_prefill_output(inputs)
        for cfg in candidates:
            row: dict[str, Any] = {"tokens": tokens, "seqs": num_seqs, "config": config_name(cfg),
                                   **dataclasses.asdict(cfg)}
            call = inputs.paged_call(config=cfg)
            try:
                row["max_error"] = max_relative_error(call(), expected)
                row["us"] = timer.graph([call])
            except Exception as exc:  # a config the compiler or the SM cannot fit is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if "us" in row and sdpa_us.get((tokens, num_seqs)):
                row["throughput_vs_sdpa"] = sdpa_us[(tokens, num_seqs)] / row["us"]
            found.append(row)
        del inputs, expected
        torch.cuda.empty_cache()
    print_prefill_sweep(found, shapes, [config_name(c) for c in candidates])
    return found


# Largest |paged - SDPA| / (1 + |SDPA|) accepted from a bf16 config; beyond it the time is flagged.
SWEEP_TOLERANCE = 2e-2


def print_prefill_sweep(rows: list[dict[str, Any]], shapes: list[tuple[int, int]], names: list[str]) -> None:
    print(f"prefill sweep: us per call (graph replay, scattered blocks) and throughput x SDPA; "
          f"'!' = output off SDPA's by more than {SWEEP_TOLERANCE}, 'n/a' = failed to compile or launch")
    cell = {(r["config"], r["tokens"], r["seqs"]): r for r in rows}
    header = f"{'config':<20}" + "".join(f" | {f'{t} x{n}':>13}" for t, n in shapes)
    print(header)
    print("-" * len(header))
    for name in names:
        line = f"{name:<20}"
        for tokens, num_seqs in shapes:
            r = cell[(name, tokens, num_seqs)]
            if "us" not in r:
                line += f" | {'n/a':>13}"
                continue
            flag = "!" if r["max_error"] > SWEEP_TOLERANCE else " "
            line += f" | {r['us']:>7.1f} {_num(r.get('throughput_vs_sdpa'), 4, 2)}{flag}"
        print(line)
    for r in rows:
        if "error" in r:
            print(f"  {r['config']} at {r['tokens']} x{r['seqs']}: {r['error']}")
    print(f"best per shape (bar: >= {PREFILL_BAR}x SDPA):")
    for tokens, num_seqs in shapes:
        timed = [r for r in rows if (r["tokens"], r["seqs"]) == (tokens, num_seqs) and "us" in r
                 and r["max_error"] <= SWEEP_TOLERANCE]
        if not timed:
            print(f"  {tokens:>5} x{num_seqs}: no config ran correctly")
            continue
        best = min(timed, key=lambda r: r["us"])
        speed = best.get("throughput_vs_sdpa")
        verdict = "" if speed is None else ("ok" if speed >= PREFILL_BAR else "MISS")
        print(f"  {tokens:>5} x{num_seqs}: {best['config']:<20} {best['us']:>8.1f} us  "
              f"{_num(speed, 4, 2)} x SDPA {verdict}")
    print()


# --- the sampler -------------------------------------------------------------------------------------

SAMPLER_VOCAB = 151936  # Qwen3
SAMPLER_ROWS = [1, 64, 256]


def run_sampler(results: dict[str, Any], timer: Timer, started: float, output: str | None) -> int:
    results["sampler"] = bench_sampler(timer)
    print_sampler(results["sampler"])
    save_results(results, started, output)
    return 0


def bench_sampler(timer: Timer) -> list[dict[str, Any]]:
    """`sample_on_device` fused (one Triton pass) against the PyTorch pipeline, all-greedy and
    temperature 0.6 batches, bf16 and fp32 logits; both include the device-to-host copy the runner
    queues. Launched eagerly as the runner does; input sets rotate past the L2."""
    from streampage.kernels import sample_tokens
    from streampage.model.sampler import SamplingMetadata, sample_on_device
    from streampage.sampling_params import SamplingParams

    seed = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    rows_out = []
    for dtype in (torch.bfloat16, torch.float32):
        for num_rows in SAMPLER_ROWS:
            sets = input_sets(num_rows * SAMPLER_VOCAB * dtype.itemsize)
            logits = [(4 * torch.randn(num_rows, SAMPLER_VOCAB, device=DEVICE)).to(dtype) for _ in range(sets)]
            for mode, temperature in (("greedy", 0.0), ("T=0.6", 0.6)):
                meta = SamplingMetadata.build([SamplingParams(temperature=temperature)] * num_rows, device=DEVICE)
                row: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "rows": num_rows, "mode": mode}
                for path, fused in (("pytorch", False), ("fused", True)):
                    row[f"{path}_us"] = timer.eager(
                        [functools.partial(sample_on_device, x, meta, fused=fused) for x in logits])
                row["speedup"] = row["pytorch_us"] / row["fused_us"]
                # The kernel alone, replayed from a graph: its device time without launches or copies.
                random = (meta.temperature, seed) if temperature else (None, None)
                row["kernel_graph_us"] = timer.graph([functools.partial(sample_tokens, x, *random) for x in logits])
                rows_out.append(row)
            del logits
            torch.cuda.empty_cache()
    return rows_out


def print_sampler(rows: list[dict[str, Any]]) -> None:
    print(f"sampler, vocab {SAMPLER_VOCAB}: us per sample_on_device call (median, eager, with the host copy); "
          "kernel = the fused kernel alone, replayed in a CUDA graph")
    header = f"{'dtype':>8} {'rows':>5} {'mode':>7} | {'pytorch':>9} {'fused':>9} | {'speedup':>7} | {'kernel':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['dtype']:>8} {r['rows']:>5} {r['mode']:>7} | {r['pytorch_us']:>9.1f} {r['fused_us']:>9.1f} | "
              f"{r['speedup']:>7.2f} | {r['kernel_graph_us']:>7.1f}")
    print()


# --- skinny linear layers (decode GEMV) --------------------------------------------------------------

# (name, N, K): weight [N, K] of the Llama-3.2-1B and Llama-3-8B projections (qkv and gate_up merged).
GEMV_SHAPES = [
    ("1b qkv", 3072, 2048), ("1b o", 2048, 2048), ("1b gate_up", 16384, 2048), ("1b down", 2048, 8192),
    ("1b lm_head", 128256, 2048),
    ("8b qkv", 6144, 4096), ("8b o", 4096, 4096), ("8b gate_up", 28672, 4096), ("8b down", 4096, 14336),
    ("8b lm_head", 128256, 4096),
]
GEMV_ROWS = [1, 2, 4, 8]
GEMV_LAYERS = {"1b": 16, "8b": 32}  # decoder layers: a layer's four projections x this = per token
GEMV_SWEEP_REPS = 5  # timed samples per sweep candidate; the best is then re-timed with --reps


def run_gemv(results: dict[str, Any], timer: Timer, started: float, output: str | None) -> int:
    """Every shape x rows: F.linear, the default GemvConfig and the best sweep candidate, graph-replayed
    over rotating weight copies. Rows print as they are measured and the JSON is rewritten after each
    shape, so a run cut short keeps what it measured."""
    print_gemv_header()
    results["gemv"] = []
    for name, n, k in GEMV_SHAPES:
        results["gemv"] += bench_gemv_shape(name, n, k, timer, results["copy_tb_s"])
        torch.cuda.empty_cache()  # this shape's weight copies
        save_results(results, started, output)
    print()
    print_gemv_summary(results["gemv"])
    return 0


def gemv_config_name(cfg: GemvConfig) -> str:
    """'32x256 k5 w4 s4 mma': tile rows x columns, K splits, warps, stages, MMA or FMA."""
    return (f"{cfg.block_n}x{cfg.block_k} k{cfg.split_k} w{cfg.num_warps} s{cfg.num_stages} "
            f"{'mma' if cfg.dot else 'fma'}")


def bench_gemv_shape(name: str, n: int, k: int, timer: Timer, copy_tb_s: float) -> list[dict[str, Any]]:
    """One weight shape at every row count, over enough weight copies that L2 holds none of them."""
    weight_bytes = n * k * torch.bfloat16.itemsize
    weights = [(torch.randn(n, k, device=DEVICE) / k**0.5).to(torch.bfloat16) for _ in range(input_sets(weight_bytes))]
    rows = []
    for m in GEMV_ROWS:
        row = bench_gemv_case(weights, m, timer, copy_tb_s)
        row["name"] = name
        print_gemv_row(row)
        rows.append(row)
    return rows


def bench_gemv_case(weights: list[torch.Tensor], m: int, timer: Timer, copy_tb_s: float) -> dict[str, Any]:
    """F.linear, the default config and every sweep candidate at one shape and row count. Each config
    is checked against an fp32 product first (never chosen as best beyond SWEEP_TOLERANCE); one that
    fails to compile or launch is reported and skipped."""
    from streampage.kernels import GemvConfig, gemv_candidates, skinny_linear
    from streampage.kernels.paged_attention import num_sms

    n, k = weights[0].shape
    x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
    expected = x.float() @ weights[0].float().T
    sms = num_sms(torch.device(DEVICE))

    def calls(cfg: GemvConfig) -> list[Callable[[], Any]]:
        return [functools.partial(skinny_linear, x, w, config=cfg) for w in weights]

    def error(cfg: GemvConfig) -> float:
        return max_relative_error(skinny_linear(x, weights[0], config=cfg), expected)

    weight_bytes = weights[0].numel() * weights[0].element_size()
    row: dict[str, Any] = {"n": n, "k": k, "m": m, "weight_bytes": weight_bytes, "input_sets": len(weights)}
    row["linear_us"] = timer.graph([functools.partial(F.linear, x, w) for w in weights])
    default = GemvConfig.default(m, n, k, sms)
    row["default"] = gemv_config_name(default)
    row["default_error"] = error(default)
    row["default_us"] = timer.graph(calls(default))
    sweep_timer = Timer(min(timer.reps, GEMV_SWEEP_REPS))
    sweep = []
    for cfg in gemv_candidates(m, n, k, sms):
        entry: dict[str, Any] = {"config": gemv_config_name(cfg), **dataclasses.asdict(cfg)}
        try:
            entry["max_error"] = error(cfg)
            entry["us"] = sweep_timer.graph(calls(cfg))
        except Exception as exc:  # a config the compiler or the SM cannot fit is reported, not fatal
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        sweep.append(entry)
    row["sweep"] = sweep
    timed = [e for e in sweep if "us" in e and e["max_error"] <= SWEEP_TOLERANCE]
    if timed:
        best = min(timed, key=lambda e: e["us"])
        row["best"] = best["config"]
        best_cfg = GemvConfig(**{f.name: best[f.name] for f in dataclasses.fields(GemvConfig)})
        row["best_us"] = timer.graph(calls(best_cfg))  # re-timed with the full count of samples
    for key in ("linear", "default", "best"):
        if f"{key}_us" in row:
            row[f"{key}_copy_share"] = weight_bytes / row[f"{key}_us"] / 1e6 / copy_tb_s
    return row


def print_gemv_header() -> None:
    print("skinny_linear vs F.linear, bf16, weight [N, K]: us per call (median, graph replay, rotating weight "
          "copies);\n%copy = weight bytes / time / copy bandwidth; '!' = output off the fp32 product by more "
          f"than {SWEEP_TOLERANCE}")
    header = (f"{'shape':>12} {'N x K':>14} {'M':>2} | {'F.linear':>8} {'%copy':>5} | {'default':>8} {'%copy':>5} | "
              f"{'best':>8} {'%copy':>5} {'x lin':>5} | best config")
    print(header)
    print("-" * len(header))


def print_gemv_row(r: dict[str, Any]) -> None:
    def cell(key: str) -> str:
        share = r.get(f"{key}_copy_share")
        return f"{_num(r.get(f'{key}_us'), 8)} {_num(None if share is None else 100 * share, 5, 0)}"

    flag = "!" if r["default_error"] > SWEEP_TOLERANCE else " "
    speedup = r["linear_us"] / r["best_us"] if "best_us" in r else None
    print(f"{r['name']:>12} {r['n']:>6} x {r['k']:>5} {r['m']:>2} | {cell('linear')} | {cell('default')}{flag}| "
          f"{cell('best')} {_num(speedup, 5, 2)} | {r.get('best', 'none ran correctly')}", flush=True)
    for e in r["sweep"]:
        if "error" in e:
            print(f"{'':>12}   {e['config']}: {e['error']}")


def print_gemv_summary(rows: list[dict[str, Any]]) -> None:
    """Per model and row count: one decoder layer's four projections, F.linear against the best
    configs, and the difference over all layers (per decode step, before the LM head)."""
    print("one decoder layer (qkv + o + gate_up + down), us: F.linear / best skinny_linear; x layers = per step")
    for model, layers in GEMV_LAYERS.items():
        for m in GEMV_ROWS:
            layer = [r for r in rows if r["m"] == m and r["name"].startswith(model) and "lm_head" not in r["name"]]
            if len(layer) != 4 or any("best_us" not in r for r in layer):
                continue
            linear = sum(r["linear_us"] for r in layer)
            best = sum(min(r["best_us"], r["linear_us"]) for r in layer)
            print(f"  {model} M={m}: {linear:7.1f} / {best:7.1f} us per layer; x {layers} layers: "
                  f"{(linear - best) * layers / 1e3:.3f} ms saved per step")
    print()

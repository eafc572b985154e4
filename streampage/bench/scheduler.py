"""`streampage bench scheduler`: CPU time of one decode step without a model.

Fills the engine with N decoding sequences, then times `LLMEngine.step()` - scheduling, block
bookkeeping, the runner's input preparation (`StepInputBuilder`: the numpy token batch, block tables,
slot mapping, placeholders) and output bookkeeping - with an executor that runs no model and hands
back one token per row. This is BENCHMARKS.md's "CPU cost of one decode step"; launching kernels and
sampling on a device are in `streampage bench latency`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from streampage.config import EngineConfig
from streampage.engine.llm_engine import LLMEngine, RowResult
from streampage.engine.scheduler import SchedulerOutput
from streampage.runner.step_inputs import StepInputBuilder
from streampage.sampling_params import SamplingParams

VOCAB = 32000


class InputsOnlyExecutor:
    """Builds each step's inputs as the model runner does, then samples token 7 for every row that
    reaches its end."""

    def __init__(self, block_size: int, max_blocks_per_seq: int) -> None:
        self.result = RowResult([7], [-1.0])
        self.inputs = StepInputBuilder(block_size, max_blocks_per_seq)
        self.input_seconds = 0.0

    def launch(self, out: SchedulerOutput) -> list[RowResult | None]:
        start = time.perf_counter()
        inputs = self.inputs.build(out)
        self.inputs.remember_sampled(out.seqs, inputs.sample_rows)
        self.input_seconds += time.perf_counter() - start
        result = self.result
        return [result if s.num_computed_tokens + n == len(s.token_ids) else None
                for s, n in zip(out.seqs, out.num_new_tokens, strict=True)]

    def collect(self, launched: list[RowResult | None]) -> list[RowResult | None]:
        return launched


def time_decode_steps(num_seqs: int, steps: int, prompt_len: int, block_size: int) -> tuple[list[float], float]:
    """Microseconds per decode step, one entry per timed step, and the mean microseconds of those
    spent preparing inputs."""
    blocks = num_seqs * ((prompt_len + steps + 64) // block_size + 2)
    max_model_len = prompt_len + steps + 128
    config = EngineConfig.create(block_size=block_size, num_gpu_blocks=blocks, num_cpu_blocks=0,
                                 max_num_seqs=num_seqs, max_num_batched_tokens=max(8192, num_seqs))
    executor = InputsOnlyExecutor(block_size, -(-max_model_len // block_size))
    engine = LLMEngine(config, executor, num_gpu_blocks=blocks, num_cpu_blocks=0,
                       max_model_len=max_model_len, eos_token_ids=[0], vocab_size=VOCAB)
    params = SamplingParams(max_tokens=steps + 64, ignore_eos=True)
    for i in range(num_seqs):
        engine.add_request(f"r{i}", [1 + (i + j) % 1000 for j in range(prompt_len)], params)
    while engine.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for g in engine.scheduler.running
                                          for s in g.seqs):
        engine.step()
    times = []
    executor.input_seconds = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - start) * 1e6)
    return times, executor.input_seconds / steps * 1e6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-seqs", default="64,256,1024", help="comma-separated running-sequence counts")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--output", help="write the results as JSON")


def run(args: argparse.Namespace) -> int:
    rows = []
    print(f"{'running seqs':>12}{'median us/step':>16}{'p90 us/step':>14}{'us/seq':>10}{'inputs us':>11}")
    for num_seqs in (int(n) for n in args.num_seqs.split(",")):
        times, input_us = time_decode_steps(num_seqs, args.steps, args.prompt_len, args.block_size)
        times.sort()
        median, p90 = statistics.median(times), times[int(0.9 * (len(times) - 1))]
        rows.append({"num_seqs": num_seqs, "median_us": median, "p90_us": p90, "mean_input_us": input_us})
        print(f"{num_seqs:>12}{median:>16.0f}{p90:>14.0f}{median / num_seqs:>10.2f}{input_us:>11.0f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=2)
    return 0

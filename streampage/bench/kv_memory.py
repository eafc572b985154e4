"""`streampage bench kv-memory`: how much reserved KV memory holds token states, paged vs static.

Replays a ShareGPT-shaped trace (all requests queued at once, so memory is the limit) through the real
scheduler and KV cache manager with a model-free executor, and through a simulation of static
reservation as in the vLLM paper's Orca baselines: each request reserves a contiguous region on
admission - Max: max_model_len slots; Pow2: prompt + output rounded up to a power of two; Oracle:
prompt + the exact output. Both admit FCFS, run one token per request per step, and are measured
while requests are still waiting (the memory-bound phase): the share of reserved slots that hold
token states, and the mean running batch size. A second table measures the KV memory that sharing
saves for parallel sampling and beam search on an Alpaca-shaped trace.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from streampage.bench.simulated import SimulatedExecutor
from streampage.bench.traces import ALPACA, SHAREGPT, TraceRequest, make_trace
from streampage.config import EngineConfig
from streampage.engine.llm_engine import LLMEngine
from streampage.sampling_params import SamplingParams

EOS = 0
VOCAB = 32000


@dataclass
class MemoryResult:
    system: str
    token_share: float  # token states / reserved slots, summed over memory-bound steps
    mean_batch: float  # running requests per memory-bound step
    steps: int


def make_engine(block_size: int, kv_tokens: int, max_num_seqs: int, max_model_len: int) -> LLMEngine:
    blocks = kv_tokens // block_size
    config = EngineConfig.create(block_size=block_size, num_gpu_blocks=blocks, num_cpu_blocks=blocks,
                                 max_num_seqs=max_num_seqs, max_num_batched_tokens=max(max_model_len, 8192),
                                 enable_prefix_caching=False, watermark=0.0)
    executor = SimulatedExecutor(VOCAB, block_size, avoid=frozenset({EOS}))
    return LLMEngine(config, executor, num_gpu_blocks=blocks, num_cpu_blocks=blocks, max_model_len=max_model_len,
                     eos_token_ids=[EOS], vocab_size=VOCAB)


def add_trace(engine: LLMEngine, trace: list[TraceRequest], **params: int) -> None:
    for i, req in enumerate(trace):
        prompt = [1 + (i * 7919 + j) % (VOCAB - 1) for j in range(req.prompt_len)]
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=req.output_len, **params), arrival_time=float(i))


def paged(trace: list[TraceRequest], block_size: int, kv_tokens: int, max_num_seqs: int,
          max_model_len: int) -> MemoryResult:
    engine = make_engine(block_size, kv_tokens, max_num_seqs, max_model_len)
    add_trace(engine, trace)
    held = reserved = batch = steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        sched = engine.scheduler
        if not sched.waiting:
            continue
        steps += 1
        batch += len(sched.running)
        held += sum(s.num_computed_tokens for g in sched.running for s in g.live_seqs())
        reserved += engine.kv.gpu.num_used * block_size
    return MemoryResult(f"streampage (block {block_size})", held / max(reserved, 1), batch / max(steps, 1), steps)


def static_reservation(policy: str, trace: list[TraceRequest], kv_tokens: int, max_num_seqs: int,
                       max_model_len: int) -> MemoryResult:
    def reservation(req: TraceRequest) -> int:
        if policy == "Max":
            return max_model_len
        if policy == "Pow2":
            return min(max_model_len, req.prompt_len + (1 << (req.output_len - 1).bit_length()))
        return req.prompt_len + req.output_len

    waiting = list(reversed(trace))
    running: list[list[int]] = []  # [tokens held, tokens still to generate, reserved slots]
    free = kv_tokens
    held = reserved = batch = steps = 0
    while waiting or running:
        while waiting and len(running) < max_num_seqs and reservation(waiting[-1]) <= free:
            req = waiting.pop()
            free -= reservation(req)
            running.append([req.prompt_len, req.output_len, reservation(req)])
        for entry in running:  # one step: every request gains a token
            entry[0] += 1
            entry[1] -= 1
        if waiting:
            steps += 1
            batch += len(running)
            held += sum(e[0] for e in running)
            reserved += sum(e[2] for e in running)
        free += sum(e[2] for e in running if e[1] == 0)
        running = [e for e in running if e[1] > 0]
    return MemoryResult(f"Orca ({policy})", held / max(reserved, 1), batch / max(steps, 1), steps)


@dataclass
class SharingResult:
    mode: str
    width: int
    saved: float  # 1 - blocks in use / blocks if every sequence had its own copy


def sharing(mode: str, width: int, trace: list[TraceRequest], block_size: int, kv_tokens: int,
            max_model_len: int) -> SharingResult:
    engine = make_engine(block_size, kv_tokens, 256, max_model_len)
    params = {"n": width} if mode == "parallel" else {"beam_width": width, "temperature": 0}
    add_trace(engine, trace, **params)
    used = unshared = 0
    while engine.has_unfinished_requests():
        engine.step()
        used += engine.kv.gpu.num_used
        unshared += sum(len(engine.kv.block_tables[s.seq_id]) for g in engine.scheduler.running
                        for s in g.live_seqs())
    return SharingResult(mode, width, 1 - used / max(unshared, 1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--kv-tokens", type=int, default=16384, help="KV memory budget in token slots")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--sharing-requests", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the results as JSON")


def run(args: argparse.Namespace) -> int:
    trace = make_trace(SHAREGPT, args.num_requests, args.max_model_len, args.seed)
    mean_in = sum(r.prompt_len for r in trace) / len(trace)
    mean_out = sum(r.output_len for r in trace) / len(trace)
    print(f"ShareGPT-shaped trace: {len(trace)} requests, mean prompt {mean_in:.0f}, mean output {mean_out:.0f}; "
          f"KV budget {args.kv_tokens} token slots, max_num_seqs {args.max_num_seqs}")
    memory = [static_reservation(p, trace, args.kv_tokens, args.max_num_seqs, args.max_model_len)
              for p in ("Max", "Pow2", "Oracle")]
    memory += [paged(trace, bs, args.kv_tokens, args.max_num_seqs, args.max_model_len) for bs in (8, 16, 32)]
    print(f"\n{'system':<24}{'KV slots holding tokens':>26}{'mean batch':>12}{'steps':>8}")
    for r in memory:
        print(f"{r.system:<24}{r.token_share:>25.1%}{r.mean_batch:>12.1f}{r.steps:>8}")

    alpaca = make_trace(ALPACA, args.sharing_requests, args.max_model_len, args.seed)
    shared = [sharing(mode, w, alpaca, 16, args.kv_tokens, args.max_model_len)
              for mode in ("parallel", "beam") for w in (2, 4, 6)]
    print(f"\nAlpaca-shaped trace ({len(alpaca)} requests), block 16: KV memory saved by sharing")
    print(f"{'mode':<22}{'width':>6}{'saved':>10}")
    for r in shared:
        label = "parallel sampling n" if r.mode == "parallel" else "beam search width"
        print(f"{label:<22}{r.width:>6}{r.saved:>10.1%}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"memory": [asdict(r) for r in memory], "sharing": [asdict(r) for r in shared]}, f, indent=2)
    return 0

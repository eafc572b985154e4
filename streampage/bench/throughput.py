"""`streampage bench throughput`: offline output tokens/s on a fixed-length or the nano-vllm workload."""

from __future__ import annotations

import argparse
import json
import time

from streampage.bench.workloads import (
    NANO_VLLM_OUTPUT_TOKENS,
    Workload,
    fixed_workload,
    max_token_id,
    nano_vllm_workload,
    resolve_model,
    same_lengths_new_tokens,
)
from streampage.cli import add_engine_arguments, engine_options
from streampage.kernels import new_variants
from streampage.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen3-0.6b", help="checkpoint directory or a shape name")
    parser.add_argument("--workload", choices=["nano-vllm", "fixed"], default="nano-vllm")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--compare", choices=["hf"], help="also run HF transformers on the same checkpoint")
    parser.add_argument("--output", help="write the results as JSON")
    add_engine_arguments(parser, skip=("model",))


def make_workload(args: argparse.Namespace, token_limit: int) -> Workload:
    if args.workload == "nano-vllm":
        workload = nano_vllm_workload(args.num_prompts, max_token_id=token_limit)
        if args.num_prompts == 256:
            assert workload.num_output_tokens == NANO_VLLM_OUTPUT_TOKENS, "the nano-vllm workload drifted"
        return workload
    return fixed_workload(args.num_prompts, args.input_len, args.output_len, max_token_id=token_limit)


def run_streampage(model: str, workload: Workload, temperature: float, options: dict, token_limit: int) -> dict:
    from streampage.llm import LLM

    llm = LLM(model, **options)
    # Warm-up on prompts shaped like the workload's last 32: every kernel variant the run needs
    # (chunked and mixed prefill, decode buckets) compiles here, not inside the timed run. Their tokens
    # are new, so the timed prompts find nothing of theirs in the prefix cache.
    warm_prompts = same_lengths_new_tokens(workload.prompts[-32:], seed=1, max_token_id=token_limit)
    warm = SamplingParams(max_tokens=24, temperature=temperature, ignore_eos=True)
    llm.generate(warm_prompts, warm, use_tqdm=False)
    llm.engine.timing.update(dict.fromkeys(llm.engine.timing, 0.0))
    runner = getattr(llm.engine.executor, "runner", None)
    if runner is not None:
        runner.timing.update(dict.fromkeys(runner.timing, 0.0))
    steps_before = llm.engine.steps_total
    params = [SamplingParams(max_tokens=n, temperature=temperature, ignore_eos=True) for n in workload.output_lens]
    with new_variants() as built:  # a kernel compiled in here would be timed as serving work
        start = time.perf_counter()
        outputs = llm.generate(workload.prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == workload.num_output_tokens, f"produced {produced} of {workload.num_output_tokens} tokens"
    stats = llm.engine.stats()
    timing = {**llm.engine.timing, **(runner.timing if runner is not None else {})}
    steps = stats.steps_total - steps_before
    return {"system": "streampage", "seconds": elapsed, "output_tokens": produced,
            "output_tok_s": produced / elapsed, "requests_s": len(outputs) / elapsed,
            "steps": steps, "preemptions": stats.num_preemptions_total,
            "kv_blocks": stats.kv_blocks_total,
            "ms_per_step": {k: v / steps * 1e3 for k, v in timing.items()},
            "kernel_variants_built": None if built is None else sorted(built)}


def run(args: argparse.Namespace) -> int:
    model = resolve_model(args.model)
    token_limit = max_token_id(model)
    workload = make_workload(args, token_limit)
    options = engine_options(args, skip=("model",))
    results = [run_streampage(model, workload, args.temperature, options, token_limit)]
    # streampage's figures are printed and saved before HF starts: HF's run takes minutes, and a run
    # cut short there must still report what it measured.
    print(f"\nworkload {workload.name}: {len(workload.prompts)} prompts, {workload.num_output_tokens} output tokens")
    print(f"{'system':<28}{'seconds':>10}{'output tok/s':>15}{'req/s':>9}")
    print_result(results[0])
    phases = results[0]["ms_per_step"]
    print("streampage host ms per step: " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items())
          + " (execute = prepare + launch + sample; gpu_wait, blocked on the device for the tokens, is in process)")
    print_variants(results[0]["kernel_variants_built"])
    save_results(args, workload, results)
    if args.compare == "hf":
        from streampage.bench.hf_baselines import hf_continuous_batching

        results.append(hf_continuous_batching(model, workload, args.temperature))
        print_result(results[1])
        print(f"streampage / {results[1]['system']}: {results[0]['output_tok_s'] / results[1]['output_tok_s']:.1f}x")
        save_results(args, workload, results)
    return 0


def print_variants(built: list[str] | None) -> None:
    """What the timed run compiled: each variant is host time that serving a warm engine would not spend."""
    if built is None:
        print("Triton kernel variants built in the timed run: unknown (this Triton has no JIT cache hook)", flush=True)
        return
    names = ", ".join(f"{name} x{built.count(name)}" for name in sorted(set(built)))
    print(f"Triton kernel variants built in the timed run: {len(built)}" + (f" ({names})" if built else ""),
          flush=True)


def print_result(result: dict) -> None:
    print(f"{result['system']:<28}{result['seconds']:>10.2f}{result['output_tok_s']:>15.0f}"
          f"{result['requests_s']:>9.2f}", flush=True)


def save_results(args: argparse.Namespace, workload: Workload, results: list[dict]) -> None:
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"model": args.model, "workload": workload.name, "results": results}, f, indent=2)

"""HF transformers baselines on the same checkpoint, run in the same process as streampage's figures.

Random weights come from `from_config` directly on the GPU (as in BENCHMARKS.md), which costs what
trained weights cost when outputs are forced to a fixed length.
"""

from __future__ import annotations

import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from streampage.bench.workloads import Workload


def load_hf_model(model_dir: str, attn_implementation: str = "sdpa") -> PreTrainedModel:
    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "streampage_random_weights", False):
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                     attn_implementation=attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                     attn_implementation=attn_implementation).cuda()
    return model.eval()


def _sampling_config(max_new_tokens: int, temperature: float) -> GenerationConfig:
    # eos_token_id=None: outputs run to max_new_tokens, like ignore_eos.
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                            temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                            eos_token_id=None, pad_token_id=0)


def hf_continuous_batching(model_dir: str, workload: Workload, temperature: float) -> dict:
    """HF `generate_batch` with `paged|sdpa` attention. It takes one output length for every request, so
    it runs the workload's prompts with the workload's mean output length (the same total tokens)."""
    model = load_hf_model(model_dir, "paged|sdpa")
    mean_out = round(workload.num_output_tokens / len(workload.prompts))
    config = _sampling_config(mean_out, temperature)
    model.generate_batch(inputs=workload.prompts[:8], generation_config=_sampling_config(8, temperature))
    torch.cuda.synchronize()
    start = time.perf_counter()
    results = model.generate_batch(inputs=workload.prompts, generation_config=config)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    produced = sum(len(r.generated_tokens) for r in results.values())
    del model
    torch.cuda.empty_cache()
    return {"system": "HF generate_batch paged|sdpa", "seconds": elapsed, "output_tokens": produced,
            "output_tok_s": produced / elapsed, "requests_s": len(results) / elapsed,
            "note": f"every request {mean_out} output tokens (the workload's mean)"}


@torch.inference_mode()
def hf_generate_latency(model_dir: str, batch_size: int, input_len: int, output_len: int) -> dict:
    """Per-token latency of HF `generate` (static batch, sdpa): (total - prefill-only) / decode steps."""
    model = load_hf_model(model_dir, "sdpa")
    ids = torch.randint(0, 10000, (batch_size, input_len), device="cuda")
    mask = torch.ones_like(ids)

    def timed(new_tokens: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, generation_config=_sampling_config(new_tokens, 0.0))
        torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(4)  # warm-up
    prefill = timed(1)
    total = timed(output_len)
    torch.cuda.empty_cache()
    return {"system": "HF generate sdpa", "batch_size": batch_size,
            "ms_per_token": (total - prefill) / (output_len - 1) * 1e3}

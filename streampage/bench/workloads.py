"""Offline benchmark workloads and the checkpoints they run on.

`nano_vllm_workload` reproduces the workload nano-vllm and mini-sglang publish: 256 prompts with
lengths uniform in [100, 1024] of token ids `randint(0, 10000)`, then output lengths uniform in
[100, 1024] drawn after all prompts, from Python's `random.seed(0)`; 133,966 output tokens in all.

Token ids stop at `max_token_id` (10,000, as published), lowered to the model's largest id for
vocabularies that small (test checkpoints): the draws, and so the lengths, are the same either way.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from streampage.model.demo import SHAPES, write_demo_model

NANO_VLLM_OUTPUT_TOKENS = 133_966
MAX_TOKEN_ID = 10_000


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def nano_vllm_workload(num_seqs: int = 256, max_input_len: int = 1024, max_output_len: int = 1024,
                       max_token_id: int = MAX_TOKEN_ID) -> Workload:
    rng = random.Random(0)
    prompts = [[rng.randint(0, max_token_id) for _ in range(rng.randint(100, max_input_len))] for _ in range(num_seqs)]
    outputs = [rng.randint(100, max_output_len) for _ in range(num_seqs)]
    return Workload("nano-vllm", prompts, outputs)


def fixed_workload(num_seqs: int, input_len: int, output_len: int, seed: int = 0,
                   max_token_id: int = MAX_TOKEN_ID) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randint(0, max_token_id) for _ in range(input_len)] for _ in range(num_seqs)]
    return Workload(f"fixed {input_len}/{output_len}", prompts, [output_len] * num_seqs)


def same_lengths_new_tokens(prompts: list[list[int]], seed: int, max_token_id: int = MAX_TOKEN_ID) -> list[list[int]]:
    """Prompts of the same lengths with fresh token ids: a warm-up that compiles what the timed run
    needs without leaving its prompts in the prefix cache (which would skip part of their prefill)."""
    rng = random.Random(seed)
    return [[rng.randint(0, max_token_id) for _ in prompt] for prompt in prompts]


def max_token_id(model_dir: str) -> int:
    """MAX_TOKEN_ID, or the checkpoint's largest token id if its vocabulary is smaller."""
    from streampage.model.loader import load_config  # torch and transformers load here, not at import

    return min(MAX_TOKEN_ID, load_config(Path(model_dir)).vocab_size - 1)


def resolve_model(model: str) -> str:
    """A checkpoint directory, or a shape name (`qwen3-0.6b`, ...) written with random weights."""
    if model in SHAPES:
        path = Path(tempfile.gettempdir()) / f"streampage-shape-{model}"
        if not (path / "config.json").exists():
            write_demo_model(path, model)
        return str(path)
    return model

"""Tiny random Hugging Face checkpoints of every supported family, for parity tests against transformers.

    path = make_checkpoint(tmp_path, "qwen3")             # a complete checkpoint directory
    path = make_checkpoint(tmp_path, "llama", num_hidden_layers=1, max_shard_size="20KB")
    reference = load_reference_model(path)                # the transformers model of the same files

Each family gets odd small sizes (hidden 64, 4 query / 2 KV heads of 16, a 397-token vocabulary),
seeded random float32 weights (norm weights and biases randomised too) saved with `save_pretrained`,
and the demo tokenizer (byte-level BPE with <s>, </s> and a ChatML chat template) trained to the model's
vocabulary. generation_config.json lists </s> and <|im_end|> as end-of-sequence tokens.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from streampage.model.demo import BOS, EOS, IM_END, build_tokenizer, write_tokenizer

VOCAB_SIZE = 397
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}  # short, so the scaled band covers head_dim 16
_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 88, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
    "initializer_range": 0.1,  # peaked next-token distributions: greedy choices are far from ties
}
FAMILIES: dict[str, tuple[type, dict[str, Any]]] = {
    "llama": (LlamaConfig, {"rope_theta": 10000.0}),
    "llama3": (LlamaConfig, {"rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE, "num_hidden_layers": 3}),
    "llama32": (LlamaConfig, {"rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
                              "tie_word_embeddings": True}),
    # the window is shorter than max_position_embeddings, so streampage caps max_model_len to 128
    "mistral": (MistralConfig, {"rope_theta": 1e6, "sliding_window": 128}),
    "qwen2": (Qwen2Config, {"rope_theta": 1e6, "num_hidden_layers": 3}),
    "qwen3": (Qwen3Config, {"rope_theta": 1e6}),
}


@functools.cache
def _tokenizer(vocab_size: int) -> Tokenizer:
    return build_tokenizer(vocab_size)


def make_checkpoint(
    tmp_path: Path, family: str, *, seed: int = 0, max_shard_size: str | None = None, **overrides: Any
) -> Path:
    """Write a random checkpoint of `family` (a key of FAMILIES) under tmp_path and return its directory.

    overrides: any config field (num_hidden_layers=1, num_key_value_heads=1, ...). max_shard_size
    (e.g. "20KB") splits the weights into shards with a model.safetensors.index.json.
    """
    config_class, family_fields = FAMILIES[family]
    tokenizer = _tokenizer(overrides.get("vocab_size", VOCAB_SIZE))
    fields = {**_COMMON, **family_fields, **overrides}
    config = config_class(**fields, bos_token_id=tokenizer.token_to_id(BOS), eos_token_id=tokenizer.token_to_id(EOS))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _perturb_vectors(model)
    # instruct-style: the end-of-turn token stops generation too, but only generation_config says so
    model.generation_config.eos_token_id = [tokenizer.token_to_id(EOS), tokenizer.token_to_id(IM_END)]
    path = _fresh_dir(tmp_path, family)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    write_tokenizer(path, tokenizer, fields["max_position_embeddings"])
    return path


@torch.no_grad()
def _perturb_vectors(model: PreTrainedModel) -> None:
    """transformers initialises norms to 1 and biases to 0, which would hide a norm or bias loaded into
    the wrong place; trained checkpoints have neither."""
    for param in model.parameters():
        if param.dim() == 1:
            param.add_(0.1 * torch.randn_like(param))


def load_reference_model(path: Path) -> PreTrainedModel:
    """The transformers model of a checkpoint, float32, eager attention, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()


def _fresh_dir(tmp_path: Path, family: str) -> Path:
    path, index = tmp_path / family, 1
    while path.exists():
        index += 1
        path = tmp_path / f"{family}-{index}"
    return path

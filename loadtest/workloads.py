"""Seeded request streams: prompt token ids and output lengths.

Prompts are random token ids below `vocab_limit`, so a prompt's length in tokens is exact whatever the
tokenizer; output lengths are set by `max_tokens` with `ignore_eos`, so they are exact too.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

WORKLOADS = ("random", "fixed", "sharegpt", "prefix")

# Synthetic ShareGPT: log-normal lengths (sigma 1.0), clipped the way vLLM filters ShareGPT
# (>= 4 tokens each, prompt <= 1024, prompt + output <= 2048). The log-means are chosen so the means
# after clipping are the vLLM paper's ShareGPT figures, 161.31 prompt and 337.99 output tokens.
SHAREGPT_SIGMA = 1.0
SHAREGPT_PROMPT_LOG_MEAN = 4.614
SHAREGPT_OUTPUT_LOG_MEAN = 5.367
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT = 1024
SHAREGPT_MAX_TOTAL = 2048


@dataclass(frozen=True)
class RequestSpec:
    prompt_token_ids: list[int]
    max_tokens: int
    prompt_text: str | None = None  # the ids decoded, for servers that take text only (`with_prompt_text`)


@dataclass(frozen=True)
class WorkloadConfig:
    kind: str = "random"
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0
    prefix_len: int = 0
    num_prefixes: int = 1
    vocab_limit: int = 1000
    seed: int = 0
    # Seeds prompt token ids (not lengths) together with the point index: see `generate`.
    token_salt: int = 0

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}, got {self.kind!r}")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(f"input_len and output_len must be >= 1, got {self.input_len}, {self.output_len}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if self.prefix_len < 0 or self.num_prefixes < 1:
            raise ValueError(f"prefix_len must be >= 0 and num_prefixes >= 1, got {self.prefix_len}, "
                             f"{self.num_prefixes}")
        if self.vocab_limit < 2:
            raise ValueError(f"vocab_limit must be >= 2, got {self.vocab_limit}")
        if self.seed < 0 or self.token_salt < 0:
            raise ValueError(f"seed and token_salt must be >= 0, got {self.seed}, {self.token_salt}")


def generate(config: WorkloadConfig, seed_offset: int = 0, point: int = 0) -> Iterator[RequestSpec]:
    """An endless, reproducible stream of requests. Lengths (and which shared prefix a prompt takes)
    come from `seed + seed_offset` alone, so every point of a sweep sends the same lengths; token ids
    also take `token_salt` and `point` (as separate seed words: salt 1 point 0 is not salt 0 point 1),
    so each point's prompts are new to the server. A prefix cache then
    holds nothing from an earlier point, or from a warm-up run given another salt, that would let
    prompts skip their prefill and flatter TTFT."""
    lengths = np.random.default_rng(config.seed + seed_offset)
    tokens = np.random.default_rng([config.seed + seed_offset, config.token_salt, point])
    if config.kind == "sharegpt":
        yield from _sharegpt(config, lengths, tokens)
    elif config.kind == "prefix":
        yield from _shared_prefix(config, lengths, tokens)
    else:
        ratio = 0.0 if config.kind == "fixed" else config.range_ratio
        while True:
            prompt_len = _uniform_len(lengths, config.input_len, ratio)
            output_len = _uniform_len(lengths, config.output_len, ratio)
            yield RequestSpec(_tokens(tokens, config, prompt_len), output_len)


def _uniform_len(rng: np.random.Generator, length: int, ratio: float) -> int:
    """Uniform in [length * (1 - ratio), length * (1 + ratio)], as vLLM's random dataset draws."""
    low = max(1, int(length * (1 - ratio)))
    high = max(low, int(length * (1 + ratio)))
    return int(rng.integers(low, high + 1))


def _tokens(rng: np.random.Generator, config: WorkloadConfig, count: int) -> list[int]:
    return rng.integers(0, config.vocab_limit, size=count).tolist()


def _sharegpt(config: WorkloadConfig, lengths: np.random.Generator,
              tokens: np.random.Generator) -> Iterator[RequestSpec]:
    while True:
        prompt_len = _lognormal_len(lengths, SHAREGPT_PROMPT_LOG_MEAN, SHAREGPT_MAX_PROMPT)
        output_len = _lognormal_len(lengths, SHAREGPT_OUTPUT_LOG_MEAN, SHAREGPT_MAX_TOTAL - prompt_len)
        yield RequestSpec(_tokens(tokens, config, prompt_len), output_len)


def _lognormal_len(rng: np.random.Generator, log_mean: float, cap: int) -> int:
    drawn = round(float(np.exp(log_mean + SHAREGPT_SIGMA * rng.standard_normal())))
    return int(min(max(drawn, SHAREGPT_MIN_LEN), cap))


def _shared_prefix(config: WorkloadConfig, lengths: np.random.Generator,
                   tokens: np.random.Generator) -> Iterator[RequestSpec]:
    """Each prompt is one of `num_prefixes` shared prefixes followed by a unique random suffix."""
    prefixes = [_tokens(tokens, config, config.prefix_len) for _ in range(config.num_prefixes)]
    while True:
        prefix = prefixes[int(lengths.integers(config.num_prefixes))]
        suffix_len = _uniform_len(lengths, config.input_len, config.range_ratio)
        output_len = _uniform_len(lengths, config.output_len, config.range_ratio)
        yield RequestSpec(prefix + _tokens(tokens, config, suffix_len), output_len)


@functools.cache
def load_prompt_tokenizer(path: str) -> Tokenizer:
    """A tokenizer.json, or the one in a checkpoint directory (loaded once per process)."""
    from tokenizers import Tokenizer  # only the text-prompt path needs it

    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises its own exception type for a missing or bad file
        raise ValueError(f"--prompt-tokenizer {path}: cannot load {file}: {exc}") from exc


def with_prompt_text(specs: Iterator[RequestSpec], tokenizer_path: str) -> Iterator[RequestSpec]:
    """The same requests with their prompts also as text. Decoding happens as each request is drawn,
    before its arrival time, so it is not counted in its latency."""
    tokenizer = load_prompt_tokenizer(tokenizer_path)
    for spec in specs:
        yield replace(spec, prompt_text=tokenizer.decode(spec.prompt_token_ids, skip_special_tokens=False))

"""Synthetic request traces shaped like the workloads of the vLLM paper (lengths only, seeded).

The paper's ShareGPT trace has long-tailed lengths with means of about 161 prompt and 338 output
tokens; Alpaca has short ones (about 19 prompt, 58 output). Log-normal lengths with those means and a
heavy tail stand in for both; lengths are clipped so that prompt + output fits `max_model_len`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class TraceRequest:
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class LengthShape:
    mean_prompt: float
    mean_output: float
    sigma_prompt: float
    sigma_output: float


SHAREGPT = LengthShape(mean_prompt=161.0, mean_output=338.0, sigma_prompt=1.0, sigma_output=0.9)
ALPACA = LengthShape(mean_prompt=19.3, mean_output=58.5, sigma_prompt=0.6, sigma_output=0.7)


def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    # E[exp(N(mu, sigma^2))] = exp(mu + sigma^2 / 2): pick mu so the mean is `mean`.
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)


def make_trace(shape: LengthShape, num_requests: int, max_model_len: int, seed: int = 0) -> list[TraceRequest]:
    rng = random.Random(seed)
    trace = []
    for _ in range(num_requests):
        prompt = max(1, min(max_model_len - 1, round(_lognormal(rng, shape.mean_prompt, shape.sigma_prompt))))
        output = max(1, min(max_model_len - prompt, round(_lognormal(rng, shape.mean_output, shape.sigma_output))))
        trace.append(TraceRequest(prompt, output))
    return trace

"""When requests arrive: a Poisson process, or a gamma process with tunable burstiness.

As `vllm bench serve` defines it, the gaps between arrivals are gamma-distributed with shape
`burstiness` and scale `1 / (rate * burstiness)`: the mean gap is always `1 / rate`; burstiness 1 is a
Poisson process, below 1 requests come in bursts, above 1 they come more evenly, and infinity spaces
them exactly `1 / rate` apart. An infinite rate sends every request at once. Unlike vLLM, the
schedule is not rescaled to end exactly at `n / rate`: it is an endless stream, bounded by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np


def arrival_offsets(rate: float, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """Seconds after the start at which successive requests arrive; the first arrives at 0."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"request rate and burstiness must be > 0, got {rate} and {burstiness}")
    rng = np.random.default_rng(seed)
    offset = 0.0
    while True:
        yield offset
        offset += _gap(rng, rate, burstiness)


def _gap(rng: np.random.Generator, rate: float, burstiness: float) -> float:
    if math.isinf(rate):
        return 0.0
    if math.isinf(burstiness):
        return 1.0 / rate
    return float(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness)))

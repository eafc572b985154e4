"""Arrival counters for kernels whose last program to finish a unit of work reduces it.

Split-K GEMV (`gemv.py`) and split-KV decode (`paged_attention.py`) cut one output into parts computed
by several programs. Each program stores its part, then counts itself in with an atomic on the
output's counter; the one that arrives last combines the parts and puts the counter back to zero.
That is one launch and no memset per call, and it replays in a CUDA graph, because the counters are
zero before and after every call.

One int32 buffer per device serves every such kernel: calls run one after another on the model's
stream, so no two use it at once (kernels on two streams at once must not). It grows and never
shrinks; growing inside a CUDA graph capture would put it in the graph's pool, so run each shape once
before capturing (which compiling its kernel requires anyway). A buffer that was outgrown stays
allocated: graphs captured earlier keep its address and go on using it.
"""

from __future__ import annotations

import torch

_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # kept alive for the graphs that captured them


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` zeroed int32 counters on `device` (the shared buffer)."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < count:
        if counters is not None:
            _OUTGROWN.append(counters)
        counters = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters


def all_zero() -> bool:
    """Whether every device's counters are back at zero (what each call must leave behind)."""
    return all(not counters.any() for counters in _COUNTERS.values())

"""Triton kernels for CUDA, with PyTorch references for CPU and tests.

Paged KV-cache operations: `paged_decode`, `paged_prefill`, `copy_blocks` and `store_kvcache`, whose
CPU twins (same signatures, minus the tuning keywords) are in `streampage.kernels.reference`;
`paged_prefill_gluon.py` is a Hopper-only variant of the prefill in Gluon (`PrefillConfig(gluon=True)`). Fused
decoder ops (`fused_ops.py`): RMSNorm with the residual add, q/k norm + rotary + K/V write, and
SiLU-and-mul, whose CPU twins are the model layers' own PyTorch code. `sample_tokens` (`sampling.py`):
greedy and temperature sampling with raw log-probabilities in one pass over the logits, the fast path
of `streampage.model.sampler`. The Triton modules load on first use, so importing this package costs
nothing and works without CUDA.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "store_kvcache": "cache_ops",
    "copy_blocks": "cache_ops",
    "paged_decode": "paged_attention",
    "paged_prefill": "paged_attention",
    "decode_split_plan": "paged_attention",
    "graph_split_plan": "paged_attention",
    "num_sms": "paged_attention",
    "DecodeWorkspace": "paged_attention",
    "DecodeConfig": "paged_attention",
    "PrefillConfig": "paged_attention",
    "rms_norm": "fused_ops",
    "add_rms_norm_": "fused_ops",
    "rotary_store_kv_": "fused_ops",
    "silu_and_mul": "fused_ops",
    "sample_tokens": "sampling",
    "skinny_linear": "gemv",
    "GEMV_MAX_ROWS": "gemv",
    "GemvConfig": "gemv",
    "gemv_candidates": "gemv",
    "new_variants": "jit_watch",
    "aligned_width": "host_math",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value

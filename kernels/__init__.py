"""Paged KV-cache operations: Triton kernels for CUDA, PyTorch references for CPU and tests.

The attention layer calls `store_kvcache`, `paged_decode`, `paged_prefill` and `copy_blocks` on CUDA
tensors and `streampage.kernels.reference` (same signatures, minus the tuning keywords) on CPU. The
Triton modules load on first use, so importing this package costs nothing and works without CUDA.
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
    "num_sms": "paged_attention",
    "DecodeWorkspace": "paged_attention",
    "DecodeConfig": "paged_attention",
    "PrefillConfig": "paged_attention",
    "rms_norm": "fused_ops",
    "add_rms_norm_": "fused_ops",
    "rotary_store_kv_": "fused_ops",
    "silu_and_mul": "fused_ops",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value

"""Programmatic dependent launch (PDL) for the decode path's Triton kernels, Hopper and later.

At batch 1-8 a decode step is ~150 small kernels, and each one's start-up (launch, first loads in
flight) and tail (the last programs finishing) leave the GPU partly idle: a few microseconds per
kernel, a third of a 1B model's step. With PDL a kernel may start while the one before it is still
running: it does what does not depend on that kernel (the GEMV streams its first weight tile), then
waits in `gdc_wait` until the previous kernel has finished and its writes are visible.

The rule every kernel here follows, and any kernel added to the decode path must follow: call
`wait_for_previous_kernel(PDL)` on every path through the program, before reading anything a
kernel may have written (activations, the KV pool). Weights are never written, so they may be read
before it; nor are a step's inputs (context lengths, block tables, row order) once its first kernel
runs: they arrive by host copies, or in a CUDA graph by staging copies that finish before the
step's first kernel (launched without PDL) starts, and every later kernel starts after that. A
program that exited without waiting could let its kernel finish before the previous one, and the
next kernel's wait would then cover neither.

Off unless `enable(True)` (the runner's `programmatic_launch` option); only CUDA devices of compute
capability 9.0 and later launch this way. A kernel launched without it runs exactly as before.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_enabled = False


def enable(flag: bool) -> None:
    """Turn PDL on or off for every later launch in this process."""
    global _enabled
    _enabled = flag


@functools.cache
def _supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def launch_options(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for a kernel launch on `device`: the kernel's PDL constexpr and Triton's
    `launch_pdl`, or nothing (the kernel's default, PDL off)."""
    return {"PDL": True, "launch_pdl": True} if _enabled and _supported(device) else {}


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """Wait until the previous kernel has finished and its writes are visible, then let the next
    kernel launch (it will wait in turn). A no-op when PDL is off."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

"""The decode path's Triton kernels compile for Hopper (sm_90) on any machine, GPU or not.

CI has no GPU, and the Triton interpreter runs a kernel's Python, not the compiler: a construct the
interpreter accepts can still fail to lower for the GPU. Compiling for `GPUTarget("cuda", 90, 32)`
with Triton's bundled ptxas (`tests/sm90_ptx.py`, in a process without TRITON_INTERPRET) catches
that, and the PTX shows the programmatic-dependent-launch contract of `kernels/pdl.py`: with PDL on,
exactly one `griddepcontrol.wait` and one `griddepcontrol.launch_dependents` per kernel, the trigger
after the wait unless the kernel is compiled with TRIGGER_FIRST; off, none. The GEMV's L2 weight
prefetch sits before its wait, and only under PDL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sm90_ptx import KERNELS, pdl_modes


@pytest.fixture(scope="module")
def facts() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_ptx.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


CASES = [(name, mode) for name, (fn, *_) in sorted(KERNELS.items()) for mode in pdl_modes(fn)]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "mode"), CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_decode_kernel_compiles_for_hopper_with_the_pdl_contract(facts, name, mode):
    pdl = mode != "plain"
    found = facts[f"{name}/{mode}"]
    assert (found["wait"], found["launch"]) == (int(pdl), int(pdl))
    assert found["launch_first"] == (mode == "pdl-trigger-first")


@pytest.mark.slow
def test_small_kernels_may_let_the_next_launch_first_but_long_ones_may_not(facts):
    """The norms, rotary and SiLU offer TRIGGER_FIRST; the GEMV and decode attention, which run long
    enough that a dependent launched before their wait would sit on SMs throughout, do not."""
    first = {name for name, (fn, *_) in KERNELS.items() if "pdl-trigger-first" in pdl_modes(fn)}
    assert first == {"rms-norm", "rotary-store-kv", "silu-and-mul"}


@pytest.mark.slow
def test_gemv_prefetches_its_weight_into_l2_before_the_pdl_wait_only_under_pdl(facts):
    assert facts["gemv/pdl"]["prefetch"] == facts["gemv/pdl"]["prefetch_before_wait"] == 1
    assert facts["gemv/plain"]["prefetch"] == 0


@pytest.mark.slow
def test_prefill_kernel_compiles_for_hopper_onto_the_tensor_cores(facts):
    """The batch-wide tile lookup (a cumulative sum over the sequences) lowers, and the attention
    products still become warpgroup MMAs."""
    assert facts["prefill"]["wgmma"] > 0

"""The decode path's Triton kernels compile for Hopper (sm_90) on any machine, GPU or not.

CI has no GPU, and the Triton interpreter runs a kernel's Python, not the compiler: a construct the
interpreter accepts can still fail to lower for the GPU. Compiling for `GPUTarget("cuda", 90, 32)`
with Triton's bundled ptxas (`tests/sm90_ptx.py`, in a process without TRITON_INTERPRET) catches
that, and the PTX shows the programmatic-dependent-launch contract of `kernels/pdl.py`: with PDL on,
exactly one `griddepcontrol.wait` and one `griddepcontrol.launch_dependents` per kernel; off, none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sm90_ptx import KERNELS


@pytest.fixture(scope="module")
def counts() -> dict[str, list[int]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_ptx.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
def test_decode_kernel_compiles_for_hopper_with_the_pdl_contract(counts, name, pdl):
    assert counts[f"{name}/{pdl}"] == [int(pdl), int(pdl)]


@pytest.mark.slow
def test_prefill_kernel_compiles_for_hopper_onto_the_tensor_cores(counts):
    """The batch-wide tile lookup (a cumulative sum over the sequences) lowers, and the attention
    products still become warpgroup MMAs."""
    assert counts["prefill"][0] > 0


@pytest.mark.slow
def test_sampler_takes_its_noise_logs_from_the_special_function_unit_on_the_gpu(counts):
    """With FAST_LOG2 (every CUDA launch) the Gumbel noise's two logs per column are lg2.approx
    instructions, not Triton's accurate log2 (a polynomial): the sampled loop's PTX shrinks by more
    than a third (session 8, Triton 3.9: 1,306 -> 769 lines)."""
    (fast_logs, fast_lines), (slow_logs, slow_lines) = counts["sampler/True"], counts["sampler/False"]
    assert slow_logs == 0 and fast_logs > 0
    assert fast_lines < 0.67 * slow_lines


@pytest.mark.slow
def test_gluon_prefill_compiles_for_hopper_with_its_mmas_in_flight(counts):
    """The Gluon prefill (kernels/paged_prefill_gluon.py) lowers with this Triton: warpgroup MMAs
    that it waits for explicitly (inside the loop with one still in flight, and once after it), and
    K/V pages gathered by 16-byte cp.async), with 128-row tiles on two warpgroups, with 64-row tiles
    on one, and warp-specialised (the gathers in warps of their own)."""
    for rows in ("128", "64", "ws"):
        wgmma, waits, copies, serialised = counts[f"prefill-gluon/{rows}"]
        assert wgmma > 0 and waits >= 2 and copies > 0, rows
        # ptxas keeps the MMAs asynchronous: none is waited for as it is issued (an MMA in flight
        # across the loop's back edge or a branch made it serialise all of them).
        assert serialised == 0, rows

"""PTX for sm_90 of the decode path's Triton kernels, with and without PDL, and of the prefill kernels:
run as a script (in a process without TRITON_INTERPRET, which replaces @triton.jit functions by
interpreted ones), it prints as JSON {"kernel/pdl": [griddepcontrol.wait count,
griddepcontrol.launch_dependents count], "prefill": [wgmma instruction count],
"prefill-gluon/{128,64,ws}": [wgmma count, wgmma.wait_group count, 16-byte cp.async count, ptxas
notes of serialised wgmma], "sampler/FAST_LOG2": [lg2.approx count, PTX lines]}.
tests/test_sm90_compile.py runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

from streampage.kernels import fused_ops, gemv, paged_attention, paged_prefill_gluon, sampling

HOPPER = GPUTarget("cuda", 90, 32)


def serialised_mma_notes(code: str) -> int:
    """How many times ptxas (the one Triton assembles sm_90 with) reports wgmma serialised when
    assembling `code` for sm_90a (info C7514-C7518: every MMA then waited for as it is issued)."""
    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(code)
        done = subprocess.run([ptxas, "-arch=sm_90a", src, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    return sum("serialized" in line for line in done.stderr.splitlines())


def ptx(fn, pointers: dict[str, str], constexprs: dict, gluon: bool = False, **options) -> str:
    """PTX of `fn` for sm_90: arguments typed as `pointers` gives them (pointers, or fp32 scalars),
    other runtime scalars int32. Every constexpr must be in `constexprs`, defaults included: one left
    out would be compiled as a runtime int32."""
    missing = [param.name for param in fn.params if param.is_constexpr and param.name not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: constexprs {missing} not given")
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in fn.arg_names}
    # Pointers and strides divisible by 16, as Triton's launcher specialises them in practice (the
    # Gluon kernel's 16-byte copies need it; the others compile as before).
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if gluon and (name.endswith("_ptr") or name.startswith("stride"))}
    source = (GluonASTSource if gluon else ASTSource)(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=HOPPER, options=options).asm["ptx"]


GEMV_ARGS = {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "y_ptr": "*bf16", "partial_ptr": "*fp32",
             "counter_ptr": "*i32"}
GEMV_CONSTS = {"M_PAD": 16, "BLOCK_N": 64, "BLOCK_K": 128, "NUM_STAGES": 4, "SPLIT": True, "EVEN_K": True,
               "HAS_BIAS": False, "DOT": True, "DOT_PRECISION": "tf32"}
DECODE_ARGS = {**{n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")},
               "block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "part_out_ptr": "*fp32",
               "part_lse_ptr": "*fp32", "counter_ptr": "*i32", "row_order_ptr": "*i32", "qk_scale": "fp32"}
DECODE_CONSTS = {"GROUP": 4, "GROUP_PAD": 16, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_N": 64, "SPLIT": True,
                 "DOT_PRECISION": "tf32", "GROUP_POW2": 4, "SPLITS_PAD": 64, "SPLIT_CHUNK": 8, "ORDERED": True,
                 "SAME_KV_LAYOUT": True}
ROTARY_ARGS = {**{n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "q_norm_ptr", "k_norm_ptr", "k_cache_ptr",
                                       "v_cache_ptr")},
               "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64", "eps": "fp32"}
ROTARY_CONSTS = {"NUM_Q_HEADS": 32, "Q_HEADS_PAD": 32, "NUM_KV_HEADS": 8, "KV_HEADS_PAD": 8, "HALF": 64,
                 "HALF_PAD": 64, "BLOCK_SIZE": 16, "HAS_NORM": True}
PREFILL_ARGS = {**{n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}, "block_tables_ptr": "*i32",
                "query_start_loc_ptr": "*i32", "context_lens_ptr": "*i32", "qk_scale": "fp32"}
PREFILL_CONSTS = {"GROUP": 4, "GROUP_PAD": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_M": 128, "BLOCK_N": 128,
                  "BLOCK_N_DIAG": 64, "SAME_KV_LAYOUT": True, "Q_IN_REGISTERS": False, "DOT_PRECISION": "tf32",
                  "SEQS_POW2": 256}
SAMPLE_ARGS = {"logits_ptr": "*bf16", "temperature_ptr": "*fp32", "seed_ptr": "*i64", "partial_ptr": "*fp32",
               "partial_idx_ptr": "*i32", "token_ptr": "*i64", "logprob_ptr": "*fp32"}
SAMPLE_CONSTS = {"LANES": 256, "RANDOM": True, "FINAL": False}
GLUON_PREFILL_CONSTS = {"GROUP": 4, "GROUP_PAD": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_M": 128, "BLOCK_N": 128,
                        "STAGES": 3, "SEQS_POW2": 16, "SAME_KV_LAYOUT": True, "NUM_WARPS": 8}
KERNELS = {
    "gemv": (gemv._skinny_linear_kernel, GEMV_ARGS, GEMV_CONSTS, {"num_warps": 4}),
    "decode-split": (paged_attention._decode_kernel, DECODE_ARGS, DECODE_CONSTS, {"num_warps": 4, "num_stages": 3}),
    "rms-norm": (fused_ops._rms_norm_kernel,
                 {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16", "eps": "fp32"},
                 {"HIDDEN": 2048, "BLOCK": 2048, "HAS_RESIDUAL": True}, {"num_warps": 8}),
    "rotary-store-kv": (fused_ops._rotary_store_kv_kernel, ROTARY_ARGS, ROTARY_CONSTS, {"num_warps": 4}),
    "silu-and-mul": (fused_ops._silu_and_mul_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16"}, {"BLOCK": 1024},
                     {"num_warps": 4}),
}




def main() -> None:
    counts = {}
    for name, (fn, pointers, constexprs, options) in sorted(KERNELS.items()):
        for pdl in (False, True):
            code = ptx(fn, pointers, {**constexprs, "PDL": pdl}, **options, **({"launch_pdl": True} if pdl else {}))
            counts[f"{name}/{pdl}"] = [code.count(f"griddepcontrol.{op}") for op in ("wait", "launch_dependents")]
    code = ptx(paged_attention._prefill_kernel, PREFILL_ARGS, PREFILL_CONSTS, num_warps=8, num_stages=3)
    counts["prefill"] = [code.count("wgmma.mma_async")]
    # two warpgroups; one (two programs an SM); two warpgroups fed by four gathering warps
    for name, block_m, warps, block_n in (("128", 128, 8, 128), ("64", 64, 4, 64), ("ws", 128, 4, 64)):
        consts = {**GLUON_PREFILL_CONSTS, "BLOCK_M": block_m, "NUM_WARPS": warps, "BLOCK_N": block_n}
        kernel = paged_prefill_gluon._prefill_kernel
        if name == "ws":
            kernel = paged_prefill_gluon._prefill_kernel_ws
            consts.update(STAGES=4, GATHER_WARPS=4, GATHER_REGS=paged_prefill_gluon.GATHER_REGS,
                          SOFTMAX_REGS=paged_prefill_gluon.SOFTMAX_REGS)
        code = ptx(kernel, PREFILL_ARGS, consts, gluon=True, num_warps=warps)
        copies = [line for line in code.splitlines() if "cp.async.cg.shared.global" in line]
        counts[f"prefill-gluon/{name}"] = [code.count("wgmma.mma_async"), code.count("wgmma.wait_group"),
                                              sum(line.rstrip(";").endswith("0x10, 0x10") for line in copies),
                                              serialised_mma_notes(code)]
    for fast in (False, True):
        code = ptx(sampling._sample_kernel, SAMPLE_ARGS, {**SAMPLE_CONSTS, "FAST_LOG2": fast}, num_warps=4)
        counts[f"sampler/{fast}"] = [code.count("lg2.approx"), sum(1 for line in code.splitlines()
                                                                   if line.startswith("\t") and "//" not in line)]
    json.dump(counts, sys.stdout)


if __name__ == "__main__":
    main()

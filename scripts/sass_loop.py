"""Instruction counts of the decode kernel's main loop in SASS for sm_90, beside the paging probe's
read walk with every piece of the decode kernel (`probe_decode_paging.py --reads --bisect`): no GPU
needed. Compiles both with Triton for `GPUTarget("cuda", 90, 32)`, pointers and strides 16-byte
aligned as the launcher specialises them, disassembles the cubins with the nvdisasm Triton ships,
and prints each loop's length and its commonest opcodes. Session 10 found this way that the decode
loop ran 579 instructions a tile against the walk's 481, the extra ones V's address arithmetic.

    python3 scripts/sass_loop.py        # in a process without TRITON_INTERPRET
"""

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).parent))
import probe_decode_paging

from streampage.kernels import paged_attention

NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
WALK_POINTERS = {"k_ptr": "*bf16", "v_ptr": "*bf16", "table_ptr": "*i32", "out_ptr": "*fp32",
                 "context_lens_ptr": "*i32", "q_ptr": "*bf16", "qk_scale": "fp32"}
DECODE_POINTERS = {**{n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}, "block_tables_ptr": "*i32",
                   "context_lens_ptr": "*i32", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
                   "counter_ptr": "*i32", "row_order_ptr": "*i32", "qk_scale": "fp32"}
# The 8B shape at B32/8k: one split, 64-token tiles, 4 warps, 3 stages (DecodeConfig.default there).
WALK_CONSTS = {"HEADS": 1, "TILE_TOKENS": 64, "BLOCK_SIZE": 16, "HEAD_DIM": 128, "CHAIN": True, "MASKED": True,
               "SPAN": True, "TABLE": True, "WHERE": True, "QOUT": True}
DECODE_CONSTS = {"GROUP": 4, "GROUP_PAD": 16, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_N": 64, "SPLIT": False,
                 "DOT_PRECISION": "tf32", "PDL": False, "GROUP_POW2": 4, "SPLITS_PAD": 1, "SPLIT_CHUNK": 1,
                 "ORDERED": False, "SAME_KV_LAYOUT": True}


def sass(fn: triton.JITFunction, pointers: dict[str, str], consts: dict[str, object]) -> str:
    signature = {name: "constexpr" if name in consts else pointers.get(name, "i32") for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in consts and (name.endswith("_ptr") or name.startswith("stride"))}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        Path(cubin).write_bytes(kernel.asm["cubin"])
        return subprocess.run([str(NVDISASM), "-c", cubin], capture_output=True, text=True, check=True).stdout


def loop_opcodes(code: str) -> collections.Counter:
    """Opcodes of the longest backward branch's body (the main loop)."""
    labels, instructions = {}, []
    for line in code.splitlines():
        if label := re.match(r"\s*(\.L_x_\d+):", line):
            labels[label.group(1)] = len(instructions)
        elif instr := re.match(r"\s+/\*[0-9a-f]+\*/\s+(.*?)\s*;", line):
            instructions.append(re.sub(r"^@!?U?P\w+\s+", "", instr.group(1)))
    best: list[str] = []
    for end, text in enumerate(instructions):
        target = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", text)
        if target and labels.get(target.group(1), end + 1) <= end and end - labels[target.group(1)] > len(best):
            best = instructions[labels[target.group(1)]:end + 1]
    return collections.Counter(text.split()[0].split(".")[0] for text in best)


def main() -> None:
    kernels = {"read walk, every piece": (probe_decode_paging._read_kv, WALK_POINTERS, WALK_CONSTS),
               "paged_decode": (paged_attention._decode_kernel, DECODE_POINTERS, DECODE_CONSTS)}
    counts = {name: loop_opcodes(sass(*args)) for name, args in kernels.items()}
    opcodes = sorted(set().union(*counts.values()), key=lambda op: -sum(c[op] for c in counts.values()))
    print(f"{'loop instructions':<22}" + "".join(f"{name:>24}" for name in counts))
    print(f"{'total':<22}" + "".join(f"{sum(c.values()):>24}" for c in counts.values()))
    for op in opcodes[:16]:
        print(f"{op:<22}" + "".join(f"{c[op]:>24}" for c in counts.values()))


if __name__ == "__main__":
    main()

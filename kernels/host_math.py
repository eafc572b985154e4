"""Integer helpers for the launch wrappers, in plain Python.

`triton.cdiv` and `triton.next_power_of_2` are constexpr functions in recent Triton: usable inside
kernels, but each call from Python unwraps its arguments first, a few microseconds that the launch
wrappers paid several times per launch. An eager step launches about 150 kernels.
"""

from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


# Triton compiles a variant of a kernel per class of each int argument (1, a multiple of 16, other),
# and a multiple of 16 also tells the compiler that addresses built from it are aligned. Row strides
# that follow the step (block-table widths, decode partials) are padded to this multiple, so one
# variant serves every step and keeps its vector loads.
STRIDE_ALIGN = 16


def aligned_width(entries: int) -> int:
    """Columns for a row of `entries` values (a block table's pages, a decode row's splits) whose row
    stride must stay in one specialisation class: a multiple of STRIDE_ALIGN, at least one."""
    return cdiv(max(entries, 1), STRIDE_ALIGN) * STRIDE_ALIGN

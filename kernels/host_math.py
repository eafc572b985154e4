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

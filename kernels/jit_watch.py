"""Which Triton kernel variants a stretch of code had to build.

Triton builds a kernel once per combination of its compile-time constants and argument
specialisations (an int equal to 1 or divisible by 16, a pointer aligned to 16 bytes), the first time
a launch asks for it: a compile of about a second, or a load from Triton's disk cache. Launchers keep
their variants few and independent of step sizes (`do_not_specialize`, bucketed constants, row
strides padded to multiples of 16), and the engine builds them while it warms up; a timed run that
builds one measures the compiler. Benchmarks wrap their timed part in `new_variants` and report what
it built.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def new_variants() -> Iterator[list[str] | None]:
    """Yield a list that fills with the name of each kernel variant built inside the block (None when
    this Triton has no JIT cache hook, so nothing can be watched)."""
    try:
        from triton import knobs
    except ImportError:
        yield None
        return
    runtime = knobs.runtime
    if not hasattr(runtime, "jit_cache_hook"):
        yield None
        return
    built: list[str] = []
    previous = runtime.jit_cache_hook

    def hook(*args: Any, **kwargs: Any) -> bool | None:
        built.append(kwargs["fn"].name)
        return previous(*args, **kwargs) if previous else None  # None: go on and build it

    runtime.jit_cache_hook = hook
    try:
        yield built
    finally:
        runtime.jit_cache_hook = previous

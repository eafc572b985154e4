"""The physical KV pool of one rank and its CPU swap space; block copy-on-write and swap.

One allocation, `[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`, viewed per layer as
K = pool[l, 0] and V = pool[l, 1]. The swap space has the same shape with its own block count, pinned
on CUDA hosts so swaps run as async copies. Every operation covers all layers in one or two launches.
"""

from __future__ import annotations

import torch

from streampage import kernels
from streampage.kernels import reference
from streampage.model.loader import ModelShape

BlockPairs = list[tuple[int, int]]


def bytes_per_block(shape: ModelShape, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return shape.num_layers * 2 * block_size * shape.num_kv_heads * shape.head_dim * element


class CacheEngine:
    def __init__(self, shape: ModelShape, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.device = device
        layout = (shape.num_layers, 2)
        block = (block_size, shape.num_kv_heads, shape.head_dim)
        # Zeroed on a GPU: a kernel may load a stale slot it then masks, and 0 * NaN from garbage bits
        # would poison the sum (stale slots of reused blocks are finite). On the host the reference
        # path reads only written slots, and untouched pages of a large pool cost nothing.
        on_gpu = device.type == "cuda"
        allocate = torch.zeros if on_gpu else torch.empty
        self.gpu_pool = allocate((*layout, num_gpu_blocks, *block), dtype=dtype, device=device)
        self.cpu_pool = torch.empty((*layout, num_cpu_blocks, *block), dtype=dtype, pin_memory=on_gpu)

    def swap_out(self, pairs: BlockPairs) -> None:
        """Copy GPU blocks to CPU blocks ((gpu, cpu) pairs); runs before those GPU blocks are reused."""
        if not pairs:
            return
        src, dst = _split(pairs)
        self.cpu_pool[:, :, dst] = self.gpu_pool[:, :, src.to(self.device)].to("cpu")

    def swap_in(self, pairs: BlockPairs) -> None:
        """Copy CPU blocks to GPU blocks ((cpu, gpu) pairs)."""
        if not pairs:
            return
        src, dst = _split(pairs)
        staged = self.cpu_pool[:, :, src]
        if self.device.type == "cuda":
            staged = staged.pin_memory()
        self.gpu_pool[:, :, dst.to(self.device)] = staged.to(self.device, non_blocking=True)

    def copy(self, pairs: BlockPairs) -> None:
        """Copy-on-write for every layer at once ((src, dst) pairs)."""
        if not pairs:
            return
        mapping = torch.tensor(pairs, dtype=torch.int64).to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            kernels.copy_blocks(self.gpu_pool, mapping)
        else:
            reference.copy_blocks(self.gpu_pool, mapping)


def _split(pairs: BlockPairs) -> tuple[torch.Tensor, torch.Tensor]:
    both = torch.tensor(pairs, dtype=torch.int64)
    return both[:, 0], both[:, 1]

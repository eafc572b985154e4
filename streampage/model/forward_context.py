"""The attention metadata of one forward pass, set by the model runner and read by attention layers.

Model code keeps a plain `forward(input_ids, positions)`; each attention layer reads what it needs
from the current context, so the runner can change how a batch is laid out without touching models.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Tensors live on the model's device; see `streampage.kernels.reference` for their meaning."""

    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 = write nowhere (padding rows)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    context_lens: torch.Tensor  # [num_seqs] int32, tokens in cache after this step's write
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    # True when every sequence has exactly one new token: attention uses the decode kernel and
    # query_start_loc is arange(num_seqs + 1).
    is_decode: bool
    # Decode only: how many KV splits per sequence the attention kernel launches; None = sized for
    # this batch. Decode graphs fix it at capture (`streampage.kernels.graph_split_plan`).
    decode_splits: int | None = None
    # Decode only, CUDA: a permutation of the rows, the order in which the attention kernel's programs
    # take them (longest first in decode graphs with `decode_longest_first`); None = row order.
    decode_row_order: torch.Tensor | None = None


_current: AttentionMetadata | None = None


def get_attention_metadata() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError("attention ran outside a forward context; the model runner sets one per step")
    return _current


@contextmanager
def forward_context(metadata: AttentionMetadata) -> Iterator[None]:
    global _current
    previous, _current = _current, metadata
    try:
        yield
    finally:
        _current = previous

"""Host side of a step: the scheduler's rows flattened into one token batch (numpy arrays).

Per row the scheduler says which sequence runs and how many of its tokens (starting at its
`num_computed_tokens`). `StepInputBuilder` turns that into input ids, positions, `slot_mapping`
(where each token's K/V goes), block tables (kept by a `BlockTableMirror`), context lengths and query
start offsets, and finds the placeholder tokens that the previous step is still sampling on the
device. No per-token Python objects: its cost is what the engine pays per step before a launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from streampage.kernels import aligned_width
from streampage.runner.block_table_mirror import BlockTableMirror

if TYPE_CHECKING:  # the runner reads the scheduler's rows; it never calls into the engine
    from streampage.engine.scheduler import SchedulerOutput


@dataclass
class StepInputs:
    """Host-side arrays of one step (int64/int32 numpy), ready to copy to the device."""

    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T]
    block_tables: np.ndarray  # [B, max_blocks] int32
    context_lens: np.ndarray  # [B] int32
    query_start_loc: np.ndarray  # [B + 1] int32
    sample_rows: list[int]  # rows whose last token is sampled
    is_decode: bool
    # Tokens the previous step is still sampling (the engine schedules ahead): their indices in
    # input_ids, and where each one lies in that step's sampled-token tensor on the device.
    placeholders: np.ndarray
    placeholder_sources: np.ndarray
    # Each row's row of the builder's `BlockTableMirror`, from which block_tables was read: with the
    # mirror's last writes, what tensor-parallel ranks rebuild block_tables from (`tp_control`).
    table_rows: np.ndarray | None = None


class StepInputBuilder:
    def __init__(self, block_size: int, max_blocks_per_seq: int) -> None:
        self.block_size = block_size
        # Table widths are padded (`aligned_width`) so attention compiles one variant for every step.
        self.mirror = BlockTableMirror(aligned_width(max_blocks_per_seq))
        # The last step's sampling rows (its sequences, their rows), read only when a step has
        # placeholders (async scheduling): building a seq_id -> draw map every step would cost
        # the synchronous path for nothing.
        self._sampled_rows: tuple[list, list[int]] = ([], [])

    def remember_sampled(self, seqs: list, sample_rows: list[int]) -> None:
        """The rows whose draws the next step's placeholders refer to (in draw order)."""
        self._sampled_rows = (seqs, sample_rows)

    def build(self, out: SchedulerOutput) -> StepInputs:
        """Flatten the scheduled rows into one token batch (numpy; no per-token Python objects)."""
        seqs, block_size = out.seqs, self.block_size
        num_rows = len(seqs)
        rows = self.mirror.update([s.seq_id for s in seqs], out.block_tables, out.rewritten_seq_ids,
                                  out.dropped_seq_ids)
        starts = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=num_rows)
        if out.is_decode_only:
            counts = np.ones(num_rows, dtype=np.int64)
            input_ids = np.fromiter((s.token_ids[-1] for s in seqs), dtype=np.int64, count=num_rows)
            positions = starts
            sample_rows = list(range(num_rows))
        else:
            counts = np.fromiter(out.num_new_tokens, dtype=np.int64, count=num_rows)
            ends = (starts + counts).tolist()
            input_ids = np.fromiter((t for s, a, b in zip(seqs, starts.tolist(), ends, strict=True)
                                     for t in s.token_ids[a:b]), dtype=np.int64, count=out.num_batched_tokens)
            positions = np.arange(out.num_batched_tokens, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts
                                                                                     - starts, counts)
            sample_rows = [row for row, (s, end) in enumerate(zip(seqs, ends, strict=True)) if end == len(s.token_ids)]
        context_lens = (starts + counts).astype(np.int32)
        width = aligned_width(-(-int(context_lens.max()) // block_size))
        block_tables = self.mirror.table[rows, :width]
        row_of_token = np.repeat(np.arange(num_rows), counts) if not out.is_decode_only else np.arange(num_rows)
        slot_mapping = block_tables[row_of_token, positions // block_size].astype(np.int64) * block_size + (
            positions % block_size)
        query_start_loc = np.zeros(num_rows + 1, dtype=np.int32)
        np.cumsum(counts, out=query_start_loc[1:])
        placeholders = np.flatnonzero(input_ids < 0)
        sources = np.empty(0, dtype=np.int64)
        if len(placeholders):
            prev_seqs, prev_rows = self._sampled_rows
            draw_of = {prev_seqs[row].seq_id: i for i, row in enumerate(prev_rows)}
            sources = np.fromiter((draw_of[seqs[row].seq_id] for row in row_of_token[placeholders].tolist()),
                                  dtype=np.int64, count=len(placeholders))
        return StepInputs(input_ids, positions, slot_mapping, block_tables, context_lens, query_start_loc,
                          sample_rows, out.is_decode_only, placeholders, sources, rows)

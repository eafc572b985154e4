"""A persistent host copy of the live sequences' block tables, one row per sequence.

Rebuilding a [batch, max_blocks] table every step costs O(batch x blocks) of Python; between steps a
table usually gains at most one block. The mirror copies only new entries, rewrites a row only when the
KV manager says the table changed in place (copy-on-write, swap-in), and frees rows of dropped tables.
Each update also lists what it wrote (`writes`), so that tensor-parallel ranks keep the same table
from rank 0's changes alone (`MirrorCopy`) instead of receiving the step's tables whole.
"""

from __future__ import annotations

import numpy as np


class BlockTableMirror:
    def __init__(self, max_blocks_per_seq: int, rows: int = 256) -> None:
        self.table = np.zeros((rows, max_blocks_per_seq), dtype=np.int32)
        self._row_of: dict[int, int] = {}
        self._copied = np.zeros(rows, dtype=np.int64)  # entries of each row that are current
        self._free_rows = list(range(rows - 1, -1, -1))
        self.writes: list[tuple[int, int, int]] = []  # the last update's (row, first column, end column)

    def update(self, seq_ids: list[int], tables: list[list[int]], rewritten: set[int],
               dropped: list[int]) -> np.ndarray:
        """Bring the rows of these sequences up to date; returns their row indices (int64)."""
        writes = self.writes = []
        for seq_id in dropped:
            row = self._row_of.pop(seq_id, None)
            if row is not None:
                self._free_rows.append(row)
        rows = np.empty(len(seq_ids), dtype=np.int64)
        row_of = self._row_of
        for i, (seq_id, table) in enumerate(zip(seq_ids, tables, strict=True)):
            row = row_of.get(seq_id)
            if row is None:
                row = row_of[seq_id] = self._take_row()
                self._copied[row] = 0
            elif seq_id in rewritten:
                self._copied[row] = 0
            have, need = self._copied[row], len(table)
            if need > have:
                self.table[row, have:need] = table[have:need]
                self._copied[row] = need
                writes.append((row, have, need))
            rows[i] = row
        return rows

    def _take_row(self) -> int:
        if not self._free_rows:  # more live sequences than rows: double the mirror
            old = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self._copied = np.concatenate([self._copied, np.zeros_like(self._copied)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()


class MirrorCopy:
    """Another rank's copy of rank 0's mirror table, kept by applying the writes of each update."""

    def __init__(self, max_blocks_per_seq: int, rows: int = 256) -> None:
        self.table = np.zeros((rows, max_blocks_per_seq), dtype=np.int32)

    def apply(self, writes: np.ndarray, values: np.ndarray) -> None:
        """writes [W, 3] (row, first column, end column); values: their entries, concatenated."""
        if not len(writes):
            return
        needed = int(writes[:, 0].max()) + 1
        if needed > self.table.shape[0]:  # rank 0's mirror doubled: so does the copy
            rows = self.table.shape[0]
            while rows < needed:
                rows *= 2
            grown = np.zeros((rows, self.table.shape[1]), dtype=np.int32)
            grown[: self.table.shape[0]] = self.table
            self.table = grown
        offset = 0
        for row, start, end in writes.tolist():
            self.table[row, start:end] = values[offset : offset + end - start]
            offset += end - start

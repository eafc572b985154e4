"""Rank 0's control messages to the other tensor-parallel ranks: one per step, plain numpy arrays.

A step message carries what every rank needs to run the step exactly as rank 0 does: the block moves
(swap-out, swap-in, copy-on-write pairs) and the flattened batch (`StepInputs`: input ids with
placeholders, positions, slot mapping, context lengths, query start offsets, the rows that sample).
Placeholder tokens stay placeholders here: rank 0 broadcasts their values over the device group just
before the forward, so its host never waits for them.

Block tables travel as changes. Rank 0's input builder keeps them in a `BlockTableMirror`; a step
message carries each row's mirror row and the entries this step's update wrote (usually one new block
for one sequence in sixteen), and every other rank applies them to its `MirrorCopy` and reads the
step's tables from it. A decode step of 256 sequences is a few KB instead of 256 full rows.

Layout: an int64 header (kind, is_decode, block-table width, then the element count of each array in
`_FIELDS` order), followed by each array's bytes, each padded to 8 bytes. Nothing per sequence is
pickled; building and reading a message is O(step size).
"""

from __future__ import annotations

import threading
import time
from enum import IntEnum

import numpy as np
import torch
import torch.distributed as dist

from streampage.runner.block_table_mirror import BlockTableMirror, MirrorCopy
from streampage.runner.model_runner import CacheMoves
from streampage.runner.step_inputs import StepInputs


class Kind(IntEnum):
    STEP = 1
    KEEPALIVE = 2  # rank 0 is idle but alive: the ranks' control receive has a timeout
    SHUTDOWN = 3


_FIELDS: tuple[tuple[str, type], ...] = (
    ("input_ids", np.int64), ("positions", np.int64), ("slot_mapping", np.int64), ("table_rows", np.int64),
    ("table_writes", np.int64), ("table_values", np.int32), ("context_lens", np.int32),
    ("query_start_loc", np.int32), ("sample_rows", np.int64), ("placeholders", np.int64),
    ("swap_out", np.int64), ("swap_in", np.int64), ("copy", np.int64),
)
_STEP_ARRAYS = 10  # the fields of the batch; the block moves follow
_SCALARS = 3  # kind, is_decode, block-table width
_HEADER_BYTES = 8 * (_SCALARS + len(_FIELDS))


def encode(kind: Kind, moves: CacheMoves | None = None, inputs: StepInputs | None = None,
           mirror: BlockTableMirror | None = None) -> np.ndarray:
    """One control message as bytes (uint8). A step's inputs need the mirror they were built from
    (`StepInputBuilder.mirror`, before the next step's update): its last writes travel with them."""
    arrays = [np.empty(0, dtype=dtype) for _, dtype in _FIELDS]
    scalars = [int(kind), 0, 0]
    if inputs is not None:
        assert inputs.table_rows is not None and mirror is not None
        writes = np.array(mirror.writes, dtype=np.int64).reshape(-1, 3)
        values = [mirror.table[row, start:end] for row, start, end in mirror.writes]
        arrays[:_STEP_ARRAYS] = [
            inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.table_rows, writes,
            np.concatenate(values) if values else np.empty(0, dtype=np.int32), inputs.context_lens,
            inputs.query_start_loc, np.asarray(inputs.sample_rows), inputs.placeholders,
        ]
        scalars[1:] = [int(inputs.is_decode), inputs.block_tables.shape[1]]
    if moves is not None:
        arrays[_STEP_ARRAYS:] = [np.asarray(pairs, dtype=np.int64).reshape(-1, 2) for pairs in moves]
    arrays = [np.ascontiguousarray(a, dtype=dtype) for a, (_, dtype) in zip(arrays, _FIELDS, strict=True)]
    sizes = [_padded(a.nbytes) for a in arrays]
    message = np.zeros(_HEADER_BYTES + sum(sizes), dtype=np.uint8)
    message[:_HEADER_BYTES].view(np.int64)[:] = [*scalars, *(a.size for a in arrays)]
    offset = _HEADER_BYTES
    for array, size in zip(arrays, sizes, strict=True):
        message[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
        offset += size
    return message


def decode(message: np.ndarray, tables: MirrorCopy) -> tuple[Kind, CacheMoves | None, StepInputs | None]:
    """The inverse of `encode`, applying the step's block-table writes to this rank's copy of rank 0's
    mirror (every step message must reach it, in order). The arrays are views of `message`, which
    `ControlChannel.recv` allocates afresh for every message, so nothing is copied and nothing is
    overwritten under them; the block tables are read from the copy."""
    header = message[:_HEADER_BYTES].view(np.int64)
    kind = Kind(int(header[0]))
    if kind is not Kind.STEP:
        return kind, None, None
    is_decode, width = (int(v) for v in header[1:_SCALARS])
    arrays, offset = [], _HEADER_BYTES
    for (_, dtype), count in zip(_FIELDS, header[_SCALARS:].tolist(), strict=True):
        nbytes = count * np.dtype(dtype).itemsize
        arrays.append(message[offset : offset + nbytes].view(dtype))
        offset += _padded(nbytes)
    ids, positions, slots, rows, writes, values, lens, starts, sample_rows, placeholders, *pairs = arrays
    moves = CacheMoves(*(p.reshape(-1, 2).tolist() for p in pairs))
    if not len(ids):
        return kind, moves, None
    writes = writes.reshape(-1, 3)
    tables.apply(writes, values)
    # Only rank 0 knows where the placeholders' tokens lie in its last draws: it broadcasts them.
    inputs = StepInputs(ids, positions, slots, tables.table[rows, :width], lens, starts, sample_rows.tolist(),
                        bool(is_decode), placeholders, np.empty(0, dtype=np.int64))
    return kind, moves, inputs


def _padded(nbytes: int) -> int:
    return -(-nbytes // 8) * 8


class ControlChannel:
    """Rank 0 broadcasts, every other rank receives, over the CPU (gloo) group.

    A message travels in one broadcast of a frame whose size every rank derives from the previous
    message (the next power of two above it), so consecutive steps of similar size - the common case -
    cost one broadcast; a longer message sends its remainder in a second broadcast whose size the
    frame's length prefix gives. A lock keeps rank 0's keepalive thread and step messages in order.
    """

    MIN_FRAME = 1024

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.frame_bytes = self.MIN_FRAME
        self.last_send = time.monotonic()
        self._lock = threading.Lock()

    def send(self, message: np.ndarray) -> None:
        with self._lock:
            frame = np.zeros(self.frame_bytes, dtype=np.uint8)
            frame[:8].view(np.int64)[0] = len(message)
            head = min(len(message), self.frame_bytes - 8)
            frame[8 : 8 + head] = message[:head]
            dist.broadcast(torch.from_numpy(frame), src=0, group=self.group)
            if head < len(message):
                dist.broadcast(torch.from_numpy(np.ascontiguousarray(message[head:])), src=0, group=self.group)
            self._resize(len(message))
            self.last_send = time.monotonic()

    def recv(self) -> np.ndarray:
        frame = torch.empty(self.frame_bytes, dtype=torch.uint8)
        dist.broadcast(frame, src=0, group=self.group)
        length = int(frame[:8].view(torch.int64).item())
        message = frame[8 : 8 + length]
        if length > self.frame_bytes - 8:
            rest = torch.empty(length - (self.frame_bytes - 8), dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.group)
            message = torch.cat([message, rest])
        self._resize(length)
        return message.numpy()

    def _resize(self, length: int) -> None:
        self.frame_bytes = max(self.MIN_FRAME, 1 << (length + 8).bit_length())

"""The host side of a decode graph's inputs (no GPU needed): padding rows are always clean."""

from __future__ import annotations

import numpy as np
import torch

from streampage.runner.cuda_graphs import DecodeBuffers, graph_buckets, stage_decode_rows


def test_buckets_cover_every_batch_size_up_to_the_maximum():
    assert graph_buckets(256)[:5] == [1, 2, 4, 8, 16] and graph_buckets(256)[-1] == 256
    assert graph_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_buckets(1) == [1]


def test_padding_rows_never_keep_a_stale_placeholder():
    tokens = np.zeros((3, 8), dtype=np.int64)
    lens = np.zeros(8, dtype=np.int32)
    # A step of 6 rows whose inputs are placeholders (-1: the device fills them in)...
    stage_decode_rows(tokens, lens, np.full(6, -1), np.arange(6) + 40, np.arange(6) + 100, np.full(6, 41), 8)
    # ...then a step of 3 rows padded to the same bucket of 8.
    stage_decode_rows(tokens, lens, np.array([5, 6, 7]), np.array([9, 9, 9]), np.array([1, 2, 3]),
                      np.array([10, 10, 10]), 8)
    assert tokens[0].tolist() == [5, 6, 7, 0, 0, 0, 0, 0]  # ids the embedding can read
    assert tokens[1, 3:].tolist() == [0] * 5
    assert tokens[2].tolist() == [1, 2, 3, -1, -1, -1, -1, -1]  # padding writes nowhere
    assert lens.tolist() == [10, 10, 10, 0, 0, 0, 0, 0]  # ... and attends to nothing


def test_longest_first_stages_the_rows_by_context_length_with_padding_last():
    """Decode graphs with `decode_longest_first`: each step writes the rows' launch order, longest
    first, ties in row order, padding rows (context 0) after every real row; the graphs read it
    through the attention metadata."""
    buffers = DecodeBuffers.allocate(8, 4, torch.device("cpu"), longest_first=True)
    tables = np.zeros((3, 4), dtype=np.int32)
    buffers.load(np.array([1, 2, 3]), np.array([4, 39, 16]), np.array([0, 1, 2]), np.array([5, 40, 17]),
                 tables, bucket=4)
    assert buffers.row_order[:4].tolist() == [1, 2, 0, 3]
    assert buffers.metadata(4, decode_splits=1).decode_row_order.tolist() == [1, 2, 0, 3]
    buffers.load(np.array([1, 2]), np.array([8, 8]), np.array([0, 1]), np.array([9, 9]), tables[:2], bucket=2)
    assert buffers.row_order[:2].tolist() == [0, 1]
    assert DecodeBuffers.allocate(8, 4, torch.device("cpu")).metadata(4, 1).decode_row_order is None

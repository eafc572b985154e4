"""CUDA graphs for mixed steps (prompt chunks beside decode rows) of up to `max_tokens` tokens.

Run eagerly, such a step launches some 150 kernels from Python, each costing the host tens of
microseconds, for a few milliseconds of host time against a fraction of that on the device: under
load, when prompts keep arriving, most steps are mixed and the host sets the pace. Each token bucket
(32, 64, 128, 256, 512, then every 512 up to max_tokens) has one graph. A step of T tokens over S
sequences pads to the smallest bucket >= T and to `max_seqs` sequences:

- padding tokens read token 0 at position 0, write nowhere (slot -1) and belong to no chunk, so
  attention never computes them (their rows hold garbage that no real row reads);
- padding sequences have empty chunks and context 0: `paged_prefill`'s launch depends only on the
  tensors' shapes, and their programs exit at once;
- the sampled rows' last tokens are gathered by a device index buffer, and the LM head runs on
  min(bucket, max_seqs) rows (a step has at least a token per sequence).

Inputs are staged like the decode graphs' (`cuda_graphs.DecodeBuffers`): pinned host mirrors, a few
asynchronous copies, the block tables packed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from streampage.model.forward_context import AttentionMetadata, forward_context
from streampage.model.llama import LlamaForCausalLM
from streampage.runner.cuda_graphs import capture_buckets, copy_block_tables


def token_buckets(max_tokens: int) -> list[int]:
    """32, 64, 128, 256, 512, then every 512 tokens, below max_tokens; then max_tokens itself. Past 512
    a step's prompt tokens dominate its device time, and doubling buckets would pad a 1,100-token step
    to 2,048 (nearly twice the work); 512-token steps pad it by less than half."""
    buckets, size = [], 32
    while size < max_tokens:
        buckets.append(size)
        size = size * 2 if size < 512 else size + 512
    return [*buckets, max_tokens]


@dataclass
class MixedBuffers:
    """The graphs' static inputs on the device and their pinned host mirrors."""

    token_rows: torch.Tensor  # [3, max_tokens] int64: input ids, positions, slot mapping
    seq_rows: torch.Tensor  # [3, max_seqs + 1] int32: context lengths, query starts, sampled rows' last tokens
    block_tables: torch.Tensor  # [max_seqs, max_blocks_per_seq] int32
    block_tables_packed: torch.Tensor  # this step's [rows, width] tables, packed
    host_token_rows: torch.Tensor
    host_seq_rows: torch.Tensor
    host_block_tables: torch.Tensor
    logits: torch.Tensor | None = None  # [rows of the largest bucket, vocab], written by the graphs

    @classmethod
    def allocate(cls, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device) -> MixedBuffers:
        def pinned(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=device.type == "cuda")  # CPU: tests

        token_rows = torch.zeros((3, max_tokens), dtype=torch.int64, device=device)
        token_rows[2] = -1
        return cls(
            token_rows, torch.zeros((3, max_seqs + 1), dtype=torch.int32, device=device),
            torch.zeros((max_seqs, max_blocks), dtype=torch.int32, device=device),
            torch.zeros(max_seqs * max_blocks, dtype=torch.int32, device=device),
            pinned(3, max_tokens), pinned(3, max_seqs + 1, dtype=torch.int32),
            pinned(max_seqs * max_blocks, dtype=torch.int32),
        )

    @property
    def max_seqs(self) -> int:
        return self.seq_rows.shape[1] - 1

    @property
    def context_lens(self) -> torch.Tensor:
        return self.seq_rows[0, :-1]  # the kernels' int32 lengths, a contiguous row of seq_rows

    @property
    def query_start_loc(self) -> torch.Tensor:
        return self.seq_rows[1]

    @property
    def last_tokens(self) -> torch.Tensor:
        return self.seq_rows[2, :-1]

    def load(self, input_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray,
             context_lens: np.ndarray, query_start_loc: np.ndarray, last_tokens: np.ndarray,
             block_tables: np.ndarray, bucket: int) -> None:
        """Copy one step's inputs in: tokens up to the bucket, every one of max_seqs sequence rows."""
        stage_mixed_rows(self.host_token_rows.numpy(), self.host_seq_rows.numpy(), input_ids, positions,
                         slot_mapping, context_lens, query_start_loc, last_tokens, bucket)
        # Whole rows: a strided pinned source would be staged through pageable memory, waiting for the device.
        self.token_rows.copy_(self.host_token_rows, non_blocking=True)
        self.seq_rows.copy_(self.host_seq_rows, non_blocking=True)
        copy_block_tables(block_tables, self.host_block_tables, self.block_tables_packed, self.block_tables)


def stage_mixed_rows(tokens: np.ndarray, seqs: np.ndarray, input_ids: np.ndarray, positions: np.ndarray,
                     slot_mapping: np.ndarray, context_lens: np.ndarray, query_start_loc: np.ndarray,
                     last_tokens: np.ndarray, bucket: int) -> None:
    """Fill the host mirrors of one mixed step: `tokens` [3, max_tokens] (input ids, positions, slots)
    up to the bucket, and `seqs` [3, max_seqs + 1] (context lengths, query start offsets, the sampled
    rows' last-token indices). Padding tokens read token 0 at position 0 and write nowhere; padding
    sequences have context 0 and empty chunks at the end of the tokens; unused last-token indices
    gather token 0. Every padding field is rewritten each step (a stale placeholder id would index out
    of bounds inside the graph)."""
    num_tokens, num_seqs, num_sampled = len(input_ids), len(context_lens), len(last_tokens)
    tokens[0, :num_tokens], tokens[1, :num_tokens], tokens[2, :num_tokens] = input_ids, positions, slot_mapping
    tokens[0:2, num_tokens:bucket] = 0
    tokens[2, num_tokens:bucket] = -1
    seqs[0, :num_seqs], seqs[0, num_seqs:] = context_lens, 0
    seqs[1, : num_seqs + 1], seqs[1, num_seqs + 1 :] = query_start_loc, num_tokens
    seqs[2, :num_sampled], seqs[2, num_sampled:] = last_tokens, 0


def padded_forward(model: LlamaForCausalLM, buffers: MixedBuffers, bucket: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """What a mixed-step graph records: the model over the bucket's tokens and its sequence rows, then
    the LM head on each sequence row's gathered last token -> [rows, vocab] (into `out`'s first rows
    when given). A step has at least one token per sequence, so a bucket of T tokens needs at most
    min(T, max_seqs) rows: small buckets launch fewer attention programs and LM-head rows."""
    b = buffers
    rows = min(bucket, b.max_seqs)
    metadata = AttentionMetadata(b.token_rows[2, :bucket], b.block_tables[:rows], b.context_lens[:rows],
                                 b.query_start_loc[: rows + 1], is_decode=False)
    with forward_context(metadata):
        hidden = model(b.token_rows[0, :bucket], b.token_rows[1, :bucket])
    return model.compute_logits(hidden[b.last_tokens[:rows]], None if out is None else out[:rows])


class MixedGraphs:
    def __init__(self, model: LlamaForCausalLM, max_tokens: int, max_seqs: int, max_blocks_per_seq: int,
                 device: torch.device) -> None:
        self.model = model
        self.buckets = token_buckets(max_tokens)
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.buffers = MixedBuffers.allocate(max_tokens, max_seqs, max_blocks_per_seq, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._bucket_of = np.searchsorted(np.array(self.buckets), np.arange(max_tokens + 1))
        self._pinned_free = torch.cuda.Event()  # as in DecodeGraphs: the mirrors' last copies are done

    def capture(self, pool: tuple) -> None:
        """Every bucket, largest first, into `pool` (shared with the decode graphs: no two replay at once)."""
        self.graphs, self.buffers.logits = capture_buckets(
            self.buckets, lambda bucket, out: padded_forward(self.model, self.buffers, bucket, out), pool,
            "mixed-step")

    def fits(self, num_tokens: int, num_seqs: int) -> bool:
        """Whether a graph holds the step: its tokens within the largest bucket and its sequences
        within that bucket's rows (every row has a token, so they always are)."""
        if not self.graphs or num_tokens > self.max_tokens:
            return False
        return num_seqs <= min(self.buckets[self._bucket_of[num_tokens]], self.max_seqs)

    def run(self, input_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray, context_lens: np.ndarray,
            query_start_loc: np.ndarray, last_tokens: np.ndarray, block_tables: np.ndarray,
            fix_input_ids: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Replay the bucket's graph for one mixed step; logits [len(last_tokens), vocab], one row per
        sampled row. `fix_input_ids` may rewrite the device input ids first (placeholders)."""
        num_tokens = len(input_ids)
        bucket = self.buckets[self._bucket_of[num_tokens]]
        self._pinned_free.synchronize()
        self.buffers.load(input_ids, positions, slot_mapping, context_lens, query_start_loc, last_tokens,
                          block_tables, bucket)
        self._pinned_free.record()
        fix_input_ids(self.buffers.token_rows[0, :num_tokens])
        self.graphs[bucket].replay()
        assert self.buffers.logits is not None
        return self.buffers.logits[: len(last_tokens)]

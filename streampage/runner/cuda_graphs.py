"""CUDA graphs for decode-only steps, one per batch-size bucket, the LM head inside.

A decode step of B sequences pads to the smallest bucket >= B and replays that bucket's graph. Every
graph reads the same static input buffers (views of their first `bucket` rows) and writes the same
logits buffer, so a replay needs only small host-to-device copies of the step's inputs. Padding rows
write nowhere (slot -1) and attend to nothing (context length 0). Graphs are captured largest first
into one shared memory pool, after one eager run per bucket has compiled every kernel variant.
Nothing per-step is a Python scalar inside a graph: kernels read lengths and tables from the buffers,
and their grids depend only on the bucket and the block table's fixed width.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from streampage.model.forward_context import AttentionMetadata, forward_context
from streampage.model.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


def graph_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch (which is always a bucket)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch]
    buckets += list(range(16, max_batch, 16))
    return [*buckets, max_batch]


@dataclass
class DecodeBuffers:
    input_ids: torch.Tensor  # [max_batch] int64
    positions: torch.Tensor  # [max_batch] int64
    slot_mapping: torch.Tensor  # [max_batch] int64
    context_lens: torch.Tensor  # [max_batch] int32
    block_tables: torch.Tensor  # [max_batch, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor  # arange(max_batch + 1) int32: one token per row
    logits: torch.Tensor | None = None  # [max_batch, vocab] float32, written by the graphs

    @classmethod
    def allocate(cls, max_batch: int, max_blocks: int, device: torch.device) -> DecodeBuffers:
        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(zeros(max_batch, dtype=torch.int64), zeros(max_batch, dtype=torch.int64),
                   torch.full((max_batch,), -1, dtype=torch.int64, device=device),
                   zeros(max_batch, dtype=torch.int32), zeros(max_batch, max_blocks, dtype=torch.int32),
                   torch.arange(max_batch + 1, dtype=torch.int32, device=device))

    def metadata(self, bucket: int) -> AttentionMetadata:
        return AttentionMetadata(self.slot_mapping[:bucket], self.block_tables[:bucket], self.context_lens[:bucket],
                                 self.query_start_loc[: bucket + 1], max_query_len=1, is_decode=True)


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, max_batch: int, max_blocks_per_seq: int,
                 device: torch.device) -> None:
        self.model = model
        self.buckets = graph_buckets(max_batch)
        self.max_batch = max_batch
        self.buffers = DecodeBuffers.allocate(max_batch, max_blocks_per_seq, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._bucket_of = np.searchsorted(np.array(self.buckets), np.arange(max_batch + 1))

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        free_before = torch.cuda.mem_get_info()[0]
        for bucket in tqdm(list(reversed(self.buckets)), desc="capturing CUDA graphs", unit="graph"):
            self._forward(bucket)  # compile and load every kernel variant outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(bucket)
            if self.buffers.logits is None:  # the largest bucket allocates; the others write into it
                self.buffers.logits = logits
            self.graphs[bucket] = graph
        torch.cuda.synchronize()
        log.info("captured %d decode graphs (batch %d..%d) in %.0f MiB", len(self.graphs), self.buckets[0],
                 self.buckets[-1], (free_before - torch.cuda.mem_get_info()[0]) / (1 << 20))

    def _forward(self, bucket: int) -> torch.Tensor:
        b = self.buffers
        with forward_context(b.metadata(bucket)):
            hidden = self.model(b.input_ids[:bucket], b.positions[:bucket])
        logits = self.model.compute_logits(hidden)
        if b.logits is not None:
            b.logits[:bucket].copy_(logits)
            return b.logits[:bucket]
        return logits

    def fits(self, batch: int) -> bool:
        return batch <= self.max_batch and bool(self.graphs)

    def run(self, input_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray, context_lens: np.ndarray,
            block_tables: np.ndarray) -> torch.Tensor:
        """Replay the bucket's graph for a decode step of len(input_ids) rows; logits [rows, vocab]."""
        rows = len(input_ids)
        bucket = self.buckets[self._bucket_of[rows]]
        b = self.buffers
        _copy(b.input_ids[:rows], input_ids)
        _copy(b.positions[:rows], positions)
        _copy(b.slot_mapping[:rows], slot_mapping)
        _copy(b.context_lens[:rows], context_lens)
        _copy(b.block_tables[:rows, : block_tables.shape[1]], block_tables)
        if bucket > rows:  # padding rows: write nowhere, attend to nothing
            b.slot_mapping[rows:bucket].fill_(-1)
            b.context_lens[rows:bucket].zero_()
        self.graphs[bucket].replay()
        assert b.logits is not None
        return b.logits[:rows]


def _copy(dst: torch.Tensor, src: np.ndarray) -> None:
    dst.copy_(torch.from_numpy(src), non_blocking=True)

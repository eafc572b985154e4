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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from streampage import kernels
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
    """The graphs' static inputs on the device, and pinned host mirrors to fill them from in a few
    asynchronous copies (pageable copies would each block on the device)."""

    token_rows: torch.Tensor  # [3, max_batch] int64: input ids, positions, slot mapping
    context_lens: torch.Tensor  # [max_batch] int32
    block_tables: torch.Tensor  # [max_batch, max_blocks_per_seq] int32 (read up to each context)
    block_tables_packed: torch.Tensor  # [max_batch * max_blocks_per_seq] int32: this step's [rows, width]
    query_start_loc: torch.Tensor  # arange(max_batch + 1) int32: one token per row
    host_token_rows: torch.Tensor  # pinned mirrors of the above
    host_context_lens: torch.Tensor
    host_block_tables: torch.Tensor
    logits: torch.Tensor | None = None  # [max_batch, vocab] in the model's dtype, written by the graphs
    # With longest-first decode: [max_batch] int32, the rows by context length, longest first (the
    # attention kernel's launch order), and its pinned mirror.
    row_order: torch.Tensor | None = None
    host_row_order: torch.Tensor | None = None

    @classmethod
    def allocate(cls, max_batch: int, max_blocks: int, device: torch.device,
                 longest_first: bool = False) -> DecodeBuffers:
        token_rows = torch.zeros((3, max_batch), dtype=torch.int64, device=device)
        token_rows[2] = -1
        pin = device.type == "cuda"  # CPU: tests of the staging
        order = torch.arange(max_batch, dtype=torch.int32)
        return cls(
            token_rows, torch.zeros(max_batch, dtype=torch.int32, device=device),
            torch.zeros((max_batch, max_blocks), dtype=torch.int32, device=device),
            torch.zeros(max_batch * max_blocks, dtype=torch.int32, device=device),
            torch.arange(max_batch + 1, dtype=torch.int32, device=device),
            torch.zeros((3, max_batch), dtype=torch.int64, pin_memory=pin),
            torch.zeros(max_batch, dtype=torch.int32, pin_memory=pin),
            torch.zeros(max_batch * max_blocks, dtype=torch.int32, pin_memory=pin),
            row_order=order.to(device) if longest_first else None,
            host_row_order=(order.pin_memory() if pin else order.clone()) if longest_first else None,
        )

    @property
    def input_ids(self) -> torch.Tensor:
        return self.token_rows[0]

    @property
    def positions(self) -> torch.Tensor:
        return self.token_rows[1]

    def metadata(self, bucket: int, decode_splits: int) -> AttentionMetadata:
        return AttentionMetadata(self.token_rows[2, :bucket], self.block_tables[:bucket], self.context_lens[:bucket],
                                 self.query_start_loc[: bucket + 1], is_decode=True,
                                 decode_splits=decode_splits,
                                 decode_row_order=None if self.row_order is None else self.row_order[:bucket])

    def load(self, input_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray,
             context_lens: np.ndarray, block_tables: np.ndarray, bucket: int) -> None:
        """Copy one step's inputs in; rows past the step up to the bucket are padding."""
        stage_decode_rows(self.host_token_rows.numpy(), self.host_context_lens.numpy(), input_ids, positions,
                          slot_mapping, context_lens, bucket)
        # Whole rows: a contiguous pinned source keeps each copy asynchronous (a strided one is staged
        # through pageable memory, which waits for the device).
        self.token_rows.copy_(self.host_token_rows, non_blocking=True)
        self.context_lens.copy_(self.host_context_lens, non_blocking=True)
        if self.row_order is not None:
            assert self.host_row_order is not None
            order = self.host_row_order.numpy()
            # Stable: equal lengths keep their row order; padding rows (length 0) come last.
            order[:bucket] = np.argsort(-self.host_context_lens.numpy()[:bucket], kind="stable")
            self.row_order[:bucket].copy_(self.host_row_order[:bucket], non_blocking=True)
        copy_block_tables(block_tables, self.host_block_tables, self.block_tables_packed, self.block_tables)


def copy_block_tables(tables: np.ndarray, host: torch.Tensor, packed: torch.Tensor,
                      device_tables: torch.Tensor) -> None:
    """The step's [rows, width] tables into the top-left of `device_tables`, through a packed pinned
    mirror (`host`) and a packed device buffer (`packed`): one asynchronous copy of exactly the step's
    entries, then a device-side scatter into the wide layout."""
    rows, width = tables.shape
    host.numpy()[: rows * width] = tables.ravel()
    staged = packed[: rows * width]
    staged.copy_(host[: rows * width], non_blocking=True)
    device_tables[:rows, :width].copy_(staged.view(rows, width))


def stage_decode_rows(tokens: np.ndarray, lens: np.ndarray, input_ids: np.ndarray, positions: np.ndarray,
                      slot_mapping: np.ndarray, context_lens: np.ndarray, bucket: int) -> None:
    """Fill the host mirrors of one decode step: `tokens` [3, max_batch] (input ids, positions, slots)
    and `lens` [max_batch]. Padding rows up to the bucket read token 0 at position 0, write nowhere
    and attend to nothing. Every padding field is rewritten each step: a stale value, such as a
    placeholder id (-1) left by a larger earlier step, would index out of bounds inside the graph."""
    rows = len(input_ids)
    tokens[0, :rows], tokens[1, :rows], tokens[2, :rows] = input_ids, positions, slot_mapping
    tokens[0:2, rows:bucket] = 0
    tokens[2, rows:bucket] = -1
    lens[:rows], lens[rows:bucket] = context_lens, 0


@torch.inference_mode()
def capture_buckets(buckets: list[int], forward: Callable[[int, torch.Tensor | None], torch.Tensor], pool: tuple,
                    what: str) -> tuple[dict[int, torch.cuda.CUDAGraph], torch.Tensor]:
    """One graph of `forward(bucket, out)` per bucket, largest first, into `pool`. Each bucket runs once
    eagerly first, which compiles and loads every kernel variant outside the capture. The largest
    bucket's output is allocated inside its capture and becomes `out`, which the smaller ones write
    the first rows of. Returns the graphs and that shared output buffer."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    out: torch.Tensor | None = None
    free_before = torch.cuda.mem_get_info()[0]
    for bucket in tqdm(sorted(buckets, reverse=True), desc=f"capturing {what} graphs", unit="graph"):
        forward(bucket, out)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            result = forward(bucket, out)
        out = result if out is None else out
        graphs[bucket] = graph
    torch.cuda.synchronize()
    assert out is not None, "no buckets"
    log.info("captured %d %s graphs (%d..%d) in %.0f MiB", len(graphs), what, min(buckets), max(buckets),
             (free_before - torch.cuda.mem_get_info()[0]) / (1 << 20))
    return graphs, out


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, max_batch: int, max_blocks_per_seq: int,
                 device: torch.device, longest_first: bool = False) -> None:
        self.model = model
        self.buckets = graph_buckets(max_batch)
        self.max_batch = max_batch
        self.buffers = DecodeBuffers.allocate(max_batch, max_blocks_per_seq, device, longest_first)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._bucket_of = np.searchsorted(np.array(self.buckets), np.arange(max_batch + 1))
        kv_heads = model.attention_layers()[0].num_kv_heads
        self._splits = {b: kernels.graph_split_plan(b, kv_heads, kernels.num_sms(device)) for b in self.buckets}
        # Steps are queued ahead of the host, so the pinned mirrors may only be refilled once the
        # device has copied the previous step's inputs out of them.
        self._pinned_free = torch.cuda.Event()

    def capture(self, pool: tuple) -> None:
        """Every bucket, largest first, into `pool` (a memory pool the runner's graphs share)."""
        self.graphs, self.buffers.logits = capture_buckets(self.buckets, self._forward, pool, "decode")

    def _forward(self, bucket: int, out: torch.Tensor | None) -> torch.Tensor:
        b = self.buffers
        with forward_context(b.metadata(bucket, self._splits[bucket])):
            hidden = self.model(b.input_ids[:bucket], b.positions[:bucket])
        return self.model.compute_logits(hidden, None if out is None else out[:bucket])

    def fits(self, batch: int) -> bool:
        return batch <= self.max_batch and bool(self.graphs)

    def run(self, input_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray, context_lens: np.ndarray,
            block_tables: np.ndarray, fix_input_ids: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Replay the bucket's graph for a decode step of len(input_ids) rows; logits [rows, vocab].
        `fix_input_ids` may rewrite the device input ids before the replay (tokens still being sampled
        by the previous step)."""
        rows = len(input_ids)
        bucket = self.buckets[self._bucket_of[rows]]
        self._pinned_free.synchronize()  # the previous step's copies out of the pinned mirrors are done
        self.buffers.load(input_ids, positions, slot_mapping, context_lens, block_tables, bucket)
        self._pinned_free.record()
        fix_input_ids(self.buffers.input_ids[:rows])
        self.graphs[bucket].replay()
        assert self.buffers.logits is not None
        return self.buffers.logits[:rows]

"""One step on the device: the step's tensors, the model over the paged KV pool, sampling.

The scheduler's rows become one token batch on the host (`streampage.runner.step_inputs`); rows that
reach the end of their tokens are sampled. Decode-only batches may replay a CUDA graph
(`streampage.runner.cuda_graphs`), and so may mixed steps of few tokens when `mixed_graph_max_tokens`
is set (`streampage.runner.mixed_graphs`); everything else runs eagerly.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from streampage.model.forward_context import AttentionMetadata, forward_context
from streampage.model.llama import LlamaForCausalLM
from streampage.model.sampler import DeviceSample, SamplingMetadata, param_row, sample_on_device
from streampage.runner.cache_engine import BlockPairs, CacheEngine
from streampage.runner.cuda_graphs import DecodeGraphs
from streampage.runner.mixed_graphs import MixedGraphs
from streampage.runner.step_inputs import StepInputBuilder, StepInputs
from streampage.runner.step_types import RowResult

if TYPE_CHECKING:  # the runner reads the scheduler's rows; it never calls into the engine
    from streampage.engine.scheduler import SchedulerOutput


class CacheMoves(NamedTuple):
    """A step's block moves, run in this order before its forward."""

    swap_out: BlockPairs  # (gpu, cpu)
    swap_in: BlockPairs  # (cpu, gpu)
    copy: BlockPairs  # (src, dst) copy-on-write


@dataclass
class LaunchedStep:
    num_rows: int
    sample_rows: list[int]
    sampled: DeviceSample | None


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cache: CacheEngine, block_size: int, eos_token_ids: list[int],
                 device: torch.device, max_blocks_per_seq: int) -> None:
        self.model = model
        self.cache = cache
        self.eos_token_ids = list(eos_token_ids)
        self.device = device
        self.generators: dict[str, torch.Generator] = {}  # seeded requests' random streams
        self._requests: dict[str, _RequestSampling] = {}  # what each live request's rows always carry
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.inputs = StepInputBuilder(block_size, max_blocks_per_seq)
        self._metadata_key: list | None = None  # the rows' requests when the cached metadata was built
        self._metadata: SamplingMetadata | None = None
        self._prev_tokens = torch.empty(0, dtype=torch.int64, device=device)  # the last step's draws
        # Host seconds per phase, for benchmarks: "prepare", "launch" and "sample" (queueing the sampler)
        # in `launch`; "gpu_wait", blocked on the device for the sampled tokens, in `collect`.
        self.timing = dict.fromkeys(("prepare", "launch", "sample", "gpu_wait"), 0.0)
        model.bind_kv_cache(cache.gpu_pool)

    def capture_graphs(self, max_batch: int, mixed_max_tokens: int, max_seqs: int,
                       longest_first: bool = False) -> None:
        """Record decode steps of up to max_batch sequences as CUDA graphs (CUDA devices only), and with
        mixed_max_tokens, mixed steps of up to that many tokens over up to max_seqs sequences.
        longest_first: the decode graphs' attention takes rows longest first (`paged_decode`'s
        row_order)."""
        pool = torch.cuda.graph_pool_handle()  # one pool for all: no two graphs replay at once
        width = self.inputs.mirror.table.shape[1]
        self.graphs = DecodeGraphs(self.model, max_batch, width, self.device, longest_first)
        self.graphs.capture(pool)
        if mixed_max_tokens:
            self.mixed_graphs = MixedGraphs(self.model, mixed_max_tokens, max_seqs, width, self.device)
            self.mixed_graphs.capture(pool)

    def release_graphs(self) -> None:
        """Drop the CUDA graphs and their memory; later steps run eagerly. Tensor-parallel ranks call this
        before destroying their groups: NCCL tears a communicator down (destroy or abort) only once every
        graph that captured its kernels is gone, and waits forever otherwise."""
        if self.graphs is None and self.mixed_graphs is None:
            return  # nothing held (eager, or already released by an earlier tear-down step)
        self.graphs = self.mixed_graphs = None
        gc.collect()  # the graph objects go now, not whenever a reference cycle holding them is collected

    def execute(self, out: SchedulerOutput) -> list[RowResult | None]:
        return self.collect(self.launch(out))

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> LaunchedStep:
        """Queue one step on the device (cache moves, forward, sampling) without waiting for it."""
        for request_id in out.finished_request_ids:
            self.generators.pop(request_id, None)
            self._requests.pop(request_id, None)
        start = time.perf_counter()
        inputs = self.inputs.build(out) if out.seqs else None
        prepared = time.perf_counter()
        moves = CacheMoves(out.blocks_to_swap_out, out.blocks_to_swap_in, out.blocks_to_copy)
        logits = self.execute_step(moves, inputs)
        if inputs is None or logits is None:
            return LaunchedStep(0, [], None)
        launched = time.perf_counter()
        sampled = None
        if inputs.sample_rows:
            metadata = self._sampling_metadata(out, inputs.sample_rows)
            sampled = sample_on_device(logits, metadata)
            if max(metadata.num_samples) == 1:  # the next step may read these tokens as its inputs
                self._prev_tokens = sampled.tokens
                self.inputs.remember_sampled(out.seqs, inputs.sample_rows)
        timing = self.timing
        timing["prepare"] += prepared - start
        timing["launch"] += launched - prepared
        timing["sample"] += time.perf_counter() - launched
        return LaunchedStep(len(out.seqs), inputs.sample_rows, sampled)

    def collect(self, step: LaunchedStep) -> list[RowResult | None]:
        """Wait for a launched step and hand back what it sampled, per row."""
        results: list[RowResult | None] = [None] * step.num_rows
        if step.sampled is None:
            return results
        start = time.perf_counter()
        sampled = step.sampled.to_host()
        self.timing["gpu_wait"] += time.perf_counter() - start
        for i, row in enumerate(step.sample_rows):
            top = sampled.top_logprobs[i]
            results[row] = RowResult(sampled.token_ids[i], sampled.logprobs[i],
                                     None if top is None else (top.token_ids, top.logprobs))
        return results

    def execute_step(self, moves: CacheMoves, inputs: StepInputs | None) -> torch.Tensor | None:
        """The part of a step every tensor-parallel rank runs alike: the block moves, then the forward.
        Returns the sampled rows' logits, or None for a step without rows (swap-outs only)."""
        self.cache.swap_out(moves.swap_out)
        self.cache.swap_in(moves.swap_in)
        self.cache.copy(moves.copy)
        return None if inputs is None else self.forward(inputs)

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Logits of the sampled rows' last tokens, [len(sample_rows), vocab] in the model dtype."""
        if inputs.is_decode and self.graphs is not None and self.graphs.fits(len(inputs.input_ids)):
            # Every decode row samples, so the graph's logits rows are the sampled rows.
            return self.graphs.run(inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.context_lens,
                                   inputs.block_tables, lambda ids: self._fill_placeholders(ids, inputs))
        last_tokens = inputs.query_start_loc[1:][inputs.sample_rows].astype(np.int64) - 1
        mixed = self.mixed_graphs
        if not inputs.is_decode and mixed is not None and mixed.fits(len(inputs.input_ids), len(inputs.context_lens)):
            return mixed.run(inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.context_lens,
                             inputs.query_start_loc, last_tokens, inputs.block_tables,
                             lambda ids: self._fill_placeholders(ids, inputs))
        device = self.device
        metadata = AttentionMetadata(
            slot_mapping=_to(inputs.slot_mapping, device),
            block_tables=_to(inputs.block_tables, device),
            context_lens=_to(inputs.context_lens, device),
            query_start_loc=_to(inputs.query_start_loc, device),
            is_decode=inputs.is_decode,
        )
        input_ids = _to(inputs.input_ids, device)
        self._fill_placeholders(input_ids, inputs)
        with forward_context(metadata):
            hidden = self.model(input_ids, _to(inputs.positions, device))
        if not inputs.sample_rows:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        return self.model.compute_logits(hidden[_to(last_tokens, device)])

    def _fill_placeholders(self, input_ids: torch.Tensor, inputs: StepInputs) -> None:
        """Put the previous step's sampled tokens, still on the device, where this step reads them."""
        if len(inputs.placeholders):
            index = _to(inputs.placeholders, self.device)
            input_ids[index] = self._placeholder_tokens(inputs)

    def _placeholder_tokens(self, inputs: StepInputs) -> torch.Tensor:
        """The placeholders' tokens, in order (tensor-parallel ranks take rank 0's)."""
        return self._prev_tokens[_to(inputs.placeholder_sources, self.device)]

    def _sampling_metadata(self, out: SchedulerOutput, sample_rows: list[int]) -> SamplingMetadata:
        groups = out.groups if len(sample_rows) == len(out.groups) else [out.groups[r] for r in sample_rows]
        # Same requests as last step and nothing that changes per step (penalties read the outputs,
        # min_tokens bans expire, n > 1 draws n only once): the last metadata still holds.
        if groups == self._metadata_key and self._metadata is not None and _is_static(self._metadata):
            return self._metadata
        self._metadata_key = list(groups)
        self._metadata = self._build_metadata(out, sample_rows, groups)
        return self._metadata

    def _build_metadata(self, out: SchedulerOutput, sample_rows: list[int], groups: list) -> SamplingMetadata:
        # Rows of the same requests recur step after step while the batch's membership changes (rebuilt
        # at most steps of a serving load): what a request always brings is computed once.
        seqs = [out.seqs[r] for r in sample_rows]
        requests = [self._requests.get(g.request_id) or self._remember_request(g) for g in groups]
        penalised = any(r.penalised for r in requests)
        banned = [self._banned(g.params, s) if r.may_ban else []
                  for g, s, r in zip(groups, seqs, requests, strict=True)]
        generators = {i: self._generator(g.request_id, g.params.seed)
                      for i, (g, r) in enumerate(zip(groups, requests, strict=True)) if r.seeded}
        return SamplingMetadata.build(
            [g.params for g in groups], device=self.device,
            prompt_token_ids=[g.prompt_token_ids for g in groups] if penalised else (),
            output_token_ids=[s.output_token_ids for s in seqs] if penalised else (),
            banned_token_ids=banned if any(banned) else (),
            generators=generators,
            num_samples=[g.num_samples() if r.parallel else 1 for g, r in zip(groups, requests, strict=True)],
            num_logprobs=[r.num_logprobs for r in requests],
            param_rows=[r.param_row for r in requests],
        )

    def _remember_request(self, group) -> _RequestSampling:
        p = group.params
        request = _RequestSampling(
            param_row=param_row(p), num_logprobs=group.num_logprobs(len(self.eos_token_ids)),
            penalised=bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0),
            may_ban=p.min_tokens > 0, seeded=p.seed is not None, parallel=p.n > 1)
        self._requests[group.request_id] = request
        return request

    def _banned(self, params, seq) -> list[int]:
        """EOS and stop tokens are banned until min_tokens outputs exist."""
        if seq.num_output_tokens >= params.min_tokens:
            return []
        return [*([] if params.ignore_eos else self.eos_token_ids), *params.stop_token_ids]

    def _generator(self, request_id: str, seed: int) -> torch.Generator:
        generator = self.generators.get(request_id)
        if generator is None:
            generator = self.generators[request_id] = torch.Generator(device=self.device)
            generator.manual_seed(seed)
        return generator


class _RequestSampling(NamedTuple):
    """What a request's rows bring to every step's sampling metadata, fixed for its lifetime."""

    param_row: bytes  # its row of the parameter table (`sampler.param_row`)
    num_logprobs: int
    penalised: bool
    may_ban: bool  # min_tokens > 0: EOS and stop tokens are banned for its first outputs
    seeded: bool
    parallel: bool  # n > 1: the first draw takes n tokens


def _is_static(metadata: SamplingMetadata) -> bool:
    return not metadata.penalty_rows and not metadata.banned_rows and max(metadata.num_samples, default=1) == 1


def _to(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor

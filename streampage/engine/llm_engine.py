"""The engine core: `step()` = schedule -> execute -> process outputs; add and abort requests.

It is pure logic over an `Executor` (the model runner, or a simulation in benchmarks and tests), and
returns per-step `RequestDelta`s: the tokens each request gained, and how it ended. Text is the
front end's business (detokenization and stop strings run there), so the core never touches strings.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from streampage.config import ConfigError, EngineConfig
from streampage.engine import beam_search
from streampage.engine.kv_cache import KVCacheManager
from streampage.engine.limits import RequestLimits
from streampage.engine.request import PLACEHOLDER, SeqStatus, Sequence, SequenceGroup
from streampage.engine.scheduler import Scheduler, SchedulerOutput
from streampage.outputs import EngineStats, TokenLogprobs
from streampage.runner.step_types import RowResult
from streampage.runner.tp_executor import TensorParallelExecutor
from streampage.runner.worker import Worker, WorkerInfo, resolve_device
from streampage.sampling_params import SamplingParams


class Executor(Protocol):
    def launch(self, out: SchedulerOutput) -> Any:
        """Queue one step (it may still be running on return); returns a handle for `collect`."""
        ...

    def collect(self, launched: Any) -> list[RowResult | None]:
        """Wait for a launched step: one result per row that reached the end of its tokens."""
        ...


@dataclass(slots=True)
class SeqDelta:
    index: int  # the choice index (for beam search: rank among the returned hypotheses)
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    cumulative_logprob: float
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass(slots=True)
class RequestDelta:
    """What one request gained in one step (or how it ended)."""

    request_id: str
    seqs: list[SeqDelta] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None


WARM_UP_SEQS = 17  # one past paged_prefill's first variant (kernels/paged_attention.py, _seqs_pad)


def _shutdown(executor: Executor) -> None:
    """Stop an executor's processes, if it has any (tensor parallelism)."""
    shutdown = getattr(executor, "shutdown", None)
    if shutdown is not None:
        shutdown()


class LLMEngine:
    def __init__(
        self, config: EngineConfig, executor: Executor, *, num_gpu_blocks: int, num_cpu_blocks: int,
        max_model_len: int, eos_token_ids: list[int], vocab_size: int,
    ) -> None:
        cache = config.cache
        sched = config.scheduler
        if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < max_model_len:
            raise ConfigError(f"without chunked prefill max_num_batched_tokens ({sched.max_num_batched_tokens}) "
                              f"must be >= max_model_len ({max_model_len}): a whole prompt must fit one step")
        self.config = config
        self.executor = executor
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.vocab_size = vocab_size
        self.kv = KVCacheManager(num_gpu_blocks, num_cpu_blocks, cache.block_size,
                                 cache.enable_prefix_caching, cache.watermark)
        self.scheduler = Scheduler(config.scheduler, self.kv, max_model_len)
        self.limits = RequestLimits(max_model_len, vocab_size, num_gpu_blocks, cache.block_size,
                                    sched.max_num_batched_tokens, sched.enable_chunked_prefill, num_cpu_blocks,
                                    recompute_groups=sched.preemption_mode == "recompute")
        self._pending: list[RequestDelta] = []  # endings decided between steps (aborts)
        self.async_scheduling = sched.async_scheduling
        self._inflight: tuple[SchedulerOutput, Any] | None = None  # launched, not yet processed
        # Live requests whose steps may need their tokens on the host before the next schedule.
        self._host_bound: set[str] = set()
        self._finished_ids: list[str] = []  # for the runner to drop per-request state
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.cached_prompt_tokens_total = 0
        self.steps_total = 0
        self.timing = dict.fromkeys(("schedule", "execute", "process"), 0.0)  # seconds, for benchmarks

    @classmethod
    def from_config(cls, config: EngineConfig) -> tuple[LLMEngine, WorkerInfo]:
        """Load the model and size the pool: in this process at tensor_parallel_size 1, else with this
        process as rank 0 of a tensor-parallel group (`runner/tp_executor.py`)."""
        tp = config.parallel.tensor_parallel_size
        executor = Worker(config) if tp == 1 else TensorParallelExecutor(config)
        info = executor.load()
        config = config.with_max_model_len(info.max_model_len)
        try:
            engine = cls(config, executor, num_gpu_blocks=info.num_gpu_blocks, num_cpu_blocks=info.num_cpu_blocks,
                         max_model_len=info.max_model_len, eos_token_ids=info.eos_token_ids,
                         vocab_size=info.vocab_size)
            if resolve_device(config.model.device).type == "cuda":
                engine.warm_up()
        except Exception:
            _shutdown(executor)
            raise
        freeze_long_lived_objects()
        return engine, info

    def warm_up(self) -> None:
        """Run tiny requests down the eager paths a first real step can take, so that their Triton
        kernel variants are built now and not inside the first requests' time to first token (a
        compile costs about a second): a greedy batch of one sequence, then a sampled batch past 16
        sequences (`paged_prefill` has one variant up to 16 and one up to 256). The decode graphs were
        built at capture. Leaves nothing behind: prompts shorter than a block put nothing in the
        prefix cache, every block is freed, and the counters start from zero."""
        if self.max_model_len < 3:  # no room for a prompt and two tokens: nothing realistic to warm
            return
        # Unseeded: a seeded request takes the PyTorch sampling pipeline, not the Triton sampler.
        sampled = SamplingParams(max_tokens=2, temperature=1.0, ignore_eos=True)
        batches = [[SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)],
                   [sampled] * min(WARM_UP_SEQS, self.config.scheduler.max_num_seqs)]
        prompt = [1] * max(1, min(self.kv.block_size, self.max_model_len) - 3)  # with 2 tokens out: no full block
        for b, batch in enumerate(batches):
            for i, params in enumerate(batch):
                self.add_request(f"streampage-warm-up-{b}-{i}", prompt, params)
            while self.has_unfinished_requests():
                self.step()
        self.prompt_tokens_total = self.generation_tokens_total = self.cached_prompt_tokens_total = 0
        self.steps_total = self.scheduler.num_preemptions = 0
        self.timing = dict.fromkeys(self.timing, 0.0)

    # Executors with processes of their own (tensor parallelism) also have shutdown() and check_health().

    def shutdown(self) -> None:
        """Release what the executor holds outside this process; idempotent."""
        _shutdown(self.executor)

    def check_health(self) -> None:
        """Raise if the executor can no longer run steps (a tensor-parallel rank died or hung)."""
        check = getattr(self.executor, "check_health", None)
        if check is not None:
            check()

    # ---- requests ----------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request, or raise RequestRejected if it can never run."""
        self.check_request(prompt_token_ids, params)
        group = SequenceGroup(request_id, list(prompt_token_ids), params,
                              time.monotonic() if arrival_time is None else arrival_time)
        if params.logprobs is not None:
            for seq in group.seqs:
                seq.logprobs = []
        self.scheduler.add(group)
        if _needs_host_between_steps(params):
            self._host_bound.add(request_id)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Refuse what can never run, naming the limit (RequestRejected)."""
        self.limits.check(prompt_token_ids, params)

    def abort_request(self, request_id: str) -> bool:
        """End a request now and free its blocks; its final delta comes with the next step."""
        group = self.scheduler.abort(request_id)
        if group is None:
            return False
        self._host_bound.discard(request_id)
        delta = self._delta(group)
        delta.finished = True
        delta.seqs = [SeqDelta(i, [], None, s.cumulative_logprob, "abort") for i, s in enumerate(group.seqs)
                      if s.finish_reason == "abort"]
        self._pending.append(delta)
        self._finished_ids.append(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._pending) or self._inflight is not None

    # ---- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestDelta]:
        """Schedule and launch the next step, then finish the previous one.

        With async scheduling the host schedules step t+1 and queues it on the device before it
        reads step t's tokens: a sequence sampling in step t carries a placeholder token (PLACEHOLDER)
        that step t+1 reads straight from the device, and that `_process` fills in afterwards. A
        sequence that step t ends (EOS, a stop token) wastes its row in step t+1, whose result is
        dropped; lengths are known ahead, so length limits waste nothing. Steps whose results decide
        the next batch on the host (beam search, forks of n > 1, penalties) are finished at once.
        """
        start = time.perf_counter()
        deltas, self._pending = self._pending, []
        out = self.scheduler.schedule()
        scheduled = time.perf_counter()
        launched = None
        if not out.is_empty:  # an empty step reaches no runner: finished ids wait for the next one
            out.finished_request_ids, self._finished_ids = self._finished_ids, []
            out.rewritten_seq_ids, out.dropped_seq_ids = self.kv.take_table_changes()
            launched = self.executor.launch(out)
            self._mark_launched(out)
            self.steps_total += 1
        executed = time.perf_counter()
        previous, self._inflight = self._inflight, None
        if previous is not None:
            deltas += self._process(previous[0], self.executor.collect(previous[1]))
        if launched is not None:
            if self.async_scheduling and not (self._host_bound and _decides_next_batch(out)):
                self._inflight = (out, launched)
            else:
                deltas += self._process(out, self.executor.collect(launched))
        timing = self.timing
        timing["schedule"] += scheduled - start
        timing["execute"] += executed - scheduled
        timing["process"] += time.perf_counter() - executed
        return deltas

    def _mark_launched(self, out: SchedulerOutput) -> None:
        """The launched rows' tokens are computed; each sampling row gains a placeholder token."""
        indices = out.sample_indices
        for seq, n in zip(out.seqs, out.num_new_tokens, strict=True):
            tokens = seq.token_ids
            computed = seq.num_computed_tokens + n
            seq.num_computed_tokens = computed
            if computed == len(tokens):
                indices.append(computed)
                tokens.append(PLACEHOLDER)
            else:
                indices.append(-1)

    def _process(self, out: SchedulerOutput, results: list[RowResult | None]) -> list[RequestDelta]:
        now = time.monotonic()
        kv, block_size = self.kv, self.kv.block_size
        touched: dict[str, tuple[SequenceGroup, RequestDelta]] = {}
        beam_rows: dict[str, list[tuple[Sequence, RowResult]]] = {}
        rows = zip(out.seqs, out.groups, out.num_new_tokens, out.sample_indices, results, strict=True)
        finished, record = SeqStatus.FINISHED, self._record  # locals: this loop runs once per row
        for seq, group, n, index, result in rows:
            if seq.status is finished:
                continue  # ended (EOS, abort) while this step was in flight: its row is moot
            if result is not None:
                entry = touched.get(group.request_id)
                if entry is None:
                    entry = touched[group.request_id] = (group, self._delta(group))
                    if group.first_token_time is None:
                        self._count_prompt(group)
                if group.params.use_beam_search:
                    del seq.token_ids[index:]  # beams are re-seated from the candidates
                    beam_rows.setdefault(group.request_id, []).append((seq, result))
                elif seq.logprobs is None and len(result.token_ids) == 1:  # the common case, inline
                    token = result.token_ids[0]
                    record(seq, group.params, index, token, result.logprobs[0])
                    choice = 0 if group.seqs[0] is seq else group.seqs.index(seq)
                    entry[1].seqs.append(SeqDelta(choice, [token], None, seq.cumulative_logprob,
                                                  seq.finish_reason, seq.stop_reason))
                else:
                    self._append_sampled(group, seq, index, result, entry[1])
            # Only a step that filled a block has a prefix to record (one row in block_size when
            # decoding; commit_computed skips a sequence that just finished or holds no GPU blocks); a
            # block missed here, e.g. while the sequence was swapped out, is recorded with the next one.
            if seq.num_computed_tokens % block_size < n:
                kv.commit_computed(seq)
        for request_id, beam in beam_rows.items():
            group, delta = touched[request_id]
            self._beam_step(group, beam, delta)
        deltas = []
        for group, delta in touched.values():
            if group.first_token_time is None:
                group.first_token_time = delta.first_token_time = now
            seqs = group.seqs
            if seqs[0].status is finished if len(seqs) == 1 else all(s.status is finished for s in seqs):
                self._finish_group(group, delta)
            deltas.append(delta)
        return deltas

    def _count_prompt(self, group: SequenceGroup) -> None:
        self.prompt_tokens_total += group.num_prompt_tokens
        self.cached_prompt_tokens_total += group.num_cached_tokens

    def _append_sampled(self, group: SequenceGroup, seq: Sequence, index: int, result: RowResult,
                        delta: RequestDelta) -> None:
        """Fill a row's placeholder with its token; the first draw of an n > 1 request forks the
        other choices (that step is never in flight, so the placeholder is the last token)."""
        if len(result.token_ids) > 1:  # parallel sampling: children share the prompt's blocks
            targets = [seq]
            for _ in result.token_ids[1:]:
                child = seq.fork()
                self.kv.fork(seq, child)
                group.seqs.append(child)
                targets.append(child)
        else:
            targets = (seq,)
        top = result.top_logprobs
        for target, token, logprob in zip(targets, result.token_ids, result.logprobs, strict=True):
            entry = None
            if target.logprobs is not None:
                entry = dict(zip(*top, strict=True)) if top is not None else {}
                entry[token] = logprob
                target.logprobs.append(entry)
            self._record(target, group.params, index, token, logprob)
            choice = 0 if group.seqs[0] is target else group.seqs.index(target)
            delta.seqs.append(SeqDelta(choice, [token], None if entry is None else [entry],
                                       target.cumulative_logprob, target.finish_reason, target.stop_reason))

    def _record(self, seq: Sequence, params: SamplingParams, index: int, token: int, logprob: float) -> None:
        """Put a sampled token at `index` (its placeholder) and end the sequence if it is done,
        dropping any placeholder a later in-flight step added."""
        tokens = seq.token_ids
        tokens[index] = token
        seq.cumulative_logprob += logprob
        self.generation_tokens_total += 1
        num_output = index + 1 - seq.num_prompt_tokens
        reason: tuple[str, int | None] | None = None
        if num_output >= params.min_tokens:
            if token in self.eos_token_ids and not params.ignore_eos:
                reason = ("stop", None)
            elif token in params.stop_token_ids:
                reason = ("stop", token)
        if reason is None and (num_output >= params.max_tokens or index + 1 >= self.max_model_len):
            reason = ("length", None)
        if reason is not None:
            del tokens[index + 1 :]
            seq.finish_reason, seq.stop_reason = reason
            self.scheduler.finish_seq(seq)

    def _beam_step(self, group: SequenceGroup, rows: list[tuple[Sequence, RowResult]], delta: RequestDelta) -> None:
        params = group.params
        beams = [seq for seq, _ in rows]
        tops = [result.top_logprobs for _, result in rows]
        k = group.num_logprobs(len(self.eos_token_ids))
        candidates = beam_search.rank_candidates(beams, tops, k)  # type: ignore[arg-type]
        generated_len = beams[0].num_output_tokens + 1
        at_length = generated_len >= params.max_tokens or beams[0].num_tokens + 1 >= self.max_model_len
        for cand in candidates:
            if cand.token in self.eos_token_ids and not params.ignore_eos:
                cand.ends, cand.finish_reason = True, "stop"
            elif at_length:
                cand.ends, cand.finish_reason = True, "length"
        step = beam_search.advance(group, candidates, generated_len)
        self.generation_tokens_total += len(beams)
        if step.done:
            for seq in group.live_seqs():
                seq.finish_reason = "stop"
                self.scheduler.finish_seq(seq)
            self._emit_hypotheses(group, delta)
            return
        self._reseat_beams(group, step.next_beams)

    def _reseat_beams(self, group: SequenceGroup, chosen: list[beam_search.Candidate]) -> None:
        """Make the chosen continuations the live beams: a parent picked once continues in place,
        picked again it is forked first (sharing blocks), picked never it is freed."""
        used: set[int] = set()
        plan: list[tuple[Sequence, beam_search.Candidate]] = []
        for cand in chosen:
            parent = cand.parent
            if parent.seq_id in used:
                child = parent.fork()
                self.kv.fork(parent, child)
                plan.append((child, cand))
            else:
                used.add(parent.seq_id)
                plan.append((parent, cand))
        for seq in group.live_seqs():
            if seq.seq_id not in used:
                seq.finish_reason = "abort"  # a pruned beam, never reported
                self.scheduler.finish_seq(seq)
        for seq, cand in plan:
            seq.token_ids.append(cand.token)
            seq.cumulative_logprob = cand.score
            if seq.logprobs is not None:
                seq.logprobs.append({cand.token: cand.logprob})
        group.seqs = [seq for seq, _ in plan]

    def _emit_hypotheses(self, group: SequenceGroup, delta: RequestDelta) -> None:
        for index, hyp in enumerate(group.beam_hypotheses[: group.params.n]):
            delta.seqs.append(SeqDelta(index, hyp.token_ids, hyp.logprobs, hyp.cumulative_logprob,
                                       hyp.finish_reason, hyp.stop_reason))

    def _finish_group(self, group: SequenceGroup, delta: RequestDelta) -> None:
        self.scheduler.finish_group(group)
        self._host_bound.discard(group.request_id)
        delta.finished = True
        self._finished_ids.append(group.request_id)

    def _delta(self, group: SequenceGroup) -> RequestDelta:
        return RequestDelta(group.request_id, [], False, group.num_cached_tokens, group.first_scheduled_time,
                            group.first_token_time)

    # ---- state -------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        sched, gpu, cpu = self.scheduler, self.kv.gpu, self.kv.cpu
        return EngineStats(
            num_running=len(sched.running), num_waiting=len(sched.waiting), num_swapped=len(sched.swapped),
            kv_blocks_total=gpu.num_blocks, kv_blocks_used=gpu.num_used, kv_blocks_shared=gpu.num_shared,
            kv_blocks_cached=gpu.num_cached_free, kv_blocks_empty=gpu.num_free - gpu.num_cached_free,
            cpu_blocks_total=cpu.num_blocks, cpu_blocks_used=cpu.num_blocks - cpu.num_free,
            block_size=self.kv.block_size, num_preemptions_total=sched.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total, generation_tokens_total=self.generation_tokens_total,
            cached_prompt_tokens_total=self.cached_prompt_tokens_total, steps_total=self.steps_total,
        )

    def check_invariants(self) -> None:
        running = [s for g in self.scheduler.running for s in g.live_seqs()]
        swapped = [s for g in self.scheduler.swapped for s in g.live_seqs()]
        self.kv.check_invariants(running, swapped)


def freeze_long_lived_objects() -> None:
    """Move everything alive now (a loaded model, the block pool's per-block records, imported
    libraries, a tokenizer) out of the garbage collector's sight. They live as long as the process;
    left in view, every full collection walks them all, which stood an engine's step loop still for
    ~0.25 s every ~2 s at 256 streams. Call once loading is done."""
    gc.collect()
    gc.freeze()


def _has_penalties(params: SamplingParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty) or params.repetition_penalty != 1.0


def _needs_host_between_steps(params: SamplingParams) -> bool:
    """Beam search re-seats beams, n > 1 forks after its first draw, and penalties read the outputs:
    all need a step's tokens on the host before the next step is scheduled."""
    return params.use_beam_search or params.n > 1 or _has_penalties(params)


def _decides_next_batch(out: SchedulerOutput) -> bool:
    """Whether the host needs this step's tokens before it can schedule the next one."""
    for group in out.groups:
        params = group.params
        if params.use_beam_search or _has_penalties(params) or group.num_samples() > 1:
            return True
    return False

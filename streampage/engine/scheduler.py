"""Continuous batching: which sequences run in the next step, with how many tokens.

Each step has a token budget (`max_num_batched_tokens`) and a seat limit (`max_num_seqs`, counting a
request's full width: n choices or beam_width beams). Order of service:
1. running requests, oldest first: every decoding sequence gets its one token (their tokens are
   reserved up front), then unfinished prefills take chunks from what is left;
2. swapped-out requests come back, oldest first, when their blocks fit again;
3. waiting requests are admitted strictly FCFS (no overtaking, so nobody starves) with a prefix-cache
   lookup and a first prefill chunk - but never while any request is swapped out, which bounds the
   swap space by the GPU pool.
When a running sequence cannot get a block, the newest running request is preempted, all of its
sequences together: by recompute (free everything; prefill prompt + outputs again later) or by swap
(copy its blocks to CPU swap space, sharing kept). `schedule()` returns plain data; it calls nothing
in the runner.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from streampage.config import SchedulerConfig
from streampage.engine.kv_cache import BlockPair, KVCacheManager, PrefixHit
from streampage.engine.request import SeqStatus, Sequence, SequenceGroup


@dataclass
class SchedulerOutput:
    """One step's work. Row i feeds `num_new_tokens[i]` tokens of `seqs[i]` starting at its
    `num_computed_tokens`; it samples when that reaches the end of the sequence's tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    groups: list[SequenceGroup] = field(default_factory=list)  # the request of each row
    num_new_tokens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    blocks_to_swap_out: list[BlockPair] = field(default_factory=list)  # (gpu, cpu), run first
    blocks_to_swap_in: list[BlockPair] = field(default_factory=list)  # (cpu, gpu), run second
    blocks_to_copy: list[BlockPair] = field(default_factory=list)  # (src, dst) copy-on-write, run third
    preempted: list[SequenceGroup] = field(default_factory=list)
    num_batched_tokens: int = 0
    finished_request_ids: list[str] = field(default_factory=list)  # ended since the last step
    # Block tables changed other than by appending since the last step, and tables dropped: the
    # runner keeps a persistent copy of the tables and updates only what these name.
    rewritten_seq_ids: set[int] = field(default_factory=set)
    dropped_seq_ids: list[int] = field(default_factory=list)
    # Per row, the index of the token it samples (filled when launched; -1: the row samples nothing).
    sample_indices: list[int] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs and not self.blocks_to_swap_out

    @property
    def is_decode_only(self) -> bool:
        return self.num_batched_tokens == len(self.seqs)

    def remove_rows_of(self, group: SequenceGroup) -> None:
        keep = [i for i, g in enumerate(self.groups) if g is not group]
        self.num_batched_tokens -= sum(n for n, g in zip(self.num_new_tokens, self.groups, strict=True) if g is group)
        for rows in (self.seqs, self.groups, self.num_new_tokens, self.block_tables):
            rows[:] = [rows[i] for i in keep]

    def add_row(self, seq: Sequence, group: SequenceGroup, num_new_tokens: int, table: list[int]) -> None:
        self.seqs.append(seq)
        self.groups.append(group)
        self.num_new_tokens.append(num_new_tokens)
        self.block_tables.append(table)
        self.num_batched_tokens += num_new_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []  # ordered by arrival
        self.swapped: list[SequenceGroup] = []  # ordered by arrival
        self.groups: dict[str, SequenceGroup] = {}
        self.num_preemptions = 0
        self._seats = 0  # sum of widths of running requests

    # ---- requests ----------------------------------------------------------------------------

    def add(self, group: SequenceGroup) -> None:
        if group.request_id in self.groups:
            raise ValueError(f"request_id {group.request_id!r} is already live")
        self.groups[group.request_id] = group
        _insert_by_arrival(self.waiting, group)

    def abort(self, request_id: str) -> SequenceGroup | None:
        """End a request in any state and free all its blocks at once. Unknown ids are ignored."""
        group = self.groups.get(request_id)
        if group is None:
            return None
        group.aborted = True
        for seq in group.live_seqs():
            seq.finish_reason = "abort"
        self.finish_group(group)
        return group

    def finish_seq(self, seq: Sequence) -> None:
        """A sequence has ended (its finish_reason is set): free its blocks now."""
        if seq.status is SeqStatus.SWAPPED:
            self.kv.free_swapped(seq)
        else:
            self.kv.free(seq)
        seq.status = SeqStatus.FINISHED

    def finish_group(self, group: SequenceGroup) -> None:
        """The request has ended: free every sequence and drop it from its queue."""
        for seq in group.live_seqs():
            self.finish_seq(seq)
        if group.status is SeqStatus.RUNNING:
            self.running.remove(group)
            self._seats -= group.width
        elif group.status is SeqStatus.SWAPPED:
            self.swapped.remove(group)
        elif group.status is SeqStatus.WAITING:
            self.waiting.remove(group)
        group.status = SeqStatus.FINISHED
        group.finished_time = time.monotonic()
        del self.groups[group.request_id]

    @property
    def num_unfinished(self) -> int:
        return len(self.groups)

    # ---- the step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out)
        if not out.preempted:
            budget = self._schedule_swapped(out, budget)
        if not self.swapped:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput) -> int:
        """Schedule running requests; returns the token budget left for prefill."""
        kv = self.kv
        tables, ref_counts, block_size = kv.block_tables, kv.gpu.ref_counts, kv.block_size
        # Pass 1, the common case in O(1) per request: a lone sequence decoding into a private block
        # with room. It allocates nothing, so it is trivially undone if the request is preempted.
        others: list[SequenceGroup] = []
        max_model_len = self.max_model_len
        for group in self.running:
            if len(group.seqs) == 1:
                seq = group.seqs[0]
                tokens = seq.token_ids
                if len(tokens) - seq.num_prompt_tokens >= group.params.max_tokens or len(tokens) >= max_model_len:
                    continue  # its last token, still in flight, ends it: nothing more to compute
                table = tables.get(seq.seq_id)
                pos = seq.num_computed_tokens
                if (table is not None and pos + 1 == len(tokens) and pos // block_size < len(table)
                        and ref_counts[table[pos // block_size]] == 1):
                    out.add_row(seq, group, 1, table)
                    continue
            others.append(group)
        # Pass 2, oldest first: the remaining decodes (reserved up front), then prefill chunks.
        decodes = sum(1 for g in others for s in g.seqs
                      if s.status is SeqStatus.RUNNING and s.seq_id in tables and s.num_uncomputed_tokens == 1)
        budget = self.config.max_num_batched_tokens - len(out.seqs) - decodes
        whole_prompt = not self.config.enable_chunked_prefill
        for group in others:
            if group.status is not SeqStatus.RUNNING:
                continue  # preempted while an older request made room
            plan, budget = self._plan_rows(group, budget, whole_prompt)
            need = sum(kv.num_new_blocks_needed(seq, n, hit) for seq, n, hit in plan)
            while not kv.can_allocate(need, keep_watermark=False):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is group:
                    break
            if group.status is SeqStatus.RUNNING:
                self._allocate_rows(group, plan, out)
        return budget

    def _schedule_swapped(self, out: SchedulerOutput, prefill_budget: int) -> int:
        whole_prompt = not self.config.enable_chunked_prefill
        while self.swapped:
            group = self.swapped[0]
            seqs = group.live_seqs()
            plan, left = self._plan_rows(group, prefill_budget, whole_prompt)
            need = self.kv.blocks_to_resume(seqs, [(seq, n) for seq, n, _ in plan])
            if self._seats + group.width > self.config.max_num_seqs or not self._fits(need):
                break
            self.swapped.pop(0)
            out.blocks_to_swap_in.extend(self.kv.swap_in(seqs))
            self._start_running(group)
            self._allocate_rows(group, plan, out)
            prefill_budget = left
        return prefill_budget

    def _schedule_waiting(self, out: SchedulerOutput, prefill_budget: int) -> None:
        whole_prompt = not self.config.enable_chunked_prefill
        while self.waiting and prefill_budget > 0:
            group = self.waiting[0]
            if self._seats + group.width > self.config.max_num_seqs:
                break
            plan, left = self._plan_rows(group, prefill_budget, whole_prompt)
            if not plan:
                break
            need = sum(self.kv.num_new_blocks_needed(seq, n, hit) for seq, n, hit in plan)
            if not self._fits(need):
                break
            prefill_budget = left
            self.waiting.popleft()
            self._start_running(group)
            self._allocate_rows(group, plan, out)
            if group.first_scheduled_time is None:
                group.first_scheduled_time = time.monotonic()
                group.num_cached_tokens = group.seqs[0].num_computed_tokens

    def _plan_rows(
        self, group: SequenceGroup, prefill_budget: int, whole_prompt: bool
    ) -> tuple[list[tuple[Sequence, int, PrefixHit | None]], int]:
        """(sequence, tokens, prefix hit) rows for one request, and the prefill budget left. Decodes
        take their reserved token; prefills take what the budget allows (all or nothing when
        chunking is off: such a sequence waits for a later step)."""
        plan: list[tuple[Sequence, int, PrefixHit | None]] = []
        max_tokens = group.params.max_tokens
        for seq in group.seqs:
            if seq.status is SeqStatus.FINISHED or seq.num_output_tokens >= max_tokens or (
                    len(seq.token_ids) >= self.max_model_len):
                continue  # finished, or ended by length once its in-flight token lands
            hit = None
            computed = seq.num_computed_tokens
            if seq.seq_id not in self.kv.block_tables:
                hit = self.kv.find_prefix(seq)
                computed = hit.num_blocks * self.kv.block_size
            elif len(seq.token_ids) - computed == 1:
                plan.append((seq, 1, None))
                continue
            remaining = len(seq.token_ids) - computed
            n = min(remaining, prefill_budget)
            if n == 0 or (whole_prompt and n < remaining):
                continue
            plan.append((seq, n, hit))
            prefill_budget -= n
        return plan, prefill_budget

    def _allocate_rows(
        self, group: SequenceGroup, plan: list[tuple[Sequence, int, PrefixHit | None]], out: SchedulerOutput
    ) -> None:
        for seq, n, hit in plan:
            self.kv.allocate_slots(seq, n, out.blocks_to_copy, hit)
            # A prefix hit may have covered more than the plan assumed only if the hit grew; it
            # cannot (no step runs between planning and allocation), so n still fits exactly.
            out.add_row(seq, group, n, self.kv.block_tables[seq.seq_id])

    def _start_running(self, group: SequenceGroup) -> None:
        group.status = SeqStatus.RUNNING
        for seq in group.live_seqs():
            seq.status = SeqStatus.RUNNING
        _insert_by_arrival(self.running, group)
        self._seats += group.width

    def _fits(self, need: int) -> bool:
        """Whether a request can start (or resume) on `need` more blocks. The watermark keeps room for
        running requests to grow; with none running it would only stop a request that the limits
        accepted (one that needs nearly the whole pool) from ever starting."""
        return self.kv.can_allocate(need, keep_watermark=bool(self.running))

    def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        """Evict a running request (all its sequences) to free blocks for older ones."""
        self.running.remove(group)
        self._seats -= group.width
        self.num_preemptions += 1
        out.preempted.append(group)
        if group in out.groups:  # scheduled by the allocation-free first pass: drop its rows
            out.remove_rows_of(group)
        seqs = group.live_seqs()
        if self._choose_swap(seqs):
            out.blocks_to_swap_out.extend(self.kv.swap_out(seqs))
            group.status = SeqStatus.SWAPPED
            for seq in seqs:
                seq.status = SeqStatus.SWAPPED
            _insert_by_arrival(self.swapped, group)
            return
        for seq in seqs:
            self.kv.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SeqStatus.WAITING
        group.status = SeqStatus.WAITING
        _insert_by_arrival(self.waiting, group)

    def _choose_swap(self, seqs: list[Sequence]) -> bool:
        """Swap or recompute, by policy (auto: recompute a lone sequence, swap a group) - unless only
        the other one can work. Recomputing loses the sharing between a group's sequences, so it
        needs room for every sequence's own blocks; swapping needs CPU space for the shared ones.
        Admission guarantees one of the two always fits (see RequestLimits)."""
        mode = self.config.preemption_mode
        prefer_swap = mode == "swap" or (mode == "auto" and len(seqs) > 1)
        tables = self.kv.block_tables
        # A group still being recomputed has sequences without blocks: it is recomputed again.
        can_swap = (all(s.seq_id in tables for s in seqs)
                    and self.kv.cpu.num_free >= self.kv.num_blocks_to_swap(seqs))
        unshared = sum(self.kv.blocks_for(len(s.token_ids)) for s in seqs)
        can_recompute = unshared <= self.kv.num_total_blocks
        return can_swap and (prefer_swap or not can_recompute)


def _insert_by_arrival(queue: deque[SequenceGroup] | list[SequenceGroup], group: SequenceGroup) -> None:
    """Keep a queue ordered by arrival. Newcomers go to the back in O(1); a preempted request,
    older than most of the queue, is placed by a scan from the front (usually one step)."""
    if not queue or queue[-1].arrival_time <= group.arrival_time:
        queue.append(group)
        return
    for i, other in enumerate(queue):
        if other.arrival_time > group.arrival_time:
            queue.insert(i, group)
            return

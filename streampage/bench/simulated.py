"""A model-free executor: deterministic tokens, so scheduling and block bookkeeping can be measured and
tested without a model. It also checks what a real runner relies on: every row's block table covers
the slots it is about to write.

Tokens depend on the request id, the sequence's seat in its request and the position, never on the
process-wide sequence counter: replaying the same requests gives the same tokens (hypothesis replays
its examples and needs them to behave alike)."""

from __future__ import annotations

import zlib

from streampage.engine.scheduler import SchedulerOutput
from streampage.runner.step_types import RowResult


class SimulatedExecutor:
    def __init__(self, vocab_size: int, block_size: int, num_eos_tokens: int = 1, avoid: frozenset[int] = frozenset()):
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.num_eos_tokens = num_eos_tokens
        self.avoid = avoid  # tokens never produced (e.g. EOS, so lengths are exact)
        self.steps = 0

    def launch(self, out: SchedulerOutput) -> list[RowResult | None]:
        return self.execute(out)

    def collect(self, launched: list[RowResult | None]) -> list[RowResult | None]:
        return launched

    def execute(self, out: SchedulerOutput) -> list[RowResult | None]:
        self.steps += 1
        results: list[RowResult | None] = []
        for seq, group, n, table in zip(out.seqs, out.groups, out.num_new_tokens, out.block_tables, strict=True):
            end = seq.num_computed_tokens + n
            if len(table) * self.block_size < end:
                raise AssertionError(f"{seq} has {len(table)} blocks for {end} tokens")
            if end != seq.num_tokens:
                results.append(None)
                continue
            key = zlib.crc32(group.request_id.encode()) * 4096 + group.seqs.index(seq)
            results.append(self._sample(key, end, group.num_samples(), group.num_logprobs(self.num_eos_tokens)))
        return results

    def _token(self, key: int) -> int:
        token = (key * 2654435761) % self.vocab_size
        while token in self.avoid:
            token = (token + 1) % self.vocab_size
        return token

    def _sample(self, seq_key: int, position: int, num_samples: int, num_logprobs: int) -> RowResult:
        tokens = [self._token(seq_key * 7919 + position * 31 + i) for i in range(num_samples)]
        logprobs = [-1.0 - 0.01 * (t % 7) for t in tokens]
        top = None
        if num_logprobs:
            ids = [self._token(seq_key * 131 + position * 17 + i) for i in range(num_logprobs)]
            ids = list(dict.fromkeys(ids))
            top = (ids, [-0.5 - 0.25 * i - 0.001 * (seq_key % 5) for i in range(len(ids))])
        return RowResult(tokens, logprobs, top)

"""Request state: a `SequenceGroup` is one request; its `Sequence`s are the choices (n > 1) or beams.

Token regions of a sequence (the scheduler and the KV cache manager agree on them):

    token_ids:  [ prompt ............................ | outputs ........... ]
                [ K/V in cache: num_computed_tokens )[ still to compute    )
                                                      ^ the next step feeds these tokens

A sequence in decode has exactly one token to compute (the one sampled last step). After a
recompute preemption num_computed_tokens drops to 0 and prompt + outputs are prefilled again.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from streampage.outputs import TokenLogprobs
from streampage.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


_seq_ids = itertools.count()

# Stands for a token the device is still sampling (async scheduling); never reaches the model or a user.
PLACEHOLDER = -1


class Sequence:
    __slots__ = (
        "cumulative_logprob",
        "finish_reason",
        "logprobs",
        "num_computed_tokens",
        "num_prompt_tokens",
        "seq_id",
        "status",
        "stop_reason",
        "token_ids",
    )

    def __init__(self, prompt_token_ids: list[int]) -> None:
        self.seq_id = next(_seq_ids)
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = SeqStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.cumulative_logprob = 0.0
        self.logprobs: list[TokenLogprobs] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def fork(self) -> Sequence:
        """A new sequence with the same tokens and progress (its block table is forked separately)."""
        child = Sequence.__new__(Sequence)
        child.seq_id = next(_seq_ids)
        child.token_ids = list(self.token_ids)
        child.num_prompt_tokens = self.num_prompt_tokens
        child.num_computed_tokens = self.num_computed_tokens
        child.status = self.status
        child.finish_reason = None
        child.stop_reason = None
        child.cumulative_logprob = self.cumulative_logprob
        child.logprobs = None if self.logprobs is None else list(self.logprobs)
        return child

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"{self.status.value})")


@dataclass
class BeamHypothesis:
    """A finished beam: its score, tokens and log-probabilities (beam search keeps the best ones)."""

    score: float
    token_ids: list[int]
    cumulative_logprob: float
    logprobs: list[TokenLogprobs] | None
    finish_reason: str
    stop_reason: str | int | None = None


@dataclass(eq=False)
class SequenceGroup:
    """One request. Sequences are scheduled, preempted and resumed together."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seqs: list[Sequence] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    aborted: bool = False
    # Beam search: finished hypotheses (best first), and whether running beams can still beat them.
    beam_hypotheses: list[BeamHypothesis] = field(default_factory=list)
    beam_improvable: bool = True

    def __post_init__(self) -> None:
        if not self.seqs:
            self.seqs = [Sequence(self.prompt_token_ids)]

    @property
    def width(self) -> int:
        """The most sequences this request runs at once (admission counts this many seats)."""
        return max(self.params.n, self.params.beam_width)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if s.status is not SeqStatus.FINISHED]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def has_sampled(self) -> bool:
        """True once the first output token exists (then n > 1 requests have forked)."""
        return self.first_token_time is not None

    def num_samples(self) -> int:
        """Tokens to draw from a row of this request: n at the first draw of parallel sampling."""
        if self.params.n > 1 and not self.params.use_beam_search and not self.has_sampled:
            return self.params.n
        return 1

    def num_logprobs(self, num_eos_tokens: int) -> int:
        """Top log-probabilities a row must return. Beam search ranks the best
        max(2, 1 + #eos) * beam_width continuations, as transformers does, so that enough unfinished
        beams survive even when the best candidates all end."""
        if self.params.use_beam_search:
            return max(2, 1 + num_eos_tokens) * self.params.beam_width
        return self.params.logprobs or 0

"""One step of beam search over a request's beams, with the same rules as transformers' `num_beams`.

Each live beam returned its top K continuations (K = max(2, 1 + #eos) * beam_width). Per step:
1. rank all candidates by cumulative log-probability and keep the best K;
2. a candidate that ends (eos or length) and ranks within the first beam_width becomes a finished
   hypothesis, scored sum_logprobs / generated_len ** length_penalty; the best beam_width are kept;
3. the best beam_width unfinished candidates are the next beams (a parent chosen twice is forked, so
   the children share its KV blocks; a parent chosen never is freed);
4. the search ends when no running beam can beat the worst kept hypothesis (transformers' default
   heuristic), when early_stopping and beam_width hypotheses exist, or when every candidate ended.
"""

from __future__ import annotations

from dataclasses import dataclass

from streampage.engine.request import BeamHypothesis, Sequence, SequenceGroup

NEG_INF = float("-inf")


@dataclass
class Candidate:
    score: float  # cumulative log-probability after appending `token`
    parent: Sequence
    token: int
    logprob: float
    ends: bool = False
    finish_reason: str = ""


@dataclass
class BeamStep:
    """What the engine must do with the beams after ranking: new beams and whether the search ended."""

    next_beams: list[Candidate]
    done: bool


def rank_candidates(
    beams: list[Sequence], top: list[tuple[list[int], list[float]]], k: int
) -> list[Candidate]:
    """The best k continuations over all beams, best first (ties keep beam order, then token rank)."""
    candidates = [
        Candidate(beam.cumulative_logprob + lp, beam, token, lp)
        for beam, (ids, lps) in zip(beams, top, strict=True)
        for token, lp in zip(ids, lps, strict=True)
    ]
    candidates.sort(key=lambda c: c.score, reverse=True)
    return candidates[:k]


def hypothesis_score(cumulative_logprob: float, generated_len: int, length_penalty: float) -> float:
    return cumulative_logprob / (generated_len**length_penalty)


def advance(group: SequenceGroup, candidates: list[Candidate], generated_len: int) -> BeamStep:
    """Apply steps 2-4 to ranked candidates whose `ends` flags are set. `generated_len` counts the
    output tokens of every candidate (all beams of a request have the same length)."""
    params = group.params
    width = params.beam_width
    hyps = group.beam_hypotheses
    # Hypotheses may be added only while the search could still improve (a sticky flag, as in
    # transformers) and, with early_stopping, while fewer than beam_width exist.
    can_add = group.beam_improvable and not (params.early_stopping and len(hyps) >= width)
    if can_add:
        for rank, cand in enumerate(candidates):
            if rank < width and cand.ends:
                hyps.append(_hypothesis(cand, generated_len, params.length_penalty))
        hyps.sort(key=lambda h: h.score, reverse=True)
        del hyps[width:]
    next_beams = [c for c in candidates if not c.ends][:width]
    if next_beams and len(hyps) >= width:
        best_running = hypothesis_score(next_beams[0].score, generated_len, params.length_penalty)
        group.beam_improvable = group.beam_improvable and best_running > hyps[-1].score
    all_ended = not next_beams
    full_and_early = params.early_stopping and len(hyps) >= width
    return BeamStep(next_beams, all_ended or full_and_early or not group.beam_improvable)


def _hypothesis(cand: Candidate, generated_len: int, length_penalty: float) -> BeamHypothesis:
    parent = cand.parent
    logprobs = None
    if parent.logprobs is not None:
        logprobs = [*parent.logprobs, {cand.token: cand.logprob}]
    return BeamHypothesis(
        score=hypothesis_score(cand.score, generated_len, length_penalty),
        token_ids=[*parent.output_token_ids, cand.token],
        cumulative_logprob=cand.score,
        logprobs=logprobs,
        finish_reason=cand.finish_reason,
    )

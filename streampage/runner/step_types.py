"""What a step hands back to the engine core (kept in the runner package: the engine depends on the
runner, never the reverse)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RowResult:
    """What the runner sampled for one row: `token_ids` (num_samples of them), their raw
    log-probabilities, and the row's top log-probabilities (ids, values) when asked for."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: tuple[list[int], list[float]] | None = None

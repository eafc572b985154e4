"""Sampling parameters with vLLM / OpenAI names; every out-of-range value is refused by name."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


class InvalidParameterError(ValueError):
    """A request parameter is out of range. `param` names the field (the wire protocol reports it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# Upper bounds that keep one request from starving the others; the server may tighten max_tokens.
MAX_N = 64
MAX_BEAM_WIDTH = 32
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_SEED = 2**63 - 1


@dataclass
class SamplingParams:
    """How to pick tokens for one request. `temperature == 0` is greedy decoding."""

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N log-probabilities per generated token (plus the chosen one)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    beam_width: int = 1  # > 1 selects beam search
    length_penalty: float = 1.0
    early_stopping: bool = False  # beam search: stop once beam_width hypotheses are finished
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def use_beam_search(self) -> bool:
        return self.beam_width > 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Build from wire/user data, refusing unknown names and wrong types by field."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name not in known:
                raise InvalidParameterError(name, f"unknown sampling parameter {name!r}")
            kwargs[name] = _coerce(name, known[name].type, value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        _int_range("n", self.n, 1, MAX_N)
        _int_range("max_tokens", self.max_tokens, 1, None)
        _int_range("min_tokens", self.min_tokens, 0, self.max_tokens, "max_tokens")
        _float_range("temperature", self.temperature, 0.0, 100.0)
        _float_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _int_range("top_k", self.top_k, 0, None)
        _float_range("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _int_range("seed", self.seed, 0, MAX_SEED)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParameterError("stop", f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidParameterError("stop", "stop strings must be non-empty strings")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidParameterError(
                    "stop", f"a stop string has {len(s)} characters; at most {MAX_STOP_STRING_CHARS}"
                )
        for t in self.stop_token_ids:
            _int_range("stop_token_ids", t, 0, None)
        if self.logprobs is not None:
            _int_range("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        _float_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _float_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _float_range("repetition_penalty", self.repetition_penalty, 0.0, 2.0, low_open=True)
        _int_range("beam_width", self.beam_width, 1, MAX_BEAM_WIDTH)
        _float_range("length_penalty", self.length_penalty, -10.0, 10.0)
        if self.use_beam_search:
            self._validate_beam_search()

    def _validate_beam_search(self) -> None:
        # Beam search is deterministic: it ranks by log-probability, so sampling knobs make no sense.
        if self.temperature != 0.0 and self.temperature != 1.0:
            raise InvalidParameterError("temperature", "beam search takes no temperature (use 0 or 1)")
        for name, neutral in (("top_p", 1.0), ("top_k", 0), ("min_p", 0.0), ("presence_penalty", 0.0),
                              ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
            if getattr(self, name) != neutral:
                raise InvalidParameterError(name, f"{name} is not supported with beam search")
        if self.n > self.beam_width:
            raise InvalidParameterError("n", f"n={self.n} exceeds beam_width={self.beam_width}")
        if self.stop:
            raise InvalidParameterError("stop", "stop strings are not supported with beam search")


def _int_range(name: str, value: Any, low: int, high: int | None, high_name: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(name, f"{name} must be an integer, got {type(value).__name__}")
    if value < low:
        raise InvalidParameterError(name, f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        limit = f"{high_name} ({high})" if high_name else str(high)
        raise InvalidParameterError(name, f"{name} must be <= {limit}, got {value}")


def _float_range(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParameterError(name, f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidParameterError(name, f"{name} must be finite, got {value}")
    if (value <= low if low_open else value < low) or value > high:
        bracket = "(" if low_open else "["
        raise InvalidParameterError(name, f"{name} must be in {bracket}{low}, {high}], got {value}")


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Accept JSON-shaped values: ints where floats are expected; lists for list fields."""
    text = str(annotation)
    if text.startswith("float") and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if text.startswith("list") and not isinstance(value, list):
        if name == "stop" and isinstance(value, str):
            return [value]
        raise InvalidParameterError(name, f"{name} must be a list, got {type(value).__name__}")
    if text == "bool" and not isinstance(value, bool):
        raise InvalidParameterError(name, f"{name} must be true or false, got {type(value).__name__}")
    if text.startswith("list[str]") and not all(isinstance(v, str) for v in value):
        raise InvalidParameterError(name, f"{name} must be a list of strings")
    return value

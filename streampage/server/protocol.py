"""The `streampage.v1` wire protocol: client messages parsed and validated, server frames built.

Every client message either parses into one of the dataclasses below or raises `ProtocolError`
carrying the error code the client will see. Server frames are UTF-8 JSON bytes (orjson), sent as
text frames. DESIGN.md section 7 is the specification; where it is silent this server decides:

- `null` for a prompt field counts as absent; binary frames are `invalid_message`.
- A message over --max-message-bytes is `invalid_message` (naming its request when it has one); one
  over twice that closes the socket with 1009 before it is read.
- `max_tokens` above --max-output-tokens and `timeout_s` above --max-request-timeout are
  `invalid_param`; a request without `timeout_s` gets --max-request-timeout.
- Ending early: cancel -> status "cancelled", finish_reason "abort"; timeout_s -> "incomplete",
  "timeout"; the drain deadline on SIGTERM -> "incomplete", "abort"; an engine failure -> "failed",
  "error". Choices that already finished keep their "stop" or "length"; if all did, "completed".
- Cancelling a request that ended moments ago (the last 1024 ids of the connection) does nothing, so
  a cancel racing a request's end is not an error.
- `logprobs` in a delta: one entry per token, {"token_id", "logprob", "top_logprobs": [{"token_id",
  "logprob"}, ...]} with at most N alternatives, best first.
- `timing` is measured from the server's receipt of response.create; `ttft_ms` is null when no token
  was produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import orjson

from streampage.outputs import TokenLogprobs
from streampage.sampling_params import InvalidParameterError, SamplingParams

SUBPROTOCOL = "streampage.v1"


class ErrorCode:
    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_PARAM = "invalid_param"
    DUPLICATE_REQUEST_ID = "duplicate_request_id"
    UNKNOWN_REQUEST_ID = "unknown_request_id"
    PROMPT_TOO_LONG = "prompt_too_long"
    TOO_MANY_REQUESTS = "too_many_requests"
    SERVER_OVERLOADED = "server_overloaded"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL_ERROR = "internal_error"


class ProtocolError(Exception):
    """A message refused with a wire error code; `request_id` is set once the message named one."""

    def __init__(self, code: str, message: str, *, param: str | None = None,
                 request_id: str | None = None, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param
        self.request_id = request_id
        self.retry_after_ms = retry_after_ms


MAX_REQUEST_ID_CHARS = 128
MAX_EVENT_ID_CHARS = 128
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids")
_CREATE_FIELDS = frozenset({"type", "request_id", "return_token_ids", "timeout_s", *PROMPT_FIELDS})
_SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))


@dataclass(frozen=True)
class CreateRequest:
    request_id: str
    params: SamplingParams
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_token_ids: list[int] | None = None
    return_token_ids: bool = False
    timeout_s: float | None = None  # None: the server's max_request_timeout

    @property
    def prompt_field(self) -> str:
        """The field that carried the prompt, named in prompt errors."""
        return next(name for name in PROMPT_FIELDS if getattr(self, name) is not None)


@dataclass(frozen=True)
class CancelRequest:
    request_id: str


@dataclass(frozen=True)
class Ping:
    event_id: str | None = None


ClientMessage = CreateRequest | CancelRequest | Ping


@dataclass(frozen=True)
class RequestLimits:
    """Limits checked while parsing, before any tokenization."""

    max_message_bytes: int
    max_output_tokens: int
    max_request_timeout: float


_UTF8_MAX_BYTES_PER_CHAR = 4


def parse_message(raw: str | bytes, limits: RequestLimits) -> ClientMessage:
    """Parse one client frame; raise ProtocolError naming the first problem found."""
    if isinstance(raw, bytes):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "binary frames are not accepted; send JSON text")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"message is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "a message must be a JSON object")
    if _too_large(raw, limits.max_message_bytes):
        request_id = data.get("request_id")
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"message is larger than {limits.max_message_bytes} bytes",
                            request_id=request_id if isinstance(request_id, str) else None)
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "a message needs a string field 'type'", param="type")
    if kind == "response.create":
        return _parse_create(data, limits)
    if kind == "response.cancel":
        request_id = _request_id(data)
        _refuse_unknown_fields(data, {"type", "request_id"}, request_id)
        return CancelRequest(request_id)
    if kind == "ping":
        return _parse_ping(data)
    raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:64]!r}", param="type")


def _too_large(raw: str, limit: int) -> bool:
    # Encoding is needed only when the character count leaves the byte count in doubt. Oversized
    # messages are still parsed (the socket reads at most twice the limit) to name their request.
    return len(raw) > limit or (len(raw) * _UTF8_MAX_BYTES_PER_CHAR > limit
                                and len(raw.encode("utf-8", "surrogatepass")) > limit)


def _request_id(data: dict[str, Any]) -> str:
    request_id = data.get("request_id")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                            f"request_id must be a string of 1 to {MAX_REQUEST_ID_CHARS} characters",
                            param="request_id")
    return request_id


def _refuse_unknown_fields(data: dict[str, Any], known: set[str] | frozenset[str],
                           request_id: str | None) -> None:
    for name in data:
        if name not in known:
            raise ProtocolError(ErrorCode.INVALID_PARAM, f"unknown field {name[:64]!r}",
                                param=name[:64], request_id=request_id)


def _parse_ping(data: dict[str, Any]) -> Ping:
    _refuse_unknown_fields(data, {"type", "event_id"}, None)
    event_id = data.get("event_id")
    if event_id is not None and (not isinstance(event_id, str) or len(event_id) > MAX_EVENT_ID_CHARS):
        raise ProtocolError(ErrorCode.INVALID_PARAM,
                            f"event_id must be a string of at most {MAX_EVENT_ID_CHARS} characters",
                            param="event_id")
    return Ping(event_id)


def _parse_create(data: dict[str, Any], limits: RequestLimits) -> CreateRequest:
    request_id = _request_id(data)
    _refuse_unknown_fields(data, _CREATE_FIELDS | _SAMPLING_FIELDS, request_id)
    try:
        prompts = _prompt_fields(data)
        params = SamplingParams.from_dict({k: v for k, v in data.items() if k not in _CREATE_FIELDS})
        _check_limits(params, limits)
        return CreateRequest(request_id=request_id, params=params, **prompts,
                             return_token_ids=_bool(data, "return_token_ids"),
                             timeout_s=_timeout(data, limits))
    except InvalidParameterError as exc:
        raise ProtocolError(ErrorCode.INVALID_PARAM, str(exc), param=exc.param,
                            request_id=request_id) from None


def _prompt_fields(data: dict[str, Any]) -> dict[str, Any]:
    given = [name for name in PROMPT_FIELDS if data.get(name) is not None]  # null counts as absent
    if len(given) != 1:
        raise InvalidParameterError(
            "prompt", f"give exactly one of prompt, messages, prompt_token_ids (got {len(given)})")
    name = given[0]
    value = data[name]
    if name == "prompt" and not isinstance(value, str):
        raise InvalidParameterError("prompt", f"prompt must be a string, got {type(value).__name__}")
    if name == "messages":
        _check_messages(value)
    if name == "prompt_token_ids":
        _check_token_ids(value)
    return {name: value}


def _check_messages(value: Any) -> None:
    if not isinstance(value, list) or not value:
        raise InvalidParameterError("messages", "messages must be a non-empty list")
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidParameterError(where, f"{where} must be an object with role and content")
        for key in message:
            if key not in ("role", "content", "name"):
                raise InvalidParameterError(f"{where}.{key[:64]}", f"unknown field {key[:64]!r} in {where}")
        if message.get("role") not in MESSAGE_ROLES:
            raise InvalidParameterError(f"{where}.role", f"{where}.role must be one of {MESSAGE_ROLES}")
        if not isinstance(message.get("content"), str):
            raise InvalidParameterError(f"{where}.content", f"{where}.content must be a string")
        if not isinstance(message.get("name", ""), str):
            raise InvalidParameterError(f"{where}.name", f"{where}.name must be a string")


def _check_token_ids(value: Any) -> None:
    if not isinstance(value, list) or not value:
        raise InvalidParameterError("prompt_token_ids", "prompt_token_ids must be a non-empty list")
    for token in value:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise InvalidParameterError("prompt_token_ids",
                                        f"prompt_token_ids must hold integers >= 0, got {token!r:.32}")


def _check_limits(params: SamplingParams, limits: RequestLimits) -> None:
    if params.max_tokens > limits.max_output_tokens:
        raise InvalidParameterError(
            "max_tokens", f"max_tokens must be <= {limits.max_output_tokens} on this server, "
                          f"got {params.max_tokens}")


def _bool(data: dict[str, Any], name: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise InvalidParameterError(name, f"{name} must be true or false, got {type(value).__name__}")
    return value


def _timeout(data: dict[str, Any], limits: RequestLimits) -> float | None:
    value = data.get("timeout_s")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidParameterError("timeout_s", "timeout_s must be a number of seconds")
    if not 0 < value <= limits.max_request_timeout:
        raise InvalidParameterError(
            "timeout_s", f"timeout_s must be in (0, {limits.max_request_timeout}], got {value}")
    return float(value)


# Server -> client frames. Optional fields are left out rather than sent as null.

def created_frame(request_id: str, prompt_tokens: int, cached_tokens: int) -> bytes:
    return orjson.dumps({"type": "response.created", "request_id": request_id,
                         "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens})


def delta_frame(request_id: str, index: int, seq: int, text: str, token_ids: list[int] | None,
                logprobs: list[dict[str, Any]] | None) -> bytes:
    frame: dict[str, Any] = {"type": "response.output_text.delta", "request_id": request_id,
                             "index": index, "seq": seq, "delta": text}
    if token_ids is not None:
        frame["token_ids"] = token_ids
    if logprobs is not None:
        frame["logprobs"] = logprobs
    return orjson.dumps(frame)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Timing:
    queued_ms: float
    ttft_ms: float | None  # None: no token was produced
    total_ms: float


def done_frame(request_id: str, status: str, finish_reasons: list[str], usage: Usage,
               timing: Timing) -> bytes:
    return orjson.dumps({
        "type": "response.done", "request_id": request_id, "status": status,
        "choices": [{"index": i, "finish_reason": reason} for i, reason in enumerate(finish_reasons)],
        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "cached_tokens": usage.cached_tokens},
        "timing": {"queued_ms": round(timing.queued_ms, 3),
                   "ttft_ms": None if timing.ttft_ms is None else round(timing.ttft_ms, 3),
                   "total_ms": round(timing.total_ms, 3)},
    })


def error_frame(error: ProtocolError) -> bytes:
    body: dict[str, Any] = {"code": error.code, "message": str(error)}
    if error.param is not None:
        body["param"] = error.param
    if error.retry_after_ms is not None:
        body["retry_after_ms"] = error.retry_after_ms
    frame: dict[str, Any] = {"type": "error"}
    if error.request_id is not None:
        frame["request_id"] = error.request_id
    frame["error"] = body
    return orjson.dumps(frame)


def pong_frame(event_id: str | None) -> bytes:
    frame: dict[str, Any] = {"type": "pong"}
    if event_id is not None:
        frame["event_id"] = event_id
    return orjson.dumps(frame)


def wire_logprobs(token_ids: list[int], logprobs: list[TokenLogprobs], top_n: int) -> list[dict[str, Any]]:
    """One entry per generated token: the chosen token's log-probability and the top-N alternatives."""
    entries = []
    for token_id, candidates in zip(token_ids, logprobs, strict=False):
        top = sorted(candidates.items(), key=lambda item: -item[1])[:top_n]
        entries.append({"token_id": token_id, "logprob": candidates.get(token_id),
                        "top_logprobs": [{"token_id": t, "logprob": lp} for t, lp in top]})
    return entries

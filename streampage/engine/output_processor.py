"""Engine deltas (token ids) -> user-facing `RequestOutput`s (text deltas), in the front end.

Per choice it runs an incremental detokenizer, which also finds stop strings. A stop string ends a
choice here, in the front end; when every choice of a request has ended this way the engine core must
be told to abort the request (it learns of stop strings only through that abort).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streampage.engine.detokenizer import IncrementalDetokenizer
from streampage.engine.llm_engine import RequestDelta, SeqDelta
from streampage.outputs import CompletionOutput, RequestMetrics, RequestOutput
from streampage.sampling_params import SamplingParams


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    detokenizers: dict[int, IncrementalDetokenizer] = field(default_factory=dict)
    ended: dict[int, str] = field(default_factory=dict)  # choice index -> finish reason
    num_cached_tokens: int = 0

    @property
    def width(self) -> int:
        return self.params.n


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
            arrival_time: float) -> None:
        self.requests[request_id] = RequestState(request_id, prompt, prompt_token_ids, params,
                                                 RequestMetrics(arrival_time))

    def drop(self, request_id: str) -> RequestState | None:
        return self.requests.pop(request_id, None)

    def process(self, deltas: list[RequestDelta], now: float) -> tuple[list[RequestOutput], list[str]]:
        """Turn one step's deltas into outputs. Also returns the requests that stop strings ended,
        which the caller must abort in the engine core."""
        outputs, to_abort = [], []
        for delta in deltas:
            state = self.requests.get(delta.request_id)
            if state is None:
                continue  # ended here already (a stop string); the core's late news is moot
            output = self._process_one(state, delta, now)
            if output.finished:
                del self.requests[delta.request_id]
                if not delta.finished:
                    to_abort.append(delta.request_id)
            outputs.append(output)
        return outputs, to_abort

    def _process_one(self, state: RequestState, delta: RequestDelta, now: float) -> RequestOutput:
        metrics = state.metrics
        if metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = delta.first_scheduled_time
            state.num_cached_tokens = delta.num_cached_tokens
        completions = [self._completion(state, seq) for seq in delta.seqs if seq.index not in state.ended]
        if metrics.first_token_time is None and any(c.token_ids for c in completions):
            metrics.first_token_time = now
        finished = delta.finished or len(state.ended) >= state.width
        if finished:
            metrics.finished_time = now
            for completion in completions:
                if completion.finish_reason is None:
                    completion.finish_reason = "abort"
        return RequestOutput(state.request_id, state.prompt_token_ids, completions, finished,
                             state.num_cached_tokens, state.prompt, metrics)

    def _completion(self, state: RequestState, seq: SeqDelta) -> CompletionOutput:
        detokenizer = state.detokenizers.get(seq.index)
        if detokenizer is None:
            params = state.params
            detokenizer = state.detokenizers[seq.index] = IncrementalDetokenizer(
                self.tokenizer, state.prompt_token_ids, params.stop, params.include_stop_str_in_output,
                params.min_tokens)
        finish_reason, stop_reason = seq.finish_reason, seq.stop_reason
        ends_with_stop_token = finish_reason == "stop" and not isinstance(stop_reason, str)
        stop_string = detokenizer.update(seq.token_ids, ends_with_stop_token=ends_with_stop_token)
        if stop_string is not None:
            finish_reason, stop_reason = "stop", stop_string
        elif finish_reason is not None:
            detokenizer.finish()
        if finish_reason is not None:
            state.ended[seq.index] = finish_reason
        return CompletionOutput(seq.index, detokenizer.get_delta(), seq.token_ids, seq.logprobs,
                                seq.cumulative_logprob, finish_reason, stop_reason)

"""`LLM`: offline batched generation in this process (the engine core runs inline, no server)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from streampage.config import EngineConfig
from streampage.engine.llm_engine import LLMEngine, RequestDelta
from streampage.engine.output_processor import OutputProcessor
from streampage.model.loader import load_tokenizer
from streampage.outputs import CompletionOutput, RequestMetrics, RequestOutput
from streampage.sampling_params import SamplingParams

Prompt = str | list[int]
Messages = list[dict[str, Any]]


class LLM:
    """`LLM(model_dir, **engine_options).generate(prompts, params)`; `model=None` is the demo model."""

    def __init__(self, model: str | None = None, **options: Any) -> None:
        self.config = EngineConfig.create(model=model or "", **options)
        self.engine, self.info = LLMEngine.from_config(self.config)
        self.tokenizer = load_tokenizer(self.info.model_dir)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """End the tensor-parallel ranks this LLM started (at exit otherwise); it cannot generate after."""
        self.engine.shutdown()

    def generate(
        self, prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete every prompt (text or token ids); outputs come back in the prompts' order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        return self._run(prompts, list(sampling_params), use_tqdm)

    def chat(
        self, messages: Messages | Sequence[Messages], sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True, add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.encode_chat(c, add_generation_prompt) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm)

    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _run(self, prompts: list[Prompt], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        encoded = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for token_ids, p in zip(encoded, params, strict=True):
            self.engine.check_request(token_ids, p)  # refuse the batch before any of it runs
        # Requests with stop strings need text as it grows (the output processor); the others get
        # their text decoded once, when they finish.
        processor = OutputProcessor(self.tokenizer)
        whole: dict[str, RequestOutput] = {}
        order: list[str] = []
        streamed: set[str] = set()
        for prompt, token_ids, p in zip(prompts, encoded, params, strict=True):
            request_id = str(next(self._ids))
            now = time.monotonic()
            self.engine.add_request(request_id, token_ids, p, now)
            text = prompt if isinstance(prompt, str) else None
            whole[request_id] = RequestOutput(request_id, token_ids, [], prompt=text, metrics=RequestMetrics(now))
            if p.stop:
                processor.add(request_id, text, token_ids, p, now)
                streamed.add(request_id)
            order.append(request_id)
        with tqdm(total=len(order), desc="generate", disable=not use_tqdm, unit="req") as bar:
            while self.engine.has_unfinished_requests():
                deltas = self.engine.step()
                now = time.monotonic()
                for delta in deltas:
                    if delta.request_id not in streamed and _collect(whole[delta.request_id], delta, now):
                        self._decode_text(whole[delta.request_id])
                        bar.update(1)
                outputs, stopped = processor.process(deltas, now)
                for request_id in stopped:
                    self.engine.abort_request(request_id)
                for output in outputs:
                    _merge(whole[output.request_id], output)
                    if output.finished:
                        bar.update(1)
        return [_sorted_choices(whole[r]) for r in order]

    def _decode_text(self, output: RequestOutput) -> None:
        for choice in output.outputs:
            ids = choice.token_ids
            if choice.finish_reason == "stop" and isinstance(choice.stop_reason, int):
                ids = ids[:-1]  # a stop token's text is not part of the output
            choice.text = self.tokenizer.decode(ids, skip_special_tokens=True)


def _collect(whole: RequestOutput, delta: RequestDelta, now: float) -> bool:
    """Fold an engine delta into the request's output; True when the request has finished."""
    metrics = whole.metrics
    assert metrics is not None
    if metrics.first_scheduled_time is None:
        metrics.first_scheduled_time = delta.first_scheduled_time
        whole.num_cached_tokens = delta.num_cached_tokens
    if metrics.first_token_time is None and delta.seqs:
        metrics.first_token_time = now
    choices = whole.outputs
    for piece in delta.seqs:
        while len(choices) <= piece.index:
            choices.append(CompletionOutput(len(choices)))
        choice = choices[piece.index]
        choice.token_ids.extend(piece.token_ids)
        if piece.logprobs is not None:
            choice.logprobs = (choice.logprobs or []) + piece.logprobs
        choice.cumulative_logprob = piece.cumulative_logprob
        if piece.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = piece.finish_reason, piece.stop_reason
    if delta.finished:
        whole.finished = True
        metrics.finished_time = now
    return delta.finished


def _merge(whole: RequestOutput, delta: RequestOutput) -> None:
    """Fold a streamed delta (text included) into the request's whole output."""
    whole.finished, whole.num_cached_tokens, whole.metrics = delta.finished, delta.num_cached_tokens, delta.metrics
    choices = {c.index: c for c in whole.outputs}
    for piece in delta.outputs:
        choice = choices.get(piece.index)
        if choice is None:
            choice = choices[piece.index] = CompletionOutput(piece.index, logprobs=[] if piece.logprobs else None)
            whole.outputs.append(choice)
        choice.text += piece.text
        choice.token_ids.extend(piece.token_ids)
        if piece.logprobs:
            choice.logprobs = (choice.logprobs or []) + piece.logprobs
        choice.cumulative_logprob = piece.cumulative_logprob
        if piece.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = piece.finish_reason, piece.stop_reason


def _sorted_choices(output: RequestOutput) -> RequestOutput:
    output.outputs.sort(key=lambda c: c.index)
    return output

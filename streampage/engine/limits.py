"""What a request may ask for, given the model and the pool: checked before it is accepted, the same
way in the engine core and in the front end (which refuses before anything crosses the process line)."""

from __future__ import annotations

from dataclasses import dataclass

from streampage.outputs import RequestRejected
from streampage.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    max_model_len: int
    vocab_size: int
    num_gpu_blocks: int
    block_size: int
    max_num_batched_tokens: int
    chunked_prefill: bool
    num_cpu_blocks: int = 0
    recompute_groups: bool = False  # the preemption policy recomputes multi-sequence requests

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestRejected, naming the field and the limit, for what can never run."""
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise RequestRejected("invalid_param", "the prompt is empty", "prompt")
        vocab = self.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestRejected("invalid_param", f"prompt token id {bad} is outside the vocabulary [0, {vocab})",
                                  "prompt_token_ids")
        bad = next((t for t in params.stop_token_ids if t >= vocab), None)
        if bad is not None:
            raise RequestRejected("invalid_param", f"stop token id {bad} is outside the vocabulary [0, {vocab})",
                                  "stop_token_ids")
        limit = self.max_model_len
        if num_prompt >= limit:
            raise RequestRejected("prompt_too_long", f"the prompt has {num_prompt} tokens; max_model_len is {limit} "
                                  "(prompt and output together)", "prompt")
        if num_prompt + params.max_tokens > limit:
            raise RequestRejected("invalid_param", f"max_tokens={params.max_tokens} with a {num_prompt}-token prompt "
                                  f"exceeds max_model_len {limit}; at most {limit - num_prompt}", "max_tokens")
        if not self.chunked_prefill and num_prompt > self.max_num_batched_tokens:
            raise RequestRejected("prompt_too_long", f"the prompt has {num_prompt} tokens; without chunked prefill "
                                  f"at most max_num_batched_tokens={self.max_num_batched_tokens}", "prompt")
        self._check_fits_pool(num_prompt, params)

    def _check_fits_pool(self, num_prompt: int, params: SamplingParams) -> None:
        """A request must fit the whole pool alone, or it could preempt itself forever."""
        total = self.num_gpu_blocks
        if self.blocks_for(num_prompt + 1) > total:
            raise RequestRejected("prompt_too_long", f"the prompt needs {self.blocks_for(num_prompt + 1)} KV blocks; "
                                  f"the pool has {total}", "prompt")
        width = max(params.n, params.beam_width)
        need = (self.blocks_for(num_prompt + params.max_tokens)
                + (width - 1) * (self.blocks_for(params.max_tokens) + 1))
        if width > 1 and (self.recompute_groups or self.num_cpu_blocks < total):
            # A multi-sequence request that may be recomputed (by policy, or because swap space
            # smaller than the pool cannot hold it) comes back one sequence at a time, without
            # sharing, and must then fit the pool unshared.
            need = width * self.blocks_for(num_prompt + params.max_tokens)
        if need > total:
            raise RequestRejected("invalid_param", f"max_tokens={params.max_tokens} (x{width} sequences) needs {need} "
                                  f"KV blocks with this prompt; the pool has {total}", "max_tokens")

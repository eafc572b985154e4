"""Incremental, UTF-8-safe detokenization with stop strings; one instance per output sequence.

    token ids --(token stream)--> new text --(stop-string search)--> pending text --get_delta()--> client

The token stream emits text only once it forms whole characters. While the sequence runs, the last
(longest stop string - 1) characters stay pending: a stop string found later ends in newer text, so it
starts at most that many characters back, and the client never sees the beginning of a stop string that
is then cut. Once finished (stop string, stop token, length, abort), get_delta() flushes everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Prompt tokens replayed through a new stream so the first output token decodes in context (a leading
# space kept, a character begun in the prompt completed). A few cover byte-fallback runs.
_PROMPT_CONTEXT_TOKENS = 6

# tokenizers raises a plain Exception with this message when a decoder rewrites text it already emitted.
_INVALID_PREFIX = "Invalid prefix"


class IncrementalDetokenizer:
    """Turns one sequence's generated tokens into streamed text deltas and finds its stop strings.

    Per step: `update(ids)` (returns the stop string that ended the sequence, if any), then `finish()`
    if it ended for another reason, then `get_delta()`. Work per step is proportional to the new text.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
        skip_special_tokens: bool = True,
    ) -> None:
        """`tokenizer`: a transformers tokenizer or a `tokenizers.Tokenizer`."""
        self._tokens = _TokenStream(tokenizer, prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:], skip_special_tokens)
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._hold_back = max(0, max(map(len, self._stop), default=0) - 1)
        self._sent: list[str] = []  # text already returned by get_delta
        self._pending = ""  # text decoded but not yet returned
        self._finished = False
        self.num_output_tokens = 0

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def output_text(self) -> str:
        """All text so far, cut at the stop string; includes text still held back."""
        if len(self._sent) > 1:
            self._sent = ["".join(self._sent)]
        return "".join(self._sent) + self._pending

    def update(self, new_token_ids: Sequence[int], ends_with_stop_token: bool = False) -> str | None:
        """Append generated tokens; return the stop string they completed, which finishes the sequence.

        `ends_with_stop_token`: the last id is EOS or a stop_token_id, which also finishes it; its text
        is left out unless include_stop_str_in_output. Stop strings count only once more than min_tokens
        tokens exist; a match that began in earlier text is still found.
        """
        if self._finished:
            raise RuntimeError("update() on a finished sequence")
        self.num_output_tokens += len(new_token_ids)
        if ends_with_stop_token and not self._include_stop:
            new_token_ids = new_token_ids[:-1]
        new_text = self._tokens.extend(new_token_ids)
        self._pending += new_text
        matched = self._find_stop(len(new_text)) if self.num_output_tokens > self._min_tokens else None
        if ends_with_stop_token:
            self.finish()
        return matched

    def finish(self) -> None:
        """The sequence ended (for any reason): get_delta() now flushes. Token bytes that never formed a
        whole character come out as U+FFFD, as a plain decode of the ids would show them."""
        if not self._finished:
            self._pending += self._tokens.flush()
            self._finished = True

    def get_delta(self) -> str:
        """The text new since the previous call, less the held-back tail while unfinished."""
        cut = len(self._pending) if self._finished else len(self._pending) - self._hold_back
        if cut <= 0:
            return ""
        delta, self._pending = self._pending[:cut], self._pending[cut:]
        self._sent.append(delta)
        return delta

    def _find_stop(self, num_new_chars: int) -> str | None:
        """Cut the pending text at the stop string that completes first in the new text (of those
        completing at the same character, the longest) and finish; return it."""
        if not self._stop or not num_new_chars:
            return None
        text = self._pending
        new_start = len(text) - num_new_chars
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop in self._stop:
            start = text.find(stop, max(0, new_start - len(stop) + 1))
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is None:
            return None
        end, start, stop = best
        self._pending = text[: end if self._include_stop else start]
        self._finished = True
        return stop


class _TokenStream:
    """Token ids in, text out, never half a character: tokenizers' DecodeStream on the Rust backend,
    or `_PythonDecodeStream` (same contract, through `tokenizer.decode`) for tokenizers without one."""

    def __init__(self, tokenizer: Any, context_ids: Sequence[int], skip_special_tokens: bool) -> None:
        backend = _rust_backend(tokenizer)
        self._decoder = backend if backend is not None else tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = self._new_stream()
        self._last_emitting_id: int | None = None  # context for flush()
        self._undecoded: list[int] = []  # ids stepped since the stream last emitted text
        self.extend(context_ids)
        self._undecoded.clear()  # an unfinished prompt character is the prompt's, not the output's

    def _new_stream(self) -> Any:
        if isinstance(self._decoder, Tokenizer):
            return DecodeStream(skip_special_tokens=self._skip_special_tokens)
        return _PythonDecodeStream(self._skip_special_tokens)

    def extend(self, token_ids: Sequence[int]) -> str:
        # Runs for every streamed token: locals over attribute lookups, no call layer in the common case.
        text = ""
        undecoded, step, decoder = self._undecoded, self._stream.step, self._decoder
        for token_id in token_ids:
            undecoded.append(token_id)
            try:
                piece = step(decoder, token_id)
            except Exception as error:  # tokenizers raises a bare Exception
                piece = self._restart(error, token_id)
                step = self._stream.step
            if piece:
                text += piece
                self._last_emitting_id = token_id
                undecoded.clear()
        return text

    def _restart(self, error: Exception, token_id: int) -> str | None:
        if _INVALID_PREFIX not in str(error):
            raise error
        # The decoder changed text it had already emitted; carry on without context rather than fail
        # the request (the next token may lose a leading space).
        self._stream = self._new_stream()
        return self._stream.step(self._decoder, token_id)

    def flush(self) -> str:
        """The text of ids the stream is still holding (an incomplete character), decoded as is."""
        if not self._undecoded:
            return ""
        held, self._undecoded = self._undecoded, []
        context = [] if self._last_emitting_id is None else [self._last_emitting_id]
        head = self._decode(context)
        text = self._decode(context + held)
        return text[len(head):] if text.startswith(head) else self._decode(held)

    def _decode(self, token_ids: list[int]) -> str:
        return self._decoder.decode(token_ids, skip_special_tokens=self._skip_special_tokens)


class _PythonDecodeStream:
    """DecodeStream's contract for any tokenizer with `decode(ids, skip_special_tokens=...)`.

    Holds the ids of the last emitted chunk (the prefix) and those after it; emits the text that
    decoding them adds to the prefix's own text, once it does not end in U+FFFD (half a character)."""

    def __init__(self, skip_special_tokens: bool) -> None:
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._num_prefix_ids = 0
        self._prefix_text = ""

    def step(self, tokenizer: Any, token_id: int) -> str | None:
        self._ids.append(token_id)
        text = tokenizer.decode(self._ids, skip_special_tokens=self._skip_special_tokens)
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return None
        new_text = text[len(self._prefix_text):]
        self._ids = self._ids[self._num_prefix_ids:]
        self._num_prefix_ids = len(self._ids)
        self._prefix_text = tokenizer.decode(self._ids, skip_special_tokens=self._skip_special_tokens)
        return new_text


def _rust_backend(tokenizer: Any) -> Tokenizer | None:
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer (or the tokenizer itself)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None

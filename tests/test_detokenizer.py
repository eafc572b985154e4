"""Incremental detokenization: whole characters only, text equal to a plain decode, stop strings."""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from streampage.engine.detokenizer import IncrementalDetokenizer

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "你好，世界。我们一起学习中文。東京は日本の首都です。",
    "Emoji: 😀 🎉 🚀 👍🏽 ❤️ and accents: café, naïve, Übermaß.",
    "Stop strings like STOP, END and ### appear in text.",
]
SPECIAL_TOKENS = ["<eos>", "<bos>", "<|im_start|>"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-like byte-level BPE; its small vocabulary splits most multi-byte characters."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def llama_like() -> Tokenizer:
    """SentencePiece-style: '▁' for spaces, the first leading space stripped, byte-fallback tokens."""
    vocab = {f"<0x{byte:02X}>": byte for byte in range(256)}
    for piece in ["<s>", "</s>", "Hello", "▁Hello", "▁world", "!"]:
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return backend


class PythonOnlyTokenizer:
    """A tokenizer without a Rust backend: only `decode`, which forces the pure-Python stream."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self._tokenizer = tokenizer

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def encode_pieces(tokenizer: PreTrainedTokenizerFast, *pieces: str) -> list[list[int]]:
    """Token ids per piece: pieces become token boundaries (byte-level BPE adds no spaces)."""
    return [tokenizer.encode(piece, add_special_tokens=False) for piece in pieces]


def stream(detokenizer: IncrementalDetokenizer, steps: list[list[int]], finish: bool = True) -> list[str]:
    """Feed one update per step (until a stop string ends it) and collect every delta."""
    deltas = []
    for ids in steps:
        detokenizer.update(ids)
        deltas.append(detokenizer.get_delta())
        if detokenizer.finished:
            break
    if finish:
        detokenizer.finish()
        deltas.append(detokenizer.get_delta())
    return deltas


def one_token_per_step(ids: list[int]) -> list[list[int]]:
    return [[token_id] for token_id in ids]


# --- text equals a plain decode ------------------------------------------------------------------

@pytest.mark.parametrize("python_only", [False, True])
def test_deltas_concatenate_to_the_plain_decode_of_random_ids(tokenizer, python_only: bool) -> None:
    rng = random.Random(0)
    prompt = tokenizer.encode("The prompt: 你好 😀", add_special_tokens=False)
    source = PythonOnlyTokenizer(tokenizer) if python_only else tokenizer
    for _ in range(150):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 25))]
        steps, rest = [], list(ids)
        while rest:  # random step sizes: one token per step is the norm, several must work too
            size = rng.randint(1, 3)
            steps.append(rest[:size])
            rest = rest[size:]
        detokenizer = IncrementalDetokenizer(source, prompt)
        text = "".join(stream(detokenizer, steps))
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        assert detokenizer.output_text == text


@pytest.mark.parametrize("python_only", [False, True])
def test_valid_text_streams_without_replacement_characters(tokenizer, python_only: bool) -> None:
    text = "".join(CORPUS)
    ids = tokenizer.encode(text, add_special_tokens=False)
    # The test means something only if some tokens hold part of a character.
    assert any("\ufffd" in tokenizer.decode([token_id]) for token_id in ids)
    source = PythonOnlyTokenizer(tokenizer) if python_only else tokenizer
    deltas = stream(IncrementalDetokenizer(source, []), one_token_per_step(ids))
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == text


def test_byte_fallback_tokens_wait_for_the_whole_character(llama_like) -> None:
    emoji = list("😀".encode())  # byte-fallback ids equal the byte values here
    detokenizer = IncrementalDetokenizer(llama_like, [llama_like.token_to_id("Hello")])
    assert stream(detokenizer, one_token_per_step(emoji)) == ["", "", "", "😀", ""]


def test_the_first_output_token_decodes_in_the_prompt_context(llama_like) -> None:
    # Alone, "▁world" decodes to "world" (a leading space is stripped); after the prompt it is " world".
    world = llama_like.token_to_id("▁world")
    assert llama_like.decode([world]) == "world"
    prompt = [llama_like.token_to_id("<s>"), llama_like.token_to_id("Hello")]
    assert "".join(stream(IncrementalDetokenizer(llama_like, prompt), [[world]])) == " world"


def test_an_unfinished_character_at_the_end_is_flushed_as_a_plain_decode_shows_it(tokenizer) -> None:
    ids = tokenizer.encode("ok 🦀", add_special_tokens=False)  # not in the corpus: split in bytes
    cut = next(i for i in range(len(ids), 0, -1) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    deltas = stream(detokenizer, one_token_per_step(ids[:cut]), finish=False)
    assert "".join(deltas).rstrip() == "ok"  # the space may share a token with the emoji's first byte
    detokenizer.finish()
    assert "".join([*deltas, detokenizer.get_delta()]) == tokenizer.decode(ids[:cut])


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_are_skipped_unless_asked_for(tokenizer, skip: bool) -> None:
    eos = tokenizer.convert_tokens_to_ids("<eos>")
    hello, world = encode_pieces(tokenizer, "Hello", " world")
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
    text = "".join(stream(detokenizer, one_token_per_step([*hello, eos, *world])))
    assert text == ("Hello world" if skip else "Hello<eos> world")


# --- stop strings --------------------------------------------------------------------------------

def run_stop(tokenizer, pieces: list[str], stop: list[str], **kwargs) -> tuple[str | None, str, list[str]]:
    """Stream `pieces` (one token boundary each, one token per step); return the matched stop string,
    the output text and the deltas."""
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=stop, **kwargs)
    matched = None
    deltas = []
    for ids in encode_pieces(tokenizer, *pieces):
        for step in one_token_per_step(ids):
            matched = detokenizer.update(step)
            deltas.append(detokenizer.get_delta())
            if matched:
                assert detokenizer.finished
                return matched, detokenizer.output_text, deltas
    detokenizer.finish()
    deltas.append(detokenizer.get_delta())
    return matched, detokenizer.output_text, deltas


@pytest.mark.parametrize(
    ("pieces", "stop", "matched", "text"),
    [
        (["Hello wo", "rld. Bye"], ["world"], "world", "Hello "),  # spans a token boundary
        (["Hello world"], ["Hel"], "Hel", ""),  # at the very start
        (["xxab", "yyab"], ["ab"], "ab", "xx"),  # repeated: the first one ends it
        (["abcd"], ["bcd", "abc"], "abc", ""),  # overlapping: the one completing first wins
        (["ab", "cd"], ["bcd", "abc"], "abc", ""),
        (["abc"], ["c", "abc"], "abc", ""),  # completing together: the longest
        (["wo", "rld!", " more"], ["rl"], "rl", "wo"),  # text after the stop in the same token is cut
        (["nothing here"], ["STOP"], None, "nothing here"),
    ],
)
def test_stop_strings(tokenizer, pieces, stop, matched, text) -> None:
    found, output_text, deltas = run_stop(tokenizer, pieces, stop)
    assert (found, output_text) == (matched, text)
    assert "".join(deltas) == text


def test_include_stop_str_in_output_keeps_it_and_cuts_after_it(tokenizer) -> None:
    found, text, deltas = run_stop(tokenizer, ["Hello wo", "rld. Bye"], ["world"], include_stop_str_in_output=True)
    assert (found, text, "".join(deltas)) == ("world", "Hello world", "Hello world")


def test_stop_strings_wait_for_more_than_min_tokens(tokenizer) -> None:
    a, b, c = (ids[0] for ids in encode_pieces(tokenizer, "a", "b", "c"))
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["a"], min_tokens=3)
    assert [detokenizer.update([t]) for t in (a, b, c)] == [None, None, None]  # 3 tokens: not yet
    assert detokenizer.update([a]) == "a"
    assert detokenizer.output_text == "abc"


def test_a_stop_string_begun_before_min_tokens_is_found_after(tokenizer) -> None:
    x, y, z = (ids[0] for ids in encode_pieces(tokenizer, "x", "y", "z"))
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["xyz"], min_tokens=2)
    assert [detokenizer.update([t]) for t in (x, y, z)] == [None, None, "xyz"]
    assert detokenizer.output_text == ""


def test_the_start_of_a_possible_stop_string_is_held_back_then_flushed(tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["STOP"])
    deltas = []
    for piece in ["Hello", " ST", "ay"]:
        for token_id in tokenizer.encode(piece, add_special_tokens=False):
            assert detokenizer.update([token_id]) is None
        deltas.append(detokenizer.get_delta())
    # len("STOP") - 1 = 3 characters stay back, so the client never sees "ST" before it is clear
    # that no "STOP" follows.
    assert deltas == ["He", "llo", " S"]
    assert detokenizer.output_text == "Hello STay"
    detokenizer.finish()
    assert detokenizer.get_delta() == "Tay"
    assert detokenizer.get_delta() == ""


def test_a_stop_token_ends_the_text_without_its_own_text(tokenizer) -> None:
    hello, bang = encode_pieces(tokenizer, "Hello", "!")
    for include, expected in ((False, "Hello"), (True, "Hello!")):
        detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["zz"], include_stop_str_in_output=include)
        for token_id in hello:
            detokenizer.update([token_id])
        assert detokenizer.update(bang, ends_with_stop_token=True) is None
        assert detokenizer.finished
        assert detokenizer.get_delta() == expected  # the held-back tail is flushed too


def test_update_after_the_end_is_refused(tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["a"])
    assert detokenizer.update(encode_pieces(tokenizer, "a")[0]) == "a"
    with pytest.raises(RuntimeError, match="finished"):
        detokenizer.update([1])


def test_a_decoder_error_on_an_old_prefix_restarts_the_stream(tokenizer) -> None:
    class BrokenStream:
        def step(self, tokenizer, token_id):
            raise Exception("Invalid prefix encountered while decoding stream")  # as tokenizers does

    detokenizer = IncrementalDetokenizer(tokenizer, [])
    detokenizer._tokens._stream = BrokenStream()
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    assert "".join(stream(detokenizer, one_token_per_step(ids))) == "Hello world"

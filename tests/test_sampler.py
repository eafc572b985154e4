"""The sampler: what each knob lets through, exact penalty formulas, seeds, samples and log-probs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from streampage.model.sampler import (
    SamplingMetadata,
    apply_banned_tokens,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    param_row,
    sample,
)
from streampage.sampling_params import SamplingParams

# Probabilities 0.5, 0.3, 0.15, 0.05 on a four-token vocabulary: supports are easy to reason about.
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def build(params: list[SamplingParams], **kwargs) -> SamplingMetadata:
    return SamplingMetadata.build(params, device="cpu", **kwargs)


def draw_counts(logits: torch.Tensor, params: SamplingParams, draws: int = 20000, **kwargs) -> torch.Tensor:
    """Token frequencies of `draws` samples from one row (num_samples draws them in one call)."""
    generator = torch.Generator().manual_seed(1234)
    meta = build([params], num_samples=[draws], generators={0: generator}, **kwargs)
    tokens = torch.tensor(sample(logits.unsqueeze(0), meta).token_ids[0])
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / draws


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


# --- greedy --------------------------------------------------------------------------------------

def test_greedy_equals_argmax() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    meta = build([SamplingParams(temperature=0.0)] * 6)
    assert meta.all_greedy
    out = sample(logits, meta)
    assert out.token_ids == [[t] for t in logits.argmax(dim=-1).tolist()]


def test_greedy_rows_in_a_mixed_batch_take_argmax() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_k=5, top_p=0.7, min_p=0.1)] * 2
    out = sample(logits, build(params))
    assert out.token_ids[0] == [int(logits[0].argmax())]
    assert out.token_ids[2] == [int(logits[2].argmax())]


def test_sampling_leaves_the_input_logits_untouched() -> None:
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(2))
    before = logits.clone()
    params = [SamplingParams(temperature=0.8, top_p=0.5, repetition_penalty=1.5), SamplingParams(temperature=0.0)]
    sample(logits, build(params, prompt_token_ids=[[1, 2], [3]], output_token_ids=[[4], []],
                         banned_token_ids=[[0], [1]]))
    assert torch.equal(logits, before)


# --- temperature, min-p, top-k, top-p ------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_follows_softmax_of_scaled_logits(temperature: float) -> None:
    frequencies = draw_counts(LOGITS, SamplingParams(temperature=temperature))
    expected = (LOGITS / temperature).softmax(dim=-1)
    torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability() -> None:
    logits = LOGITS.clone().unsqueeze(0)
    apply_min_p(logits, torch.tensor([0.2]))  # threshold 0.2 * 0.5 = 0.1: drops only 0.05
    assert kept(logits[0]) == {0, 1, 2}


def test_min_p_matches_its_probability_definition() -> None:
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(3)) * 3
    min_p = torch.linspace(0.0, 0.9, 8)
    probs = logits.softmax(dim=-1)
    expected = probs >= min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    apply_min_p(logits, min_p)
    assert torch.equal(torch.isfinite(logits), expected)


def test_min_p_applies_after_temperature() -> None:
    # T = 2 flattens to probabilities ~ [0.37, 0.29, 0.2, 0.12]; min_p 0.4 keeps tokens >= 0.148.
    frequencies = draw_counts(LOGITS, SamplingParams(temperature=2.0, min_p=0.4))
    scaled = (LOGITS / 2).softmax(dim=-1)
    assert frequencies[3] == 0
    torch.testing.assert_close(frequencies[:3], scaled[:3] / scaled[:3].sum(), atol=0.015, rtol=0)


@pytest.mark.parametrize(
    ("top_k", "support"), [(1, {0}), (2, {0, 1}), (3, {0, 1, 2}), (0, {0, 1, 2, 3}), (9, {0, 1, 2, 3})]
)
def test_top_k_keeps_the_k_most_likely(top_k: int, support: set[int]) -> None:
    logits = LOGITS.clone().unsqueeze(0)
    apply_top_k_top_p(logits, torch.tensor([top_k]), None)
    assert kept(logits[0]) == support


@pytest.mark.parametrize(("top_p", "support"), [(0.4, {0}), (0.75, {0, 1}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_the_mass(top_p: float, support: set[int]) -> None:
    logits = LOGITS.clone().unsqueeze(0)
    apply_top_k_top_p(logits, None, torch.tensor([top_p]))
    assert kept(logits[0]) == support


def test_top_p_renormalises_after_top_k() -> None:
    # Top 2 renormalised: 0.625 / 0.375; p = 0.6 keeps only the first, p = 0.7 both.
    logits = LOGITS.repeat(2, 1)
    apply_top_k_top_p(logits, torch.tensor([2, 2]), torch.tensor([0.6, 0.7]))
    assert kept(logits[0]) == {0}
    assert kept(logits[1]) == {0, 1}


def reference_support(logits: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Top-k then top-p for one row, written the slow and obvious way."""
    order = logits.argsort(descending=True).tolist()
    if top_k:
        order = order[:top_k]
    probs = logits[order].softmax(dim=-1).tolist()
    support, mass = set(), 0.0
    for token, p in zip(order, probs, strict=True):
        support.add(token)
        mass += p
        if mass >= top_p:
            break
    return support


def test_top_k_top_p_match_a_reference_on_random_rows() -> None:
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(32, 64, generator=generator) * 2
    top_k = torch.randint(0, 20, (32,), generator=generator)
    top_p = torch.rand(32, generator=generator) * 0.95 + 0.05
    expected = [reference_support(row, int(k), float(p)) for row, k, p in zip(logits, top_k, top_p, strict=True)]
    apply_top_k_top_p(logits, top_k, top_p)
    assert [kept(row) for row in logits] == expected


@pytest.mark.parametrize(
    ("params", "support"),
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.75), {0, 1}),
        (SamplingParams(top_k=3, top_p=0.99), {0, 1, 2}),
        (SamplingParams(min_p=0.2), {0, 1, 2}),
    ],
)
def test_sampled_tokens_stay_in_the_support(params: SamplingParams, support: set[int]) -> None:
    frequencies = draw_counts(LOGITS, params, draws=5000)
    assert set(frequencies.nonzero().flatten().tolist()) == support


def test_top_k_samples_in_proportion_to_the_kept_probabilities() -> None:
    frequencies = draw_counts(LOGITS, SamplingParams(top_k=2))
    torch.testing.assert_close(frequencies, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)


# --- penalties and bans --------------------------------------------------------------------------

def test_penalties_follow_the_formulas() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),  # no penalty: untouched
    ]
    meta = build(params, prompt_token_ids=[[0, 1, 1], [0]], output_token_ids=[[2, 3, 2, 2], [1]])
    assert meta.penalty_rows == [0]
    expected = logits.clone()
    # Repetition over prompt + output tokens {0, 1, 2, 3}: positive / 2, negative * 2.
    expected[0, :4] = torch.tensor([2.0 / 2, -1.0 * 2, 0.5 / 2, -3.0 * 2])
    # Frequency (count) and presence (once) over output tokens only: 2 thrice, 3 once.
    expected[0, 2] -= 0.5 * 3 + 0.25
    expected[0, 3] -= 0.5 * 1 + 0.25
    apply_penalties(logits, meta)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_negative_presence_and_frequency_raise_logits() -> None:
    logits = torch.zeros(1, 4)
    meta = build([SamplingParams(frequency_penalty=-1.0, presence_penalty=-0.5)],
                 prompt_token_ids=[[3]], output_token_ids=[[1, 1]])
    apply_penalties(logits, meta)
    torch.testing.assert_close(logits, torch.tensor([[0.0, 2.5, 0.0, 0.0]]))


def test_greedy_rows_see_penalties() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    meta = build([SamplingParams(temperature=0.0, repetition_penalty=2.0)],
                 prompt_token_ids=[[0]], output_token_ids=[[]])
    assert sample(logits, meta).token_ids == [[1]]


def test_banned_tokens_are_minus_infinity_and_out_of_vocabulary_ids_are_ignored() -> None:
    logits = torch.zeros(2, 5)
    meta = build([SamplingParams(), SamplingParams()], banned_token_ids=[[1, 4, 99], []])
    apply_banned_tokens(logits, meta)
    assert kept(logits[0]) == {0, 2, 3}
    assert kept(logits[1]) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_banned_tokens_never_appear(temperature: float) -> None:
    logits = torch.tensor([10.0, 1.0, 1.0, 1.0])  # token 0 would win almost always
    frequencies = draw_counts(logits, SamplingParams(temperature=temperature), draws=3000,
                              banned_token_ids=[[0, 2]])
    assert frequencies[0] == 0 and frequencies[2] == 0


# --- seeds, parallel samples, log-probabilities --------------------------------------------------

CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
)


def seeded_tokens(
    seed: int, logits_rows: list[torch.Tensor], others: int, position: int, device: str = "cpu"
) -> list[list[int]]:
    """Tokens of a seeded row over several steps, placed at `position` among `others` other rows."""
    generator = torch.Generator(device=device).manual_seed(seed)
    other_generator = torch.Generator(device=device).manual_seed(seed + 1)
    tokens = []
    for step_logits in logits_rows:
        params = [SamplingParams(temperature=1.0, top_p=0.95)] * (others + 1)
        batch = torch.randn(others + 1, step_logits.shape[-1])
        batch[position] = step_logits
        generators = {position: generator}
        if others:
            generators[(position + 1) % (others + 1)] = other_generator  # a second seeded neighbour
        meta = SamplingMetadata.build(params, device=device, generators=generators)
        tokens.append(sample(batch.to(device), meta).token_ids[position])
    return tokens


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_seeded_rows_reproduce_whatever_the_batch(device: str) -> None:
    steps = [torch.randn(1000, generator=torch.Generator().manual_seed(s)) for s in range(5)]
    alone = seeded_tokens(7, steps, others=0, position=0, device=device)
    assert seeded_tokens(7, steps, others=0, position=0, device=device) == alone
    assert seeded_tokens(7, steps, others=5, position=3, device=device) == alone
    assert seeded_tokens(7, steps, others=9, position=9, device=device) == alone
    assert seeded_tokens(8, steps, others=0, position=0, device=device) != alone


def test_seeded_parallel_samples_reproduce() -> None:
    logits = torch.randn(3, 1000)
    params = [SamplingParams(n=4, seed=5), SamplingParams(), SamplingParams(temperature=0.0)]

    def run() -> list[int]:
        meta = build(params, generators={0: torch.Generator().manual_seed(5)}, num_samples=[4, 1, 1])
        return sample(logits, meta).token_ids[0]

    assert run() == run()


def test_num_samples_gives_that_many_tokens_per_row() -> None:
    logits = torch.randn(3, 40)
    params = [SamplingParams(n=3), SamplingParams(temperature=0.0, n=2), SamplingParams()]
    out = sample(logits, build(params, num_samples=[3, 2, 1]))
    assert [len(tokens) for tokens in out.token_ids] == [3, 2, 1]
    assert [len(lps) for lps in out.logprobs] == [3, 2, 1]
    assert out.token_ids[1] == [int(logits[1].argmax())] * 2


def test_logprobs_are_raw_log_softmax() -> None:
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 30, generator=generator)
    params = [
        SamplingParams(temperature=0.3, logprobs=5, repetition_penalty=1.8, frequency_penalty=1.0),
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=3, logprobs=2),
    ]
    meta = build(params, prompt_token_ids=[[0, 1], [], []], output_token_ids=[[2], [], []],
                 banned_token_ids=[[], [int(logits[1].argmax())], []], num_samples=[2, 1, 1])
    out = sample(logits, meta)
    raw = logits.log_softmax(dim=-1)
    for row, (tokens, lps) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert lps == pytest.approx([raw[row, t].item() for t in tokens], abs=1e-5)
    assert out.top_logprobs[1] is None
    for row, n in ((0, 5), (2, 2)):
        top = raw[row].topk(n)
        assert out.top_logprobs[row].token_ids == top.indices.tolist()
        assert out.top_logprobs[row].logprobs == pytest.approx(top.values.tolist(), abs=1e-5)


def test_beam_rows_are_greedy_and_ask_for_twice_the_width() -> None:
    meta = build([SamplingParams(beam_width=3, temperature=1.0), SamplingParams(logprobs=4)])
    assert meta.temperature.tolist() == [0.0, 1.0]
    assert meta.num_logprobs == [6, 4]


def test_build_flags_skip_unused_stages() -> None:
    meta = build([SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.5), SamplingParams()])
    assert (meta.use_top_p, meta.max_top_k, meta.use_min_p) == (False, 0, False)  # greedy rows only
    assert not meta.all_greedy and not meta.all_random
    assert meta.penalty_rows == [] and meta.banned_rows == []
    meta = build([SamplingParams(top_k=7), SamplingParams(top_k=3, top_p=0.9, min_p=0.1)])
    assert (meta.use_top_p, meta.max_top_k, meta.use_min_p, meta.all_random) == (True, 7, True, True)


def test_penalties_without_token_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="prompt_token_ids"):
        build([SamplingParams(presence_penalty=1.0)])


def test_an_empty_batch_samples_nothing() -> None:
    out = sample(torch.empty(0, 10), build([]))
    assert out.token_ids == [] and out.logprobs == [] and out.top_logprobs == []


def test_large_vocabulary_rows_stay_finite() -> None:
    # Extreme temperature and logits must not produce nan (which argmax would pick).
    logits = torch.full((2, 5000), -1e4)
    logits[:, 123] = 50.0
    out = sample(logits, build([SamplingParams(temperature=0.01), SamplingParams(temperature=100.0, top_p=0.1)]))
    assert out.token_ids[0] == [123]
    assert all(math.isfinite(lp) for row in out.logprobs for lp in row)


def test_packed_param_rows_build_the_same_metadata_as_params():
    """The runner keeps each request's packed row (`param_row`) and builds from those: every field
    matches a build from the params themselves."""
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05),
              SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.2, logprobs=3),
              SamplingParams(beam_width=3, max_tokens=4)]
    tokens = {"prompt_token_ids": [[1, 2]] * 4, "output_token_ids": [[3]] * 4}
    expected = SamplingMetadata.build(params, device="cpu", **tokens)
    got = SamplingMetadata.build(params, device="cpu", param_rows=[param_row(p) for p in params], **tokens)
    for field in dataclasses.fields(SamplingMetadata):
        want, have = getattr(expected, field.name), getattr(got, field.name)
        if isinstance(want, torch.Tensor):
            assert torch.equal(have, want), field.name
        else:
            assert have == want, field.name

"""Workloads: exact and bounded lengths, the ShareGPT-like distribution, shared prefixes, seeding."""

import itertools

import numpy as np
import pytest

from loadtest.workloads import SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL, WorkloadConfig, generate


def _take(config, n, seed_offset=0):
    return list(itertools.islice(generate(config, seed_offset), n))


def test_fixed_lengths_are_exact():
    for spec in _take(WorkloadConfig("fixed", input_len=33, output_len=7, range_ratio=0.5), 50):
        assert (len(spec.prompt_token_ids), spec.max_tokens) == (33, 7)


def test_random_lengths_stay_in_range_and_ids_below_vocab_limit():
    config = WorkloadConfig("random", input_len=100, output_len=40, range_ratio=0.25, vocab_limit=50)
    specs = _take(config, 500)
    prompt_lens = [len(s.prompt_token_ids) for s in specs]
    assert min(prompt_lens) >= 75 and max(prompt_lens) <= 125 and len(set(prompt_lens)) > 20
    assert all(30 <= s.max_tokens <= 50 for s in specs)
    assert all(0 <= t < 50 for s in specs for t in s.prompt_token_ids)


def test_sharegpt_like_lengths_match_the_paper_means_and_are_long_tailed():
    specs = _take(WorkloadConfig("sharegpt", vocab_limit=100), 20000)
    prompt = np.array([len(s.prompt_token_ids) for s in specs])
    output = np.array([s.max_tokens for s in specs])
    assert prompt.mean() == pytest.approx(161.31, rel=0.05)
    assert output.mean() == pytest.approx(337.99, rel=0.05)
    assert np.median(output) < 0.8 * output.mean()       # long tail: the mean sits well above the median
    assert prompt.min() >= 4 and prompt.max() <= SHAREGPT_MAX_PROMPT
    assert (prompt + output).max() <= SHAREGPT_MAX_TOTAL


def test_shared_prefix_prompts_start_with_one_of_the_prefixes():
    config = WorkloadConfig("prefix", input_len=8, output_len=4, prefix_len=32, num_prefixes=3)
    specs = _take(config, 60)
    prefixes = {tuple(s.prompt_token_ids[:32]) for s in specs}
    assert len(prefixes) == 3
    assert all(len(s.prompt_token_ids) == 40 for s in specs)
    assert len({tuple(s.prompt_token_ids[32:]) for s in specs}) == 60


def test_same_seed_same_stream_other_seed_other_stream():
    config = WorkloadConfig("random", range_ratio=0.5, seed=3)
    assert _take(config, 20) == _take(config, 20)
    assert _take(config, 20) != _take(WorkloadConfig("random", range_ratio=0.5, seed=4), 20)
    assert _take(config, 20) != _take(config, 20, seed_offset=1)


@pytest.mark.parametrize("kind", ["random", "sharegpt", "prefix"])
def test_each_point_sends_the_same_lengths_with_its_own_tokens(kind):
    """A sweep's points (and a warm-up given another salt, even salt 1 against point 1) share lengths
    and prefix choices, never token ids: no prompt of one is a cached prefix for the next."""
    config = WorkloadConfig(kind, input_len=40, output_len=9, range_ratio=0.5, prefix_len=16, num_prefixes=2,
                            vocab_limit=1000, seed=5)
    first = list(itertools.islice(generate(config, point=0), 30))
    second = list(itertools.islice(generate(config, point=1), 30))
    warm_up = list(itertools.islice(generate(WorkloadConfig(**{**config.__dict__, "token_salt": 1000})), 30))
    salt_one = list(itertools.islice(generate(WorkloadConfig(**{**config.__dict__, "token_salt": 1})), 30))
    assert first == list(itertools.islice(generate(config, point=0), 30))
    for other in (second, warm_up, salt_one):
        assert [(len(a.prompt_token_ids), a.max_tokens) for a in first] == [
            (len(b.prompt_token_ids), b.max_tokens) for b in other]
        assert not {tuple(a.prompt_token_ids[:16]) for a in first} & {tuple(b.prompt_token_ids[:16]) for b in other}
    assert not {tuple(a.prompt_token_ids[:16]) for a in second} & {tuple(b.prompt_token_ids[:16]) for b in salt_one}


@pytest.mark.parametrize("bad", [dict(kind="nope"), dict(input_len=0), dict(range_ratio=1.0),
                                 dict(num_prefixes=0), dict(vocab_limit=1), dict(token_salt=-1)])
def test_invalid_workloads_are_refused(bad):
    with pytest.raises(ValueError):
        WorkloadConfig(**bad)

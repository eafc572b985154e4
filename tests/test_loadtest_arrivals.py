"""Arrival processes: mean rate, burstiness as gamma shape, and seeded determinism."""

import itertools
import math

import numpy as np
import pytest

from loadtest.arrivals import arrival_offsets


def _gaps(rate, burstiness=1.0, seed=0, n=20000):
    offsets = np.array(list(itertools.islice(arrival_offsets(rate, burstiness, seed), n)))
    assert offsets[0] == 0.0
    return np.diff(offsets)


def test_poisson_arrivals_have_the_requested_mean_rate():
    gaps = _gaps(rate=10.0)
    assert 1 / gaps.mean() == pytest.approx(10.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)   # exponential gaps


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 2.0, 4.0])
def test_burstiness_keeps_the_rate_and_sets_the_spread(burstiness):
    gaps = _gaps(rate=4.0, burstiness=burstiness)
    assert gaps.mean() == pytest.approx(0.25, rel=0.04)
    # gamma gaps with shape k: coefficient of variation 1 / sqrt(k)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_limits_constant_spacing_and_all_at_once():
    assert _gaps(rate=5.0, burstiness=math.inf, n=10) == pytest.approx([0.2] * 9)
    assert list(_gaps(rate=math.inf, n=10)) == [0.0] * 9


def test_seeded_arrivals_repeat_and_seeds_differ():
    assert list(_gaps(3.0, seed=7, n=50)) == list(_gaps(3.0, seed=7, n=50))
    assert list(_gaps(3.0, seed=7, n=50)) != list(_gaps(3.0, seed=8, n=50))


def test_invalid_rate_or_burstiness_is_refused():
    with pytest.raises(ValueError, match="request rate"):
        next(arrival_offsets(0.0))
    with pytest.raises(ValueError, match="burstiness"):
        next(arrival_offsets(1.0, burstiness=-1.0))

"""Pickers: tie spreading, fallback order, randomness, weighted-random frequencies."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from epp.scheduling.loadguard import LoadGuard
from epp.scheduling.pickers import MaxScorePicker, RandomPicker, WeightedRandomPicker
from epp.scheduling.registry import BuildContext
from epp.scheduling.saturation import SaturationDetector
from tests.scheduling.util import cycle, ep


def ctx(seed: int = 0) -> BuildContext:
    return BuildContext(rng=random.Random(seed), detector=SaturationDetector(), guard=LoadGuard())


EPS = [ep(i) for i in range(1, 5)]


def test_max_score_takes_the_best():
    p = MaxScorePicker("p", 1, ctx())
    assert p.pick(cycle(), EPS, [0.1, 2.5, 2.4, 0.0]) == [EPS[1]]


def test_max_score_spreads_ties():
    p = MaxScorePicker("p", 1, ctx())
    counts = Counter(p.pick(cycle(), EPS, [3.0, 3.0, 1.0, 3.0])[0].address for _ in range(3000))
    assert set(counts) == {EPS[0].address, EPS[1].address, EPS[3].address}
    assert min(counts.values()) > 800  # each of three ties ~1000


def test_max_score_near_equal_sums_tie():
    p = MaxScorePicker("p", 1, ctx())
    a = 0.1 + 0.2  # 0.30000000000000004
    picked = {p.pick(cycle(), EPS[:2], [a, 0.3])[0].address for _ in range(200)}
    assert picked == {EPS[0].address, EPS[1].address}


def test_max_score_fallbacks_in_score_order():
    p = MaxScorePicker("p", 3, ctx())
    assert p.pick(cycle(), EPS, [0.5, 3.0, 1.0, 2.0]) == [EPS[1], EPS[3], EPS[2]]


def test_max_score_fallbacks_shuffle_ties():
    p = MaxScorePicker("p", 2, ctx())
    firsts = Counter(p.pick(cycle(), EPS, [1.0, 1.0, 1.0, 0.0])[0].address for _ in range(600))
    assert len(firsts) == 3
    for _ in range(50):
        got = p.pick(cycle(), EPS, [1.0, 1.0, 1.0, 0.0])
        assert len(got) == 2 and EPS[3] not in got and got[0] is not got[1]


def test_random_picker_is_uniform_and_distinct():
    p = RandomPicker("p", 2, ctx())
    counts: Counter[str] = Counter()
    for _ in range(2000):
        got = p.pick(cycle(), EPS, [9.0, 0.0, 0.0, 0.0])
        assert len(got) == 2 and got[0] is not got[1]
        counts[got[0].address] += 1
    assert min(counts.values()) > 350  # ~500 each


def test_weighted_random_frequencies_converge():
    p = WeightedRandomPicker("p", 1, ctx(7))
    scores = [1.0, 2.0, 3.0, 0.0]
    n = 12000
    counts = Counter(p.pick(cycle(), EPS, scores)[0].address for _ in range(n))
    assert counts[EPS[3].address] == 0
    for i, s in enumerate(scores[:3]):
        expected = n * s / 6.0
        assert abs(counts[EPS[i].address] - expected) < 0.06 * n, (i, counts)


def test_weighted_random_all_zero_is_uniform():
    p = WeightedRandomPicker("p", 1, ctx())
    counts = Counter(p.pick(cycle(), EPS, [0.0] * 4)[0].address for _ in range(2000))
    assert len(counts) == 4 and min(counts.values()) > 350


def test_weighted_random_fallbacks_put_zero_scores_last():
    p = WeightedRandomPicker("p", 4, ctx())
    for _ in range(100):
        got = p.pick(cycle(), EPS, [0.0, 1.0, 0.0, 5.0])
        assert set(got[:2]) == {EPS[1], EPS[3]} and len(set(got)) == 4


@settings(max_examples=80)
@given(scores=st.lists(st.floats(0, 10), min_size=1, max_size=12), n=st.integers(1, 5), seed=st.integers(0, 99),
       kind=st.sampled_from([MaxScorePicker, RandomPicker, WeightedRandomPicker]))
def test_picks_only_from_candidates(scores, n, seed, kind):
    eps = [ep(i) for i in range(1, len(scores) + 1)]
    got = kind("p", n, ctx(seed)).pick(cycle(), eps, scores)
    assert 1 <= len(got) == min(n, len(eps))
    assert len({id(e) for e in got}) == len(got)
    assert all(any(e is c for c in eps) for e in got)
    if kind is MaxScorePicker:
        assert scores[eps.index(got[0])] >= max(scores) - 1e-9


@given(weights=st.lists(st.floats(0.1, 5), min_size=2, max_size=4))
@settings(max_examples=10, deadline=None)
def test_weighted_random_converges_property(weights):
    eps = [ep(i) for i in range(1, len(weights) + 1)]
    p = WeightedRandomPicker("p", 1, ctx(3))
    n = 4000
    counts = Counter(p.pick(cycle(), eps, weights)[0].address for _ in range(n))
    total = sum(weights)
    for e, w in zip(eps, weights, strict=True):
        assert abs(counts[e.address] / n - w / total) < 0.05

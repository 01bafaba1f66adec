"""Load guard: which endpoints lose their affinity bonus."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from epp.scheduling.loadguard import LoadGuard
from tests.scheduling.util import cycle, endpoints, ep


def test_queue_gap():
    g = LoadGuard(queue_gap=5, inflight_gap=0)
    eps = [ep(1, waiting=2), ep(2, waiting=7), ep(3, waiting=6), ep(4, waiting=30, age=10)]
    assert g.apply(cycle(), eps, [1.0, 1.0, 1.0, 1.0]) == [1.0, 0.0, 1.0, 1.0]  # stale: queue unknown


def test_inflight_gap_and_ratio():
    g = LoadGuard(queue_gap=0, inflight_gap=4, inflight_ratio=1.5)
    eps = [ep(1, inflight=10), ep(2, inflight=14), ep(3, inflight=15), ep(4, inflight=13)]
    # 14: gap 4 but 14 < 15 = 1.5 × 10; 15: both → overloaded; 13: gap 3
    assert g.apply(cycle(), eps, [0.5, 0.5, 0.5, 0.5]) == [0.5, 0.5, 0.0, 0.5]
    idle = [ep(1), ep(2, inflight=4)]
    assert g.apply(cycle(), idle, [1.0, 1.0]) == [1.0, 0.0]


def test_disabled_and_single_endpoint():
    eps = [ep(1), ep(2, waiting=100, inflight=100)]
    assert LoadGuard(enabled=False).apply(cycle(), eps, [1.0, 1.0]) == [1.0, 1.0]
    assert LoadGuard().apply(cycle(), eps[1:], [1.0]) == [1.0]


@settings(max_examples=100)
@given(eps=endpoints(min_size=1, max_size=10), data=st.data(), qgap=st.sampled_from([0, 1, 5]),
       igap=st.sampled_from([0, 2, 16]), ratio=st.sampled_from([1.0, 1.5, 3.0]))
def test_apply_agrees_with_overloaded(eps, data, qgap, igap, ratio):
    g = LoadGuard(queue_gap=qgap, inflight_gap=igap, inflight_ratio=ratio)
    scores = data.draw(st.lists(st.sampled_from([0.0, 0.25, 1.0]), min_size=len(eps), max_size=len(eps)))
    c = cycle()
    out = g.apply(c, eps, list(scores))
    for i, (before, after) in enumerate(zip(scores, out, strict=True)):
        assert after == (0.0 if before > 0 and g.overloaded(c, eps, i) else before)

"""Saturation detector and admission (shedding)."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from epp.resources import CRITICAL_PRIORITY
from epp.scheduling.admission import Admission
from epp.scheduling.saturation import SaturationDetector
from tests.scheduling.util import endpoints, ep, req


def test_pod_saturation_rules():
    d = SaturationDetector()
    assert not d.pod_saturated(ep(1, waiting=4, kv=0.79), time.monotonic())
    assert d.pod_saturated(ep(1, waiting=5), time.monotonic())
    assert d.pod_saturated(ep(1, kv=0.8), time.monotonic())
    assert d.pod_saturated(ep(1, age=5), time.monotonic())  # older than 200 ms
    assert d.pod_saturated(ep(1, metrics=False), time.monotonic())
    assert d.pod_saturated(ep(1, scrape_ok=False), time.monotonic())


def test_pool_saturation_is_mean_of_pod_loads():
    d = SaturationDetector()
    eps = [ep(1, waiting=10), ep(2, kv=0.4), ep(3, age=5), ep(4, waiting=1, kv=0.4)]
    # max(q/5, kv/0.8): 2.0, 0.5, stale 1.0, max(0.2, 0.5) = 0.5
    assert d.pool_saturation(eps, time.monotonic()) == (2.0 + 0.5 + 1.0 + 0.5) / 4
    assert d.pool_saturation([], time.monotonic()) == 0.0


def test_thresholds_configurable():
    d = SaturationDetector(queue_threshold=10, kv_threshold=0.5, stale_after=60)
    assert d.pod_load(ep(1, waiting=5, kv=0.1), time.monotonic()) == 0.5
    assert d.pod_load(ep(1, kv=0.5), time.monotonic()) == 1.0
    assert not d.pod_saturated(ep(1, age=30), time.monotonic())


def test_sheds_sheddable_when_saturated():
    a = Admission(SaturationDetector())
    eps = [ep(1, waiting=10), ep(2, kv=0.9)]
    reason = a.check(req(priority=-1), eps, time.monotonic())
    assert reason is not None and "saturated" in reason
    assert a.check(req(priority=0), eps, time.monotonic()) is None
    assert a.check(req(priority=CRITICAL_PRIORITY), eps, time.monotonic()) is None
    assert a.saturation(eps, time.monotonic()) > 1.0


def test_no_shedding_with_headroom():
    a = Admission(SaturationDetector())
    assert a.check(req(priority=-5), [ep(1, waiting=4), ep(2, kv=0.7)], time.monotonic()) is None
    # one hot pod drags the mean over 1 but another pod has room: the headroom guard admits
    eps = [ep(1, waiting=40), ep(2)]
    assert a.check(req(priority=-1), eps, time.monotonic()) is None
    reference = Admission(SaturationDetector(headroom_guard=False))
    assert reference.check(req(priority=-1), eps, time.monotonic()) is not None


def test_stale_pool_counts_as_saturated():
    a = Admission(SaturationDetector())
    assert a.check(req(priority=-1), [ep(1, age=5), ep(2, metrics=False)], time.monotonic()) is not None
    assert a.check(req(priority=-1), [], time.monotonic()) is None


@settings(max_examples=150)
@given(eps=endpoints(), priority=st.integers(-1000, 1000), guard=st.booleans())
def test_shedding_never_touches_critical_or_headroom(eps, priority, guard):
    d = SaturationDetector(headroom_guard=guard)
    now = time.monotonic()
    reason = Admission(d).check(req(priority=priority), eps, now)
    if priority >= CRITICAL_PRIORITY or priority >= 0:
        assert reason is None
    if d.pool_saturation(eps, now) < 1.0:
        assert reason is None
    if guard and any(not d.pod_saturated(e, now) for e in eps):
        assert reason is None
    if reason is not None:
        assert priority < 0

"""Filters: label selector, saturation, LoRA."""

from __future__ import annotations

import random

from epp.scheduling.filters import LabelSelectorFilter, LoraAffinityFilter, SaturationFilter, _SatParams
from epp.scheduling.loadguard import LoadGuard
from epp.scheduling.registry import BuildContext
from epp.scheduling.saturation import SaturationDetector
from tests.scheduling.util import cycle, ep, req

CTX = BuildContext(rng=random.Random(0), detector=SaturationDetector(), guard=LoadGuard())
NO_OVERRIDES = _SatParams(None, None, None)


def test_label_selector():
    eps = [ep(1, labels={"role": "decode", "zone": "a"}), ep(2, labels={"role": "prefill"}),
           ep(3, labels={"role": "decode"})]
    f = LabelSelectorFilter("f", {"role": "decode"}, CTX)
    assert f.filter(cycle(), eps) == [eps[0], eps[2]]
    f2 = LabelSelectorFilter("f", {"role": "decode", "zone": "b"}, CTX)
    assert f2.filter(cycle(), eps) == []


def test_saturation_filter_drops_saturated_and_stale():
    eps = [ep(1, waiting=5), ep(2, kv=0.8), ep(3, waiting=4, kv=0.79), ep(4, age=10), ep(5, metrics=False),
           ep(6, scrape_ok=False)]
    assert SaturationFilter("s", NO_OVERRIDES, CTX).filter(cycle(), eps) == [eps[2]]


def test_saturation_filter_keeps_all_when_all_saturated():
    eps = [ep(1, waiting=50), ep(2, age=10)]
    assert SaturationFilter("s", NO_OVERRIDES, CTX).filter(cycle(), eps) == eps


def test_saturation_filter_overrides():
    eps = [ep(1, waiting=5), ep(2, waiting=12)]
    f = SaturationFilter("s", _SatParams(10, None, None), CTX)
    assert f.filter(cycle(), eps) == [eps[0]]


def test_lora_filter_prefers_pods_with_adapter():
    eps = [ep(1, lora_max=2), ep(2, lora_max=2, lora_running={"a"}), ep(3, lora_max=1, lora_waiting={"a"}),
           ep(4, lora_max=1, lora_running={"b"})]
    f = LoraAffinityFilter("l", None, CTX)
    assert f.filter(cycle(req(model="a")), eps) == [eps[1], eps[2]]
    assert f.filter(cycle(req(model="c")), eps) == [eps[0], eps[1]]  # free slots only


def test_lora_filter_passes_everything_through_when_nobody_qualifies():
    eps = [ep(1, lora_max=1, lora_running={"b"}), ep(2)]
    f = LoraAffinityFilter("l", None, CTX)
    assert f.filter(cycle(req(model="a")), eps) == eps
    plain = [ep(1), ep(2)]
    assert f.filter(cycle(req(model="a")), plain) == plain

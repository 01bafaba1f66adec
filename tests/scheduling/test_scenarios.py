"""The issue's routing scenarios (scenarios.py) through the default scheduler and admission."""

from __future__ import annotations

import random
import time

import pytest

from epp.scheduling.config import build_admission, build_scheduler, load_config
from tests.scheduling.scenarios import ANY, SAME_AS_FIRST, SCENARIOS, SHED, Scenario
from tests.scheduling.util import ep, req


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
@pytest.mark.parametrize("seed", range(5))
def test_scenario(scenario: Scenario, seed: int):
    cfg = load_config(None)
    sched = build_scheduler(cfg, has_lora=scenario.lora, rng=random.Random(seed))
    admission = build_admission(cfg)
    eps = [ep(i + 1, waiting=p.waiting, running=p.running, kv=p.kv, lora_max=p.lora_max,
              lora_running=p.lora_running, lora_waiting=p.lora_waiting) for i, p in enumerate(scenario.pods)]
    first = None
    for n, step in enumerate(scenario.steps):
        r = req(step.prompt, model=step.model, priority=step.priority, rid=str(n))
        reason = admission.check(r, eps, time.monotonic())
        if step.expect == SHED:
            assert reason is not None
            continue
        assert reason is None
        chosen = sched.schedule(r, eps).endpoints[0]
        chosen.inflight += 1  # as the director does
        chosen.inflight_tokens += len(r.prompt) // 4
        sched.on_routed(r, chosen)
        first = first or chosen
        if step.expect == SAME_AS_FIRST:
            assert chosen is first
        elif step.expect != ANY:
            assert chosen is eps[step.expect]

"""bench/flow_control.py's ideal_p90_bound on streams whose answer is known by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from epp.sim.config import EngineConfig
from epp.sim.des import SimRequest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import flow_control
        yield flow_control
    finally:
        sys.path.remove(str(BENCH))


def _stream(times: list[float], chars: int, tag: str = ""):
    # distinct leading text: nothing is shared, so each request's work is its whole prompt
    return [(t, SimRequest(f"r{i}", f"{tag}{i:06d}" + "z" * (chars - 6))) for i, t in enumerate(times)]


def _measured_only(bench, items):
    """Pad with warm-up requests far earlier so that every given request is measured."""
    n = len(items)
    warm = round(n * bench.WARMUP_SHARE) + 1
    pad = _stream([-1000.0 + i for i in range(warm)], 400, tag="w")
    settle = int(n * bench.SETTLE) + 1  # the first measured ones are left out as well
    lead = _stream([-500.0 + i for i in range(settle)], 400, tag="s")
    return pad + lead + items


def test_one_burst_of_equal_requests(bench):
    cfg = EngineConfig()
    speed = cfg.max_num_batched_tokens * 1000.0 / (cfg.step_base_ms + cfg.max_num_batched_tokens
                                                    * cfg.prefill_ms_per_token)
    tokens = 4000  # 16,000 characters a prompt
    items = _stream([0.0] * 20, 16000)
    x = bench.ideal_p90_bound(iter(_measured_only(bench, items)), 20, 1, cfg)
    # 18 of the 20 must fit: 18 prompts of work at one server's speed, all arrived at once
    assert x == pytest.approx(18 * tokens / speed, rel=0.02)
    # twice the servers, half the time
    assert bench.ideal_p90_bound(iter(_measured_only(bench, items)), 20, 2, cfg) == pytest.approx(x / 2, rel=0.02)


def test_spread_arrivals_need_less(bench):
    cfg = EngineConfig()
    at_once = bench.ideal_p90_bound(iter(_measured_only(bench, _stream([0.0] * 20, 16000))), 20, 1, cfg)
    spread = bench.ideal_p90_bound(iter(_measured_only(bench, _stream([i * 0.02 for i in range(20)], 16000))),
                                   20, 1, cfg)
    assert spread < at_once

"""The size- and SLO-aware ordering policies: order, aging (no starvation), header parsing, config."""

from __future__ import annotations

import math
import textwrap

import pytest

from epp.flowcontrol import build
from epp.flowcontrol.controller import BandSettings, FlowController, FlowSettings
from epp.flowcontrol.shortest_prompt import ShortestPromptFirstOrderingPolicy
from epp.flowcontrol.slo_deadline import slo_ttft_seconds
from epp.flowcontrol.types import FlowKey, Outcome
from epp.scheduling.config import ConfigError, load_config
from tests.flowcontrol.test_controller import Harness

SPF = "shortest-prompt-first-ordering-policy"
SLO = "slo-deadline-ordering-policy"


def _harness(ordering: str, fairness: str = "global-strict-fairness-policy", **policies: object) -> Harness:
    settings = FlowSettings(default_band=BandSettings(ordering=ordering, fairness=fairness))
    h = Harness()
    h.fc = FlowController(settings, h.fc.detector, lambda: h.pool, clock=h.clock, policies=policies)
    return h


@pytest.mark.parametrize("fairness", ["global-strict-fairness-policy", "round-robin-fairness-policy"])
def test_shortest_prompt_first_serves_small_bodies_first(fairness: str):
    h = _harness(SPF, fairness)
    h.submit("busy")
    for name, kib in (("big", 64), ("mid", 8), ("small", 1), ("tiny", 0)):
        h.submit(name, size=kib * 1024)
    h.free(4)
    assert h.order[1:] == ["tiny", "small", "mid", "big"]


def test_shortest_prompt_first_ages_a_large_request_past_a_stream_of_small_ones():
    """A 64 KiB request (virtual deadline enqueue + 3.2 s) goes before small requests arriving after
    its deadline, however many keep coming: it waits about 3.2 s, not forever."""
    h = _harness(SPF)
    h.submit("busy")
    big = h.submit("big", size=64 * 1024)
    dispatched_at = None
    for i in range(200):  # one small request arrives and one slot frees every 50 ms, for 10 s
        h.clock.t += 0.05
        h.submit(f"s{i}", size=1024)
        h.free()
        if big.outcome is Outcome.DISPATCHED and dispatched_at is None:
            dispatched_at = h.clock.t - big.enqueued
    assert dispatched_at is not None, "the large request starved"
    assert 3.0 <= dispatched_at <= 3.5
    assert h.fc.queued() <= 70  # the small ones behind it drain afterwards at the same rate


def test_shortest_prompt_first_configured_aging():
    fast = ShortestPromptFirstOrderingPolicy("spf-fast", 0.001)
    h = _harness("spf-fast", **{"spf-fast": fast})
    h.submit("busy")
    h.submit("big", size=100 * 1024)  # virtual deadline +0.1 s
    h.clock.t += 0.2
    h.submit("small", size=10)
    h.free(2)
    assert h.order[1:] == ["big", "small"]  # aged past the later small one


def test_slo_deadline_orders_by_objective_then_arrival_no_objective_last():
    h = _harness(SLO)
    h.submit("busy")
    fc = h.fc
    fc.submit(FlowKey(0), 10, h.bind, request_id="none-1")
    fc.submit(FlowKey(0), 10, h.bind, request_id="loose", slo_ttft=5.0)
    h.clock.t += 1.0
    fc.submit(FlowKey(0), 10, h.bind, request_id="tight", slo_ttft=0.5)  # deadline 101.5 < 105
    fc.submit(FlowKey(0), 10, h.bind, request_id="none-2")
    fc.submit(FlowKey(0), 10, h.bind, request_id="same", slo_ttft=4.0)  # deadline 105, arrived later
    h.free(5)
    assert h.order[1:] == ["tight", "loose", "same", "none-1", "none-2"]


@pytest.mark.parametrize(("headers", "want"), [
    ({"x-llm-d-slo-ttft-ms": "250"}, 0.25),
    ({"x-slo-ttft-ms": " 1000 "}, 1.0),
    ({"x-llm-d-slo-ttft-ms": "100", "x-slo-ttft-ms": "900"}, 0.1),
    ({"x-llm-d-slo-ttft-ms": "0"}, 0.0),
    ({}, None),
    ({"x-llm-d-slo-ttft-ms": ""}, None),
    ({"x-llm-d-slo-ttft-ms": "-5"}, None),
    ({"x-llm-d-slo-ttft-ms": "1.5"}, None),
    ({"x-llm-d-slo-ttft-ms": "soon"}, None),
    ({"x-llm-d-slo-ttft-ms": "9" * 40}, None),
])
def test_slo_header_parsing(headers: dict[str, str], want: float | None):
    assert slo_ttft_seconds(headers) == want


def test_invalid_objective_sorts_as_none():
    h = _harness(SLO)
    item = h.fc.submit(FlowKey(0), 1, None, slo_ttft=-1.0)
    assert item.slo_ttft == math.inf


def _cfg(plugins: str, band: str) -> str:
    return textwrap.dedent("""\
        apiVersion: inference.networking.x-k8s.io/v1alpha1
        kind: EndpointPickerConfig
        plugins:
        """) + plugins + textwrap.dedent(f"""
        featureGates: [flowControl]
        flowControl:
          defaultPriorityBand: {band}
        """)


def test_config_declares_the_policies_with_parameters():
    cfg = load_config(_cfg("- {name: spf, type: shortest-prompt-first-ordering-policy, "
                            "parameters: {agingSecondsPerKiB: 0.5}}\n"
                            "- {name: slo, type: slo-deadline-ordering-policy}",
                            "{orderingPolicyRef: spf}"))
    fc = build.build(cfg, lambda: [])
    assert fc is not None
    spf = fc.policies["spf"]
    assert isinstance(spf, ShortestPromptFirstOrderingPolicy) and spf.aging == 0.5
    assert fc.settings.default_band.ordering == "spf"
    assert fc.policies["slo"].kind == "ordering"
    with pytest.raises(ConfigError, match="agingSecondsPerKiB"):
        load_config(_cfg("- {name: spf, type: shortest-prompt-first-ordering-policy, "
                          "parameters: {agingSecondsPerKiB: 0}}", "{orderingPolicyRef: spf}"))

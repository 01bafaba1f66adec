"""Failures through a real Envoy: the picker stopped (FailOpen / FailClose) and a dead pod first in
the picker's list (fallback with override_host routing)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from epp.datastore import Endpoint
from epp.envoyconf import EPP_FILTER
from epp.scheduling.framework import SchedulingRequest, SchedulingResult
from tests.e2e.conftest import E2E, MODEL, GatewayFactory, needs_envoy
from tests.e2e.test_routing import chat

pytestmark = [pytest.mark.envoy, needs_envoy]

PROMPT = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
BOUND = 10.0  # seconds: a request that has not failed by then counts as hung


async def stop_picker(e2e: E2E) -> None:
    await e2e.picker.stop(0)
    # the gRPC ports are closed now: Envoy's next ext_proc stream is refused
    assert e2e.picker.servicer.open_streams == 0


async def test_picker_stopped_fail_close_answers_5xx_quickly(gateway: GatewayFactory) -> None:
    e2e = await gateway(sims=2)  # duplex, ORIGINAL_DST, TLS, FailClose: the shipped config
    assert (await e2e.post("/v1/completions", PROMPT)).status == 200
    served_before = sum(s.served_total for s in e2e.sims)
    await stop_picker(e2e)
    for stream in (False, True):
        r = await asyncio.wait_for(e2e.post("/v1/completions", {**PROMPT, "stream": stream}, timeout=BOUND), BOUND)
        assert 500 <= r.status < 600
    assert sum(s.served_total for s in e2e.sims) == served_before  # nothing reached a model server
    stats = await e2e.envoy.stats("http.inference.ext_proc.")
    assert stats["http.inference.ext_proc.streams_failed"] >= 2


async def test_picker_stopped_fail_open_requests_still_flow(gateway: GatewayFactory) -> None:
    """FailOpen needs the BUFFERED profile and override_host routing on Envoy 1.40: without a pick,
    the pool cluster's fallback policy (least request) chooses among the known endpoints."""
    e2e = await gateway(sims=2, failure_mode="FailOpen", profile="buffered", routing="override_host")
    assert (await e2e.post("/v1/completions", PROMPT)).status == 200
    await stop_picker(e2e)
    seen = set()
    for i in range(6):
        r = await asyncio.wait_for(
            e2e.post("/v1/chat/completions", chat(MODEL, f"still here {i}", max_tokens=3, stream=i % 2 == 0),
                     timeout=BOUND),
            BOUND,
        )
        assert r.status == 200, r.text
        seen.add(r.headers["x-sim-server"])
    assert seen <= {s.name for s in e2e.sims}
    stats = await e2e.envoy.stats("http.inference.ext_proc.")
    assert stats["http.inference.ext_proc.failure_mode_allowed"] >= 6


def force_fail_open(config: dict[str, Any]) -> None:
    """Turn on failure_mode_allow in a generated config: envoyconf refuses FailOpen where it cannot
    fail open, so these tests edit it in to show what Envoy would do."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for f in hcm["http_filters"]:
        if f["name"] == EPP_FILTER:
            f["typed_config"]["failure_mode_allow"] = True


@pytest.mark.parametrize(("profile", "routing"), [("duplex", "override_host"), ("buffered", "original_dst")])
async def test_fail_open_cannot_help_in_these_configs(gateway: GatewayFactory, profile: str, routing: str) -> None:
    """Envoy 1.40 cannot fail open once a FULL_DUPLEX_STREAMED body chunk is on its way to the
    picker (it is, before the refused connection is noticed): 500. With ORIGINAL_DST a request
    without the pick has no destination: 503 (a client's own destination header is stripped at the
    edge, tests/e2e/test_security.py). envoyconf refuses both; docs/envoy-profiles.md explains."""
    e2e = await gateway(sims=1, profile=profile, routing=routing, config_edit=force_fail_open)
    await stop_picker(e2e)
    r = await asyncio.wait_for(e2e.post("/v1/completions", PROMPT, timeout=BOUND), BOUND)
    assert r.status == (500 if profile == "duplex" else 503)
    assert e2e.sims[0].served_total == 0


class DeadFirst:
    """Answers the dead endpoint first, then the live one with the fewest requests in flight:
    the primary fails to connect and Envoy must use the fallback."""

    def __init__(self, dead: str) -> None:
        self.dead = dead

    def schedule(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        ranked = sorted(candidates, key=lambda e: (e.address != self.dead, e.inflight))
        return SchedulingResult(ranked[:2])

    def on_routed(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        return None

    def on_finished(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        return None


async def test_dead_pod_first_envoy_retries_the_fallback(gateway: GatewayFactory, dead_address: str) -> None:
    dead = dead_address  # refused for the whole test: never one of the ports the servers are handed
    e2e = await gateway(sims=2, routing="override_host", scheduler=DeadFirst(dead), extra_endpoints=[dead])
    for i in range(6):
        rid = f"fb-{i}"
        r = await e2e.post("/v1/chat/completions", chat(MODEL, f"q{i}", max_tokens=5, stream=i % 2 == 1),
                           **{"x-request-id": rid})
        assert r.status == 200, r.text
        primary, fallback = e2e.picks[rid]
        assert primary == dead
        assert r.headers["x-sim-server"] == e2e.sim_at(fallback).name
        assert e2e.served_on(rid) == [e2e.sim_at(fallback).name]
        assert "x-gateway-destination-endpoint-served" not in r.headers  # read by the picker, then removed
    stats = await e2e.envoy.stats("cluster.pool.default.pool.")
    assert stats["cluster.pool.default.pool.upstream_cx_connect_fail"] >= 6
    assert stats["cluster.pool.default.pool.upstream_rq_retry_success"] >= 6
    # the route stamps the upstream really used on the response; the picker moved each request's
    # accounting to the fallback that served it, and the accounting completes
    assert await e2e.inflight_settles() == dict.fromkeys(e2e.picker.datastore.endpoints, 0)
    for i in range(6):
        ctx = e2e.finished.contexts[f"fb-{i}"]
        assert ctx.served is not None and ctx.served.address == e2e.picks[f"fb-{i}"][1]

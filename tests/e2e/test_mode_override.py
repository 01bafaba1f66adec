"""Only the phases a request needs: in the buffered profile the picker tells Envoy (mode_override on
the response-headers reply) to skip the response body of a request that needs nothing from it;
Envoy 1.40 honours it there (allow_mode_override, response body STREAMED) and ignores it while the
request body is FULL_DUPLEX_STREAMED (the duplex profile: every chunk still crosses). Everything
else still works: the pick, the served endpoint, in-flight accounting to the end of the exchange,
restoring a rewritten model, the sampled share for token metrics."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from epp.sim.server import SimServerConfig
from tests.e2e.conftest import MODEL, GatewayFactory, needs_envoy
from tests.e2e.test_routing import REWRITE, chat

pytestmark = [pytest.mark.envoy, needs_envoy]


class Counting:
    """Wraps the servicer's dispatch to count the messages of each kind Envoy sends."""

    def __init__(self, servicer: Any) -> None:
        self.kinds: dict[str, int] = {}
        inner = servicer._handle

        def handle(st: Any, req: Any) -> Any:
            k = req.WhichOneof("request")
            self.kinds[k] = self.kinds.get(k, 0) + 1
            return inner(st, req)

        servicer._handle = handle


def real_time(n: int) -> list[SimServerConfig]:
    """Simulators in real time: the first token comes ~tens of ms after the headers."""
    return [SimServerConfig(name=f"sim-{i}", time_scale=1.0, seed=i) for i in range(n)]


async def _stream(e2e: Any, rid: str, tokens: int) -> tuple[int, int, list[int]]:
    """(status, content chunks, in-flight total seen after each chunk) of one streamed chat."""
    seen: list[int] = []
    chunks = 0
    body = chat(MODEL, f"hello {rid}", max_tokens=tokens, stream=True)
    async with e2e.session.post(e2e.url + "/v1/chat/completions", json=body, headers={"x-request-id": rid},
                                timeout=aiohttp.ClientTimeout(total=30)) as r:
        async for line in r.content:
            if line.startswith(b"data: {"):
                if json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    chunks += 1
                    seen.append(sum(e.inflight for e in e2e.picker.datastore.endpoints.values()))
        return r.status, chunks, seen


async def test_buffered_the_response_body_skips_the_picker_when_nothing_needs_it(gateway: GatewayFactory) -> None:
    e2e = await gateway(sims=real_time(2), profile="buffered",
                        picker_options={"response_body_sample": 0.0, "response_headers_sample": 1.0})
    seen = Counting(e2e.picker.servicer)
    for i in range(3):
        status, chunks, inflight = await _stream(e2e, f"o-{i}", 24)
        assert (status, chunks) == (200, 24)
        # counted while the response streams: the ext_proc stream stays open. The last content chunk
        # comes with [DONE], when Envoy has finished the exchange: the picker may have ended it first
        assert min(inflight[:-1]) == 1, str(inflight)
        assert e2e.picks[f"o-{i}"]
    assert e2e.picker.servicer.body_overrides == 3
    assert seen.kinds.get("response_body", 0) == 0  # no SSE chunk crossed the picker
    assert seen.kinds["response_headers"] == 3  # the served endpoint and time to first byte still come
    assert await e2e.inflight_settles() == dict.fromkeys(e2e.picker.datastore.endpoints, 0)


async def test_buffered_two_messages_when_nothing_needs_the_response(gateway: GatewayFactory) -> None:
    """The override on the request-headers reply skips response headers, body and trailers: Envoy
    sends the picker 2 messages a request, and the stream (so the in-flight count) still stays open
    to the last chunk of a long stream, then ends with the exchange."""
    e2e = await gateway(sims=real_time(2), profile="buffered",
                        picker_options={"response_body_sample": 0.0, "response_headers_sample": 0.0})
    seen = Counting(e2e.picker.servicer)
    for i in range(3):
        status, chunks, inflight = await _stream(e2e, f"t-{i}", 32)
        assert (status, chunks) == (200, 32)
        assert min(inflight[:-1]) == 1, str(inflight)  # held while it streams, not to the dispatch (see above)
        assert e2e.picks[f"t-{i}"]
        assert await e2e.inflight_settles() == dict.fromkeys(e2e.picker.datastore.endpoints, 0)
    r = await e2e.post("/v1/chat/completions", chat(MODEL, "plain", max_tokens=3))
    assert r.status == 200
    # the route's served-endpoint stamp never reached the picker; Envoy's own filter removed it
    assert "x-gateway-destination-endpoint-served" not in r.headers
    assert e2e.picker.servicer.response_skips == 4
    assert seen.kinds == {"request_headers": 4, "request_body": 4}


async def test_buffered_the_headers_sample_keeps_ttft(gateway: GatewayFactory) -> None:
    """A request in the response-headers sample still gets its headers (time to first byte), the
    others none; both are routed and counted to their end."""
    e2e = await gateway(sims=1, profile="buffered",
                        picker_options={"response_body_sample": 0.0, "response_headers_sample": 0.5})
    seen = Counting(e2e.picker.servicer)
    for i in range(4):
        r = await e2e.post("/v1/chat/completions", chat(MODEL, f"y {i}", max_tokens=4, stream=True))
        assert r.status == 200 and r.events()[-1] == "[DONE]"
    assert e2e.picker.servicer.response_skips == 2
    assert seen.kinds.get("response_headers") == 2 and "response_body" not in seen.kinds
    assert await e2e.inflight_settles() == dict.fromkeys(e2e.picker.datastore.endpoints, 0)


async def test_duplex_ignores_the_override_and_still_works(gateway: GatewayFactory) -> None:
    e2e = await gateway(sims=real_time(1), profile="duplex", picker_options={"response_body_sample": 0.0})
    seen = Counting(e2e.picker.servicer)
    status, chunks, _ = await _stream(e2e, "d-0", 8)
    assert (status, chunks) == (200, 8)
    assert e2e.picker.servicer.body_overrides == 1
    assert seen.kinds.get("response_body", 0) >= 1  # ignored by Envoy: handled as always
    assert await e2e.inflight_settles() == dict.fromkeys(e2e.picker.datastore.endpoints, 0)


async def test_buffered_a_rewritten_model_and_the_sample_still_get_the_body(gateway: GatewayFactory) -> None:
    e2e = await gateway(sims=1, profile="buffered", manifests=REWRITE, picker_options={"response_body_sample": 0.25})
    seen = Counting(e2e.picker.servicer)
    r = await e2e.post("/v1/chat/completions", chat("food-review", "pizza?", max_tokens=3))
    assert r.status == 200 and r.json()["model"] == "food-review"  # restored: the body crossed
    r = await e2e.post("/v1/chat/completions", chat("food-review", "pizza?", max_tokens=5, stream=True))
    assert r.status == 200 and {json.loads(e)["model"] for e in r.events()[:-1]} == {"food-review"}
    assert e2e.picker.servicer.body_overrides == 0
    before = seen.kinds.get("response_body", 0)
    for i in range(8):
        r = await e2e.post("/v1/chat/completions", chat(MODEL, f"x {i}", max_tokens=4, stream=True))
        assert r.status == 200 and r.events()[-1] == "[DONE]"
    assert e2e.picker.servicer.body_overrides == 6  # 2 of 8 sampled
    assert seen.kinds.get("response_body", 0) > before
    await asyncio.sleep(0)

"""Through a real Envoy (duplex profile, ORIGINAL_DST on the header, picker over TLS with gRPC health
checks): picks are honoured, rewrites reach the server and are undone for the client, streams
arrive whole, the picker's errors reach the client, and the picker's accounting completes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest

from epp.datastore import Endpoint
from epp.director import CONFORMANCE_SELECT_HEADER, CONFORMANCE_SERVED_HEADER
from epp.scheduling.framework import SchedulingRequest
from tests.e2e.conftest import CONFORMANCE_CONFIG, MODEL, GatewayFactory, needs_envoy

pytestmark = [pytest.mark.envoy, needs_envoy]

REWRITE = """\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: food-review-alias}
spec:
  poolRef: {group: inference.networking.k8s.io, name: pool}
  rules:
    - matches: [{model: {type: Exact, value: food-review}}]
      targets: [{modelRewrite: MODEL}]
""".replace("MODEL", MODEL)


def chat(model: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def test_each_request_reaches_the_pod_the_picker_chose(gateway: GatewayFactory) -> None:
    e2e = await gateway(sims=3)
    ids = [f"pick-{i}" for i in range(24)]

    async def one(i: int, rid: str) -> None:
        body = chat(MODEL, f"question {i} " * 10, max_tokens=8, stream=i % 2 == 0)
        r = await e2e.post("/v1/chat/completions", body, **{"x-request-id": rid})
        assert r.status == 200, r.text
        [addr] = e2e.picks[rid]  # ORIGINAL_DST: the picker answers one endpoint
        assert r.headers["x-sim-server"] == e2e.sim_at(addr).name

    await asyncio.gather(*(one(i, rid) for i, rid in enumerate(ids)))
    for rid in ids:  # and the server that the picker chose recorded it, no other
        assert e2e.served_on(rid) == [e2e.sim_at(e2e.picks[rid][0]).name]
    assert len({e2e.picks[rid][0] for rid in ids}) >= 2  # least-in-flight spreads the load


async def test_conformance_selection_header_pins_the_endpoint(gateway: GatewayFactory) -> None:
    # the header is stripped at the edge by default, and honoured only by the conformance plugins
    e2e = await gateway(sims=3, allow_client_headers=[CONFORMANCE_SELECT_HEADER], config_text=CONFORMANCE_CONFIG)
    for sim in (e2e.sims[2], e2e.sims[0], e2e.sims[2]):
        r = await e2e.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2},
                           **{CONFORMANCE_SELECT_HEADER: sim.address})
        assert r.status == 200, r.text
        assert r.headers["x-sim-server"] == sim.name
        assert r.headers[CONFORMANCE_SERVED_HEADER] == sim.address


async def test_rewrite_reaches_the_server_and_the_client_sees_its_model_json(gateway: GatewayFactory) -> None:
    e2e = await gateway(sims=2, manifests=REWRITE)
    r = await e2e.post("/v1/chat/completions", chat("food-review", "is this pizza good?", max_tokens=5),
                       **{"x-request-id": "rw-json"})
    assert r.status == 200, r.text
    body = r.json()
    assert body["model"] == "food-review"
    assert MODEL not in r.text
    [rec] = [rec for s in e2e.sims for rec in s.served if rec.request_id == "rw-json"]
    assert rec.model == MODEL  # the server was asked for the target model
    # the picker drops the server's content-length (the restored body may differ): chunked, or exact
    assert r.headers.get("content-length") in (None, str(len(r.body)))


async def test_rewrite_in_a_stream_every_event_carries_the_clients_model(gateway: GatewayFactory) -> None:
    e2e = await gateway(sims=2, manifests=REWRITE)
    r = await e2e.post("/v1/completions", {"model": "food-review", "prompt": "rate this " * 30, "max_tokens": 40,
                                           "stream": True, "stream_options": {"include_usage": True}},
                       **{"x-request-id": "rw-sse"})
    assert r.status == 200, r.text
    events = r.events()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all(c["model"] == "food-review" for c in chunks)
    assert MODEL not in r.text
    [rec] = [rec for s in e2e.sims for rec in s.served if rec.request_id == "rw-sse"]
    assert rec.model == MODEL


async def test_streaming_responses_arrive_whole(gateway: GatewayFactory) -> None:
    e2e = await gateway(sims=2)
    n = 300

    async def one(i: int) -> None:
        rid = f"sse-{i}"
        r = await e2e.post("/v1/chat/completions",
                           chat(MODEL, f"tell me a story {i}", max_tokens=n, stream=True,
                                stream_options={"include_usage": True}),
                           **{"x-request-id": rid})
        assert r.status == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        events = r.events()
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        # role chunk, one chunk per token, the usage chunk; every chunk of this request's id
        assert {c["id"] for c in chunks} == {f"chatcmpl-{rid}"}
        content = [c for c in chunks if c["choices"] and "content" in c["choices"][0]["delta"]]
        assert len(content) == n + 1
        assert chunks[-1]["usage"]["completion_tokens"] == n
        assert content[-1]["choices"][0]["finish_reason"] == "length"

    await asyncio.gather(*(one(i) for i in range(6)))


async def test_large_request_body_reaches_the_server_intact(gateway: GatewayFactory) -> None:
    """A body larger than one ext_proc chunk (62000 bytes) is streamed back to Envoy in pieces."""
    e2e = await gateway(sims=1)
    prompt = "".join(f"{i:07d} " for i in range(15_000))  # 120 KB: two ext_proc chunks, under the 32k context
    r = await e2e.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1},
                       **{"x-request-id": "big"})
    assert r.status == 200, r.text
    [rec] = list(e2e.sims[0].served)
    assert rec.prompt_tokens == -(-len(prompt) // 4)
    assert r.json()["usage"]["prompt_tokens"] == rec.prompt_tokens


class ShedMarked:
    """Admission hook: sheds requests carrying `x-test-shed`."""

    def check(self, request: SchedulingRequest, candidates: Sequence[Endpoint], now: float) -> str | None:
        return "pool saturated (test)" if "x-test-shed" in request.headers else None


async def test_picker_errors_reach_the_client_with_the_reason(gateway: GatewayFactory) -> None:
    e2e = await gateway(sims=2)
    e2e.picker.director.admission = ShedMarked()

    bad = await e2e.post("/v1/chat/completions", b'{"model": ')
    assert bad.status == 400
    assert bad.text.startswith("inference error: BadRequest - ")

    no_model = await e2e.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert no_model.status == 400
    assert "inference error: BadRequest" in no_model.text

    shed = await e2e.post("/v1/chat/completions", chat(MODEL, "x"), **{"x-test-shed": "1"})
    assert shed.status == 429
    assert shed.text == "inference error: ResourceExhausted - system saturated, sheddable request dropped"

    ok = await e2e.post("/v1/chat/completions", chat(MODEL, "x", max_tokens=1))
    assert ok.status == 200  # the stack still serves after the errors
    assert all(s.served_total == 1 for s in e2e.sims if s.served) and sum(s.served_total for s in e2e.sims) == 1


class Nothing:
    """A scheduler that never finds an endpoint."""

    def schedule(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> Any:
        from epp.scheduling.framework import SchedulingResult

        return SchedulingResult([], reason="every endpoint is over its limit (test)")

    def on_routed(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        return None

    def on_finished(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        return None


async def test_nothing_schedulable_is_a_429_with_the_schedulers_reason(gateway: GatewayFactory) -> None:
    e2e = await gateway(sims=1, scheduler=Nothing())
    r = await e2e.post("/v1/completions", {"model": MODEL, "prompt": "x", "stream": True})
    assert r.status == 429
    assert r.text == ("inference error: ResourceExhausted - failed to find target endpoint: "
                      "every endpoint is over its limit (test)")
    assert e2e.sims[0].served_total == 0


async def test_server_errors_pass_through_unchanged(gateway: GatewayFactory) -> None:
    e2e = await gateway(sims=1)
    e2e.sims[0].faults.error_rate = 1.0
    r = await e2e.post("/v1/completions", {"model": MODEL, "prompt": "x"})
    assert r.status == 500
    assert "injected failure" in r.text


async def test_accounting_completes(gateway: GatewayFactory) -> None:
    """In duplex every stream stays open to the end of the response: in-flight counts return to 0
    and the usage the servers reported is what the picker recorded, per request and endpoint."""
    e2e = await gateway(sims=3)

    async def one(i: int) -> str:
        rid = f"acct-{i}"
        stream = i % 2 == 1
        body = chat(MODEL, f"count {i} " * (5 + i), max_tokens=10 + i, stream=stream,
                    stream_options={"include_usage": True} if stream else None)
        if not stream:
            del body["stream_options"]
        r = await e2e.post("/v1/chat/completions", body, **{"x-request-id": rid})
        assert r.status == 200, r.text
        return rid

    ids = await asyncio.gather(*(one(i) for i in range(30)))
    assert await e2e.inflight_settles() == dict.fromkeys(e2e.picker.datastore.endpoints, 0)
    assert all(e.inflight_tokens == 0 for e in e2e.picker.datastore.endpoints.values())
    records = {rec.request_id: (s, rec) for s in e2e.sims for rec in s.served}
    for rid in ids:
        ctx = e2e.finished.contexts[rid]
        sim, rec = records[rid]
        assert ctx.served is not None and ctx.served.address == sim.address
        assert ctx.status == "200"
        assert (ctx.usage_prompt, ctx.usage_completion) == (rec.prompt_tokens, rec.completion_tokens)
    assert e2e.picker.servicer.open_streams == 0

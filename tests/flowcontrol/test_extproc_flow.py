"""Flow control through the real ext_proc server and a real grpc.aio client over loopback.

The pool is one endpoint and the concurrency detector allows one request in flight on it, so a
second request waits in the picker until the first one's stream ends (its response is done)."""

from __future__ import annotations

import asyncio
import gc
import os
import textwrap
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from epp.flowcontrol.types import Outcome
from tests.extproc_client import body_chunks, chat, request_headers, response_headers, set_headers

EP = "127.0.0.1:8000"


def config(extra: str = "", *, slots: int = 1, fairness: str = "") -> str:
    band = f"\n  defaultPriorityBand: {{fairnessPolicyRef: {fairness}}}" if fairness else ""
    return textwrap.dedent(f"""\
        apiVersion: inference.networking.x-k8s.io/v1alpha1
        kind: EndpointPickerConfig
        plugins:
        - {{name: cd, type: concurrency-detector, parameters: {{maxConcurrency: {slots}}}}}
        featureGates: [flowControl]
        flowControl:
          saturationDetector: {{pluginRef: cd}}""") + band + "".join(f"\n  {line}" for line in extra.splitlines())


OBJECTIVES = """
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: urgent}
spec: {priority: 10, poolRef: {name: pool}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1, poolRef: {name: pool}}
"""


class Stream:
    """One open ext_proc stream: the request is sent, the reply awaited, the response finished later."""

    def __init__(self, channel: grpc.aio.Channel, name: str, headers: dict[str, str] | None = None,
                 content: str = "") -> None:
        self.name = name
        self.content = content or name
        self.call = ep_grpc.ExternalProcessorStub(channel).Process()
        self.headers = {"x-request-id": name, **(headers or {})}
        self.reply: asyncio.Task[Any] | None = None

    async def send(self) -> None:
        for m in [request_headers(extra=self.headers), *body_chunks(chat("m", self.content))]:
            await self.call.write(m)
        self.reply = asyncio.ensure_future(self.call.read())

    async def finish(self) -> None:
        """The response comes back and the stream ends (the request stops counting in flight)."""
        await self.call.write(response_headers())
        await self.call.write(body_chunks(b'{"ok": true}', response=True)[0])
        await self.call.done_writing()
        while await self.call.read() is not grpc.aio.EOF:
            pass


async def until(cond: Callable[[], bool], what: str, limit: int = 500) -> None:
    """Yield to the loop until cond() holds (bounded: at most `limit` polls of 10 ms)."""
    for _ in range(limit):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"gave up waiting: {what}")


def routed(reply: ep.ProcessingResponse) -> str:
    assert reply.WhichOneof("response") == "request_headers", reply
    return set_headers(reply)["x-gateway-destination-endpoint"]


async def test_waits_while_saturated_and_routes_when_the_pod_frees(start_picker):
    app, ch = await start_picker(endpoints=[EP], config_text=config())
    fc = app.flow.controller
    a, b = Stream(ch, "a"), Stream(ch, "b")
    await a.send()
    assert routed(await a.reply) == EP
    await b.send()
    await until(lambda: fc.live == 1, "b queued")
    await asyncio.sleep(0.1)  # a few re-checks pass; the pod is still full
    assert not b.reply.done() and fc.live == 1
    await a.finish()
    assert routed(await asyncio.wait_for(b.reply, 10)) == EP
    assert fc.live == 0 and fc.outcomes[Outcome.DISPATCHED] == 2
    await b.finish()
    text = (await asyncio.to_thread(_scrape, app)).splitlines()
    assert any(line.startswith("inference_extension_flow_control_request_queue_duration_seconds_count{")
               and 'outcome="Dispatched"' in line for line in text)
    assert any(line.startswith("llm_d_epp_flow_control_queue_size{") for line in text)


def _scrape(app: Any) -> str:
    from prometheus_client import generate_latest
    return generate_latest(app.telemetry.registry).decode()


async def test_higher_band_first(start_picker, tmp_path: Path):
    (tmp_path / "o.yaml").write_text(OBJECTIVES)
    app, ch = await start_picker(endpoints=[EP], config_text=config(), manifests=[str(tmp_path)])
    fc = app.flow.controller
    busy = Stream(ch, "busy")
    await busy.send()
    await busy.reply
    low = Stream(ch, "low", {"x-gateway-inference-objective": "batch"})
    mid = Stream(ch, "mid")
    high = Stream(ch, "high", {"x-llm-d-inference-objective": "urgent"})
    for s in (low, mid, high):
        await s.send()
    await until(lambda: fc.live == 3, "three queued")
    order = []
    current = busy
    for _ in range(3):
        await current.finish()
        done, _ = await asyncio.wait([s.reply for s in (low, mid, high) if s.name not in order],
                                     return_when=asyncio.FIRST_COMPLETED, timeout=10)
        assert len(done) == 1
        current = next(s for s in (low, mid, high) if s.reply in done)
        routed(current.reply.result())
        order.append(current.name)
    await current.finish()
    assert order == ["high", "mid", "low"]


async def _drain_order(busy: Stream, queued: list[Stream]) -> list[str]:
    """Finish the busy stream, then each dispatched one in turn; the order the queued ones went."""
    order: list[str] = []
    current = busy
    for _ in queued:
        await current.finish()
        done, _ = await asyncio.wait([s.reply for s in queued if s.name not in order],
                                     return_when=asyncio.FIRST_COMPLETED, timeout=10)
        assert len(done) == 1
        current = next(s for s in queued if s.reply in done)
        routed(current.reply.result())
        order.append(current.name)
    await current.finish()
    return order


async def test_slo_deadline_ordering_serves_the_tightest_objective_first(start_picker):
    extra = "defaultPriorityBand: {orderingPolicyRef: slo}"
    text = config(extra).replace("plugins:\n", "plugins:\n- {name: slo, type: slo-deadline-ordering-policy}\n")
    app, ch = await start_picker(endpoints=[EP], config_text=text)
    fc = app.flow.controller
    busy = Stream(ch, "busy")
    await busy.send()
    await busy.reply
    queued = [Stream(ch, "none"), Stream(ch, "loose", {"x-llm-d-slo-ttft-ms": "5000"}),
              Stream(ch, "tight", {"x-slo-ttft-ms": "100"}), Stream(ch, "bad", {"x-llm-d-slo-ttft-ms": "soon"})]
    for s in queued:
        await s.send()
    await until(lambda: fc.live == 4, "four queued")
    assert await _drain_order(busy, queued) == ["tight", "loose", "none", "bad"]


async def test_shortest_prompt_first_ordering_through_the_picker(start_picker):
    extra = "defaultPriorityBand: {orderingPolicyRef: spf}"
    text = config(extra).replace("plugins:\n", "plugins:\n- {name: spf, type: shortest-prompt-first-ordering-policy}\n")
    app, ch = await start_picker(endpoints=[EP], config_text=text)
    fc = app.flow.controller
    busy = Stream(ch, "busy")
    await busy.send()
    await busy.reply
    queued = [Stream(ch, "doc", content="d" * 60_000), Stream(ch, "chat", content="c" * 4_000),
              Stream(ch, "short")]
    for s in queued:
        await s.send()
    await until(lambda: fc.live == 3, "three queued")
    assert await _drain_order(busy, queued) == ["short", "chat", "doc"]


async def test_round_robin_fairness_between_two_tenants(start_picker):
    app, ch = await start_picker(endpoints=[EP], config_text=config(fairness="round-robin-fairness-policy"))
    fc = app.flow.controller
    busy = Stream(ch, "busy")
    await busy.send()
    await busy.reply
    streams = []
    for name, tenant in (("n1", "noisy"), ("n2", "noisy"), ("n3", "noisy"), ("n4", "noisy"),
                         ("q1", "quiet"), ("q2", "quiet")):
        s = Stream(ch, name, {"x-gateway-inference-fairness-id": tenant})
        await s.send()
        await until(lambda n=len(streams) + 1: fc.live == n, f"{name} queued")
        streams.append(s)
    order: list[str] = []
    current = busy
    for _ in range(len(streams)):
        await current.finish()
        done, _ = await asyncio.wait([s.reply for s in streams if s.name not in order],
                                     return_when=asyncio.FIRST_COMPLETED, timeout=10)
        current = next(s for s in streams if s.reply in done)
        order.append(current.name)
    await current.finish()
    assert order == ["n1", "q1", "n2", "q2", "n3", "n4"]


async def test_ttl_expiry_is_429_with_the_reason_header(start_picker):
    app, ch = await start_picker(endpoints=[EP], config_text=config("defaultRequestTTL: 300ms"))
    a, b = Stream(ch, "a"), Stream(ch, "b")
    await a.send()
    await a.reply
    await b.send()
    reply = await asyncio.wait_for(b.reply, 10)
    ir = reply.immediate_response
    assert ir.status.code == 429
    assert ir.body.startswith(b"inference error: ResourceExhausted - request timed out in queue")
    hdrs = {h.header.key: h.header.raw_value.decode() or h.header.value for h in ir.headers.set_headers}
    assert hdrs["x-llm-d-request-dropped-reason"] == "rejected-ttl-expired"
    assert app.flow.controller.outcomes[Outcome.EVICTED_TTL] == 1
    await a.finish()


async def test_client_cancel_while_queued_removes_it_at_once(start_picker):
    app, ch = await start_picker(endpoints=[EP], config_text=config())
    fc = app.flow.controller
    a, b = Stream(ch, "a"), Stream(ch, "b")
    await a.send()
    await a.reply
    await b.send()
    await until(lambda: fc.live == 1, "b queued")
    b.call.cancel()
    await until(lambda: fc.live == 0, "b removed")
    assert fc.outcomes[Outcome.EVICTED_CONTEXT_CANCELLED] == 1 and fc.bytes == 0
    c = Stream(ch, "c")
    await c.send()
    await until(lambda: fc.live == 1, "c queued")
    await a.finish()
    assert routed(await asyncio.wait_for(c.reply, 10)) == EP  # c, not the cancelled b, got the slot
    await c.finish()


async def test_capacity_bound_answers_429_rejected_saturated(start_picker):
    app, ch = await start_picker(endpoints=[EP], config_text=config("maxRequests: 1"))
    a, b, c = Stream(ch, "a"), Stream(ch, "b"), Stream(ch, "c")
    await a.send()
    await a.reply
    await b.send()
    await until(lambda: app.flow.controller.live == 1, "b queued")
    await c.send()
    ir = (await asyncio.wait_for(c.reply, 10)).immediate_response
    hdrs = {h.header.key: h.header.raw_value.decode() or h.header.value for h in ir.headers.set_headers}
    assert ir.status.code == 429 and hdrs["x-llm-d-request-dropped-reason"] == "rejected-saturated"
    await a.finish()
    assert routed(await asyncio.wait_for(b.reply, 10)) == EP
    await b.finish()


async def test_shutdown_answers_queued_requests_500(start_picker):
    app, ch = await start_picker(endpoints=[EP], config_text=config())
    a, b = Stream(ch, "a"), Stream(ch, "b")
    await a.send()
    await a.reply
    await b.send()
    await until(lambda: app.flow.controller.live == 1, "b queued")
    stopping = asyncio.ensure_future(app.stop(0.5))
    ir = (await asyncio.wait_for(b.reply, 10)).immediate_response
    hdrs = {h.header.key: h.header.raw_value.decode() or h.header.value for h in ir.headers.set_headers}
    assert ir.status.code == 500 and hdrs["x-llm-d-request-dropped-reason"] == "rejected-shutting-down"
    a.call.cancel()
    await stopping


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc for RSS")
async def test_ten_thousand_queued_requests_and_their_memory(start_picker):
    n = 10_000
    cfg = config("maxRequests: 20k\ndefaultPriorityBand: {maxRequests: 20k}")
    app, ch = await start_picker(endpoints=[EP], config_text=cfg)
    fc = app.flow.controller
    busy = Stream(ch, "busy")
    await busy.send()
    await busy.reply
    # 20 connections of their own (channels to one target share a connection unless told not to)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}",
                                          options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(20)]
    try:
        gc.collect()
        before = _rss()
        tracemalloc.start()
        streams: list[Stream] = []
        for i in range(0, n, 500):  # opened and sent 500 at a time
            batch = [Stream(channels[j % len(channels)], f"r{j}") for j in range(i, i + 500)]
            streams += batch
            await asyncio.gather(*(s.send() for s in batch))
            await until(lambda i=i: fc.live == i + 500, f"{i + 500} queued", limit=3000)
        gc.collect()
        py = tracemalloc.get_traced_memory()[0] / n
        tracemalloc.stop()
        per = (_rss() - before) / n
        print(f"\n{n} queued ext_proc requests: {per / 1024:.1f} KiB each in process RSS (gRPC client and "
              f"server, Python heap), of which {py / 1024:.1f} KiB Python objects (both sides)")
        assert per < 128 * 1024 and py < 32 * 1024
        assert fc.live == n and not any(s.reply.done() for s in streams[:100])
        fc.detector = type(fc.detector)(max_concurrency=10 * n)  # room for all: every one is routed
        app.flow.notify()
        replies = await asyncio.wait_for(asyncio.gather(*(s.reply for s in streams)), 120)
        assert all(r.WhichOneof("response") == "request_headers" for r in replies)
        for s in streams:
            s.call.cancel()
    finally:
        for c in channels:
            await c.close()

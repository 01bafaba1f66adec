"""--tracing: one span per decision with the chosen endpoint, the W3C traceparent passed to the model
server, spans exported over real OTLP/gRPC to a loopback collector; off means nothing is wrapped."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from epp import tracing
from tests.extproc_client import body_chunks, chat, exchange, request_headers, set_headers

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


def routed_headers(replies) -> dict[str, str]:
    for r in replies:
        h = set_headers(r)
        if "x-gateway-destination-endpoint" in h:
            return h
    raise AssertionError("no routed reply")


@pytest.fixture
def traced(start_picker, monkeypatch):
    """A picker with --tracing whose spans also go to an in-memory exporter."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")

    async def start(**kw):
        app, ch = await start_picker(endpoints=["127.0.0.1:9"], tracing=True, **kw)
        exporter = InMemorySpanExporter()
        app.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        return app, ch, exporter

    return start


async def test_decision_span_joins_the_clients_trace_and_passes_it_on(traced):
    app, ch, exporter = await traced()
    replies = await exchange(ch, [request_headers(extra={"traceparent": CLIENT_PARENT}), *body_chunks(chat())])
    h = routed_headers(replies)
    version, trace_id, span_id, flags = h["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE, "01") and span_id != CLIENT_SPAN
    (span,) = exporter.get_finished_spans()
    assert span.name == "gateway.request_orchestration"
    assert span.parent is not None and format(span.parent.span_id, "016x") == CLIENT_SPAN
    assert format(span.context.span_id, "016x") == span_id  # the model server's parent is the decision
    attrs = dict(span.attributes or {})
    assert attrs["gateway.endpoint"] == "127.0.0.1:9" and attrs["target_model"] == "m"
    assert attrs["gateway.model"] == "m" and attrs["gateway.request_id"]


async def test_a_request_without_a_trace_starts_one(traced):
    app, ch, exporter = await traced()
    h = routed_headers(await exchange(ch, [request_headers(), *body_chunks(chat())]))
    trace_id = h["traceparent"].split("-")[1]
    (span,) = exporter.get_finished_spans()
    assert span.parent is None and format(span.context.trace_id, "032x") == trace_id


async def test_a_rejected_request_is_an_error_span(traced):
    app, ch, exporter = await traced()
    replies = await exchange(ch, [request_headers(), *body_chunks(b"{not json")])
    assert replies[-1].immediate_response.status.code == 400 or any(
        r.immediate_response.status.code == 400 for r in replies)
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code.name == "ERROR"
    assert dict(span.attributes or {})["http.response.status_code"] == 400


async def test_sampled_out_still_propagates_the_context(traced, monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    app, ch, exporter = await traced()
    h = routed_headers(await exchange(ch, [request_headers(), *body_chunks(chat())]))
    assert int(h["traceparent"].split("-")[3], 16) & 1 == 0  # not sampled, and the model server is told so
    assert exporter.get_finished_spans() == ()


async def test_tracing_off_wraps_nothing(start_picker):
    app, ch = await start_picker(endpoints=["127.0.0.1:9"])
    assert app.decider is app.director and app.tracer_provider is None
    h = routed_headers(await exchange(ch, [request_headers(extra={"traceparent": CLIENT_PARENT}),
                                           *body_chunks(chat())]))
    assert "traceparent" not in h


def test_scores_from_the_scheduler_scratch_become_bounded_attributes():
    ctx = SimpleNamespace(request_id="r", client_model="a", target_model="b", sched_seconds=0.001,
                          endpoints=[SimpleNamespace(address="10.0.0.1:8000")],
                          sched=SimpleNamespace(priority=0, scratch={"scores": {
                              f"10.0.0.{i}:8000": i / 100 for i in range(40)}}))
    attrs = tracing.decision_attributes(ctx)  # type: ignore[arg-type]
    scores = {k: v for k, v in attrs.items() if k.startswith("gateway.score.")}
    assert len(scores) == tracing.MAX_SCORE_ATTRIBUTES and scores["gateway.score.10.0.0.3:8000"] == 0.03


def test_sampler_from_the_environment(monkeypatch):
    for var in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"):
        monkeypatch.delenv(var, raising=False)
    assert "TraceIdRatioBased{0.1}" in tracing._sampler().get_description()  # the reference's default
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "lots")
    assert "TraceIdRatioBased{0.1}" in tracing._sampler().get_description()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    assert tracing._sampler().get_description() == "AlwaysOnSampler"
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "jaeger_remote")
    assert "ParentBased" in tracing._sampler().get_description()  # unsupported: the default, logged


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[str] = []

    async def Export(self, request, context):
        for rs in request.resource_spans:
            service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name", "")
            for ss in rs.scope_spans:
                self.spans.extend(f"{service}:{s.name}" for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_reach_an_otlp_collector_over_grpc(start_picker, monkeypatch):
    collector = _Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        app, ch = await start_picker(endpoints=["127.0.0.1:9"], tracing=True)
        for _ in range(3):
            await exchange(ch, [request_headers(), *body_chunks(chat())])
        await asyncio.to_thread(app.tracer_provider.force_flush, 10_000)
        for _ in range(100):  # bounded: the exporter's thread delivers
            if len(collector.spans) >= 3:
                break
            await asyncio.sleep(0.05)
        assert collector.spans == ["gateway-api-inference-extension/epp:gateway.request_orchestration"] * 3
    finally:
        await server.stop(0)


# ---- through a real Envoy: what the model server receives -------------------------------------------
from tests.e2e.conftest import gateway, needs_envoy  # noqa: E402,F401 (the fixture)


@needs_envoy
@pytest.mark.envoy
async def test_the_model_server_gets_one_traceparent_from_the_decision(gateway, monkeypatch):  # noqa: F811
    from aiohttp import web

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    seen: list[list[str]] = []

    async def completions(request: web.Request) -> web.Response:
        seen.append(request.headers.getall("traceparent", []))
        return web.json_response({"id": "x", "object": "chat.completion", "model": "m", "choices": [],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        e2e = await gateway(sims=0, endpoints=[f"127.0.0.1:{port}"], picker_options={"tracing": True})
        exporter = InMemorySpanExporter()
        e2e.picker.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        r1 = await e2e.post("/v1/chat/completions", payload, traceparent=CLIENT_PARENT)
        r2 = await e2e.post("/v1/chat/completions", payload)
        assert (r1.status, r2.status) == (200, 200)
        spans = exporter.get_finished_spans()
        assert len(seen) == 2 and len(spans) == 2
        for got, span in zip(seen, spans, strict=True):
            assert len(got) == 1, got  # one value: the decision's, not the client's next to it
            assert got[0].split("-")[2] == format(span.context.span_id, "016x")
        assert seen[0][0].split("-")[1] == CLIENT_TRACE  # the client's trace continues at the model server
    finally:
        await runner.cleanup()


async def test_a_tracing_setup_failure_is_logged_and_the_picker_runs(start_picker, monkeypatch, caplog):
    def broken(*a, **kw):
        raise tracing.TracingUnavailable("--tracing needs the OpenTelemetry SDK: No module named 'opentelemetry'")

    monkeypatch.setattr(tracing, "setup", broken)
    app, ch = await start_picker(endpoints=["127.0.0.1:9"], tracing=True)
    assert app.tracer_provider is None and app.decider is app.director
    assert any("tracing is off" in r.getMessage() for r in caplog.records)
    h = routed_headers(await exchange(ch, [request_headers(), *body_chunks(chat())]))
    assert h["x-gateway-destination-endpoint"] == "127.0.0.1:9"

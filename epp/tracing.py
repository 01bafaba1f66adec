"""OpenTelemetry tracing (`--tracing`): one span per decision, its context passed to the model server.

`setup()` builds the tracer provider the way the reference does, from the standard environment:

- `OTEL_TRACES_EXPORTER`: `otlp` (gRPC, or HTTP when `OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL` is
  `http/protobuf`), `console` (spans on stdout; the reference's default when unset) or `none`.
- `OTEL_EXPORTER_OTLP_ENDPOINT` (default `http://localhost:4317`, as the reference sets it),
  `OTEL_SERVICE_NAME` (default `gateway-api-inference-extension/epp`), `OTEL_RESOURCE_ATTRIBUTES`.
- `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`: default `parentbased_traceidratio` at 0.1 (the
  reference's); any sampler name the SDK knows is accepted.

`TracingDecider` wraps the director: for each decision it starts a span
`gateway.request_orchestration` (the reference's name) whose parent is the client's W3C
`traceparent` when there is one, records the model, the target, the chosen endpoints and, when the
scheduler left them in `scratch["scores"]`, their scores; then it adds `traceparent` (and
`tracestate`) to the request headers the proxy forwards, so the model server's spans join the
trace. With `--tracing` off nothing is wrapped: the request path does not change at all.

Spans are exported in batches from a bounded queue (the SDK's 2048 spans); a collector that is down
costs dropped spans, not memory or request latency.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from epp import __version__
from epp.director import Queued, Rejected, RequestContext, Routed

log = logging.getLogger("epp.tracing")

SPAN_NAME = "gateway.request_orchestration"
DEFAULT_SERVICE = "gateway-api-inference-extension/epp"
DEFAULT_ENDPOINT = "http://localhost:4317"
MAX_SCORE_ATTRIBUTES = 16  # a span carries the scores of at most this many endpoints


class TracingUnavailable(RuntimeError):
    """--tracing was asked for but the OpenTelemetry SDK is not installed."""


def _sampler() -> Any:
    from opentelemetry.sdk.trace import sampling

    name = os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_traceidratio").strip().lower()
    arg = os.environ.get("OTEL_TRACES_SAMPLER_ARG", "0.1")
    try:
        ratio = min(max(float(arg), 0.0), 1.0)
    except ValueError:
        log.warning("OTEL_TRACES_SAMPLER_ARG is not a number; using 0.1", extra={"value": arg})
        ratio = 0.1
    fixed = {
        "always_on": sampling.ALWAYS_ON, "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
    }
    if name not in fixed:
        log.warning("unsupported OTEL_TRACES_SAMPLER; using parentbased_traceidratio", extra={"sampler": name})
        name = "parentbased_traceidratio"
    return fixed[name]


def _exporter(kind: str) -> Any:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]
    return GrpcExporter(insecure=endpoint.startswith("http://"))


def setup(span_processor: Any = None) -> Any:
    """A tracer provider from the environment (see module doc); `span_processor` replaces the
    exporter (tests pass an in-memory one). Returns the provider; call `shutdown()` on it at exit.
    Raises TracingUnavailable when the SDK is missing."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:  # pragma: no cover - the SDK is a dependency
        raise TracingUnavailable(f"--tracing needs the OpenTelemetry SDK: {e}") from None
    os.environ.setdefault("OTEL_SERVICE_NAME", DEFAULT_SERVICE)
    os.environ.setdefault("OTEL_EXPORTER_OTLP_ENDPOINT", DEFAULT_ENDPOINT)
    provider = TracerProvider(sampler=_sampler(),
                              resource=Resource.create({"service.version": __version__}))
    if span_processor is None:
        kind = os.environ.get("OTEL_TRACES_EXPORTER", "console").strip().lower()
        if kind not in ("none", ""):
            if kind not in ("otlp", "console"):
                log.warning("unsupported OTEL_TRACES_EXPORTER; using console", extra={"exporter": kind})
                kind = "console"
            span_processor = BatchSpanProcessor(_exporter(kind))
        log.info("tracing on", extra={"exporter": kind, "endpoint": os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"],
                                      "service": os.environ["OTEL_SERVICE_NAME"],
                                      "sampler": os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")})
    if span_processor is not None:
        provider.add_span_processor(span_processor)
    return provider


class TracingDecider:
    """A Decider that traces each decision of `inner` (the director) on `provider`'s tracer;
    everything but decide() is the wrapped decider's own (attribute lookup falls through)."""

    def __init__(self, inner: Any, provider: Any) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.inner = inner
        self.tracer = provider.get_tracer("gateway-api-inference-extension", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._kind = SpanKind.SERVER
        self._error = Status(StatusCode.ERROR)
        self._status = Status

    def __getattr__(self, name: str) -> Any:  # the response path is the wrapped decider's own
        return getattr(self.inner, name)

    def decide(self, headers: dict[str, str], body: bytes | None, subset_hint: object = None,
               started: float | None = None) -> Any:
        parent = self._propagator.extract(headers) if "traceparent" in headers else None
        with self.tracer.start_as_current_span(SPAN_NAME, context=parent, kind=self._kind,
                                               record_exception=False, set_status_on_exception=True) as span:
            result = self.inner.decide(headers, body, subset_hint, started)
            if isinstance(result, Queued):  # flow control holds it: pass this span's context on at dispatch
                self._inject_later(result)
                if span.is_recording():
                    span.set_attribute("gateway.flow_control.queued", True)
                return result
            if not span.is_recording():  # not sampled: still pass the context on, skip the attributes
                if isinstance(result, Routed):
                    self._inject(result)
                return result
            if isinstance(result, Routed):
                if result.ctx is not None:
                    span.set_attributes(decision_attributes(result.ctx))
                span.set_attribute("gateway.destination", result.destination)
                self._inject(result)
            else:
                span.set_attributes({"http.response.status_code": getattr(result, "status", 0),
                                     "gateway.error": getattr(result, "code", "")})
                span.set_status(self._status(self._error.status_code, getattr(result, "message", "")))
            return result

    def _inject_later(self, queued: Queued) -> None:
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        headers = [(k, v) for k, v in carrier.items() if k in ("traceparent", "tracestate")]
        route = queued.route

        def routed_with_context() -> Routed | Rejected:
            out = route()
            if isinstance(out, Routed):
                out.set_headers.extend(headers)
            return out

        queued.route = routed_with_context

    def _inject(self, routed: Routed) -> None:
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        routed.set_headers.extend((k, v) for k, v in carrier.items() if k in ("traceparent", "tracestate"))


def decision_attributes(ctx: RequestContext) -> dict[str, Any]:
    """Span attributes of one routed decision: request, models, endpoints, scores (bounded)."""
    attrs: dict[str, Any] = {
        "gateway.request_id": ctx.request_id,
        "gateway.model": ctx.client_model,
        "target_model": ctx.target_model,
        "request_prio": ctx.sched.priority,
        "gateway.endpoint": ctx.endpoints[0].address if ctx.endpoints else "",
        "gateway.endpoints": [e.address for e in ctx.endpoints],
        "gateway.scheduling_seconds": ctx.sched_seconds,
    }
    scores = ctx.sched.scratch.get("scores") if ctx.sched.scratch else None
    if isinstance(scores, Mapping):
        for i, (addr, score) in enumerate(scores.items()):
            if i >= MAX_SCORE_ATTRIBUTES:
                break
            if isinstance(score, int | float):
                attrs[f"gateway.score.{addr}"] = float(score)
    return attrs

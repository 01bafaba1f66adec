"""One decision per request: parse, resolve the model, admit, choose endpoints, account.

The director is the only place that sees both a request and the pool. It knows neither gRPC nor
protobuf (extproc turns its results into replies) nor how scores are computed (the scheduler).
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from epp import openai
from epp.datastore import Datastore, Endpoint
from epp.flowcontrol.slo_deadline import slo_ttft_seconds
from epp.flowcontrol.types import DROPPED_REASON_HEADER, Drop, FlowKey
from epp.models import NoValidTarget
from epp.parsers import ParsedRequest, ParseError, RequestParser
from epp.parsers.openai_parser import OpenAIParser
from epp.requestcontrol.base import RequestControl, ResponseInfo
from epp.resources import CRITICAL_PRIORITY
from epp.scheduling.framework import Scheduler, SchedulingRequest
from epp.scheduling.session import encode_session_token

if TYPE_CHECKING:
    from epp.flowcontrol.aio import AsyncFlowControl

log = logging.getLogger("epp.director")

DEST_HEADER = "x-gateway-destination-endpoint"
OBJECTIVE_HEADER = "x-gateway-inference-objective"
FAIRNESS_HEADER = "x-gateway-inference-fairness-id"
MODEL_REWRITE_HEADER = "x-gateway-model-name-rewrite"
# llm-d's names for the same headers; read first, as llm-d reads them (the x-gateway-* names are its aliases)
OBJECTIVE_HEADERS = ("x-llm-d-inference-objective", OBJECTIVE_HEADER)
FAIRNESS_HEADERS = ("x-llm-d-inference-fairness-id", FAIRNESS_HEADER)
MODEL_REWRITE_HEADERS = ("x-llm-d-model-name-rewrite", MODEL_REWRITE_HEADER)
DEFAULT_FAIRNESS_ID = "default-flow"
REQUEST_ID_HEADER = "x-request-id"
# Request headers a profile handler sets for the decode pod's sidecar (P/D, data parallel)
DISAGG_HEADERS = ("x-prefiller-host-port", "x-encoder-hosts-ports", "x-data-parallel-host-port")
# Conformance hooks: active only through the header-based-testing-filter and the
# destination-endpoint-served-verifier plugins; the names stay here for tests and tools.
CONFORMANCE_SELECT_HEADER = "test-epp-endpoint-selection"
CONFORMANCE_SERVED_HEADER = "x-conformance-test-served-endpoint"

# The reference's fixed error texts (clients and dashboards match on them)
NO_CANDIDATES = "failed to find endpoint candidates for serving the request"
SHED = "system saturated, sheddable request dropped"
NO_PODS = "no pods available in datastore"

# google.rpc codes for requests whose parser speaks gRPC (errors must be gRPC status errors)
_GRPC_CODE = {400: 3, 404: 5, 413: 8, 429: 8, 500: 13, 503: 14}


def header_value(headers: Mapping[str, str], names: Sequence[str]) -> str:
    """The first non-empty value among `names` ("" when none is set)."""
    for n in names:
        v = headers.get(n)
        if v:
            return v
    return ""


def fairness_id(headers: Mapping[str, str]) -> str:
    """The flow-control fairness id of a request (`default-flow` when the client sets none)."""
    return header_value(headers, FAIRNESS_HEADERS) or DEFAULT_FAIRNESS_ID


class LoadShare(Protocol):
    """In-flight counts shared with other pickers (epp.workershare: --workers; epp.peers: --ha-peers)."""

    def refresh(self, endpoints: Sequence[Endpoint]) -> None: ...

    def routed(self, ep: Endpoint, requests: int, tokens: int, request: SchedulingRequest | None = None) -> None: ...

    # optional: `clock(ep)` publishes `ep.prefill_until` after a plugin moved it on a finish (workers)


class Admission(Protocol):
    """Decides whether a request is shed (429) before scheduling."""

    def check(self, request: SchedulingRequest, candidates: Sequence[Endpoint], now: float) -> str | None: ...


class Preparer(Protocol):
    """Async work a request needs before it is scheduled (the engine's render of its tokens)."""

    def needs_prepare(self, request: SchedulingRequest) -> bool: ...

    async def prepare(self, request: SchedulingRequest) -> None: ...


class Telemetry(Protocol):
    """Receives request lifecycle events (the picker's own Prometheus metrics)."""

    def routed(self, ctx: RequestContext) -> None: ...

    def rejected(self, ctx: RequestContext | None, model: str, target: str, error: Rejected) -> None: ...

    def finished(self, ctx: RequestContext) -> None: ...


@dataclass(slots=True)
class Rejected:
    """An HTTP error the proxy returns to the client instead of forwarding."""

    status: int
    code: str  # BadRequest, ResourceExhausted, ServiceUnavailable, NotFound, PayloadTooLarge, Internal
    message: str
    grpc_status: int | None = None  # set: answer as a gRPC error (HTTP 200, grpc-status/grpc-message)
    detail: str = ""  # why, for the proxy's logs (ImmediateResponse.details); never shown to clients
    headers: tuple[tuple[str, str], ...] = ()  # extra response headers (x-llm-d-request-dropped-reason)

    @property
    def body(self) -> bytes:
        return f"inference error: {self.code} - {self.message}".encode()


@dataclass(slots=True, eq=False)
class RequestContext:
    """One routed request, from the decision to its end; owned by one ext_proc stream."""

    request_id: str
    sched: SchedulingRequest
    endpoints: list[Endpoint]
    client_model: str
    target_model: str
    stream: bool
    api: str
    request_size: int
    started: float  # time.perf_counter() at the first ext_proc message
    routed_at: float = 0.0
    first_byte_at: float = 0.0
    served: Endpoint | None = None  # the endpoint that actually served (fallbacks may differ)
    prompt_tokens_est: int = 0
    usage_prompt: int = 0
    usage_completion: int = 0
    usage_cached: int = 0  # usage.prompt_tokens_details.cached_tokens, when the engine reports it
    response_size: int = 0
    status: str = ""  # response :status
    rewrite_source: str = "none"
    rewrite_rule: str = ""  # namespace/name of the object that chose the target
    sched_seconds: float = 0.0  # time inside the scheduler
    finished: bool = False

    @property
    def rewritten(self) -> bool:
        return self.client_model != self.target_model and bool(self.client_model)


@dataclass(slots=True)
class Routed:
    """A successful decision: where to send, and the body to send (None = unchanged)."""

    ctx: RequestContext | None  # None: nothing to follow on the response path (body-based routing)
    destination: str  # "ip:port[,ip:port...]", primary first; "" = no destination (no envoy.lb metadata)
    body: bytes | None
    set_headers: list[tuple[str, str]]
    # Client request headers that must not reach the upstream (a set_headers entry of the same
    # name replaces the client's value instead).
    remove_headers: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Queued:
    """A request flow control holds; `Director.wait(queued)` gives its Routed or Rejected."""

    key: FlowKey
    byte_size: int
    request_id: str
    model: str
    target: str
    grpc: bool
    route: Callable[[], Routed | Rejected]
    slo_ttft: float | None = None  # x-llm-d-slo-ttft-ms in seconds (slo-deadline-ordering-policy)
    # awaited before flow control and route() (preparers: the engine's render of the prompt's tokens)
    prepare: Callable[[], Awaitable[None]] | None = None


def _prompt_tokens(parsed: ParsedRequest | None, body: bytes | None) -> int:
    """The request's prompt size in tokens: the parser's exact count when it has one (token-id
    requests, e.g. gRPC `extra["prompt_tokens"]`), else ~4 bytes a token of the body (not of the
    prompt text, which is cut at openai.PROMPT_LIMIT)."""
    if parsed is not None:
        n = parsed.extra.get("prompt_tokens")
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            return n
    return (len(body) if body is not None else 0) // 4


def _parse_subset(value: object) -> list[str] | None:
    """Subset hint as a list of addresses (the proxy may send a list or one CSV string)."""
    if value is None:
        return None
    items: list[str] = []
    raw = value if isinstance(value, list | tuple) else [value]
    for v in raw:
        if isinstance(v, str):
            items.extend(p.strip() for p in v.split(",") if p.strip())
    return items


def _host(addr: str) -> str:
    if addr.startswith("["):
        return addr[1 : addr.find("]")]
    host, sep, port = addr.rpartition(":")
    return host if sep and port.isdigit() else addr


class Director:
    """Turns a parsed request into a Routed decision or a Rejected error, and tracks its end."""

    def __init__(
        self,
        datastore: Datastore,
        scheduler: Scheduler,
        *,
        admission: Admission | None = None,
        telemetry: Telemetry | None = None,
        session_header: str | None = None,
        max_body_bytes: int = 16 * 1024 * 1024,
        rng: random.Random | None = None,
        parser: RequestParser | None = None,
        request_control: RequestControl | None = None,
        flow_control: AsyncFlowControl | None = None,
        preparers: Sequence[Preparer] | None = None,
        share: LoadShare | None = None,
    ) -> None:
        self.datastore = datastore
        self.share = share  # --workers / --ha-peers: the others' in-flight counts, folded in before each decision
        self._share_clock = getattr(share, "clock", None)  # --workers: the prefill clocks' cells
        self.session_header = session_header
        self.scheduler = scheduler
        self.admission = admission
        self.telemetry = telemetry
        self.max_body_bytes = max_body_bytes
        self._rng = rng or random.Random()
        self.parser: RequestParser = parser if parser is not None else OpenAIParser()
        self.request_control = request_control or RequestControl()
        self.flow_control = flow_control  # set: requests wait in flow control instead of being shed
        # None: the scheduler's own (token producers that render through the engine); empty: no
        # request ever waits before scheduling
        if preparers is None:
            from epp.producers.precise_prefix import find_preparers  # lazy: a plugin module

            preparers = find_preparers(scheduler)
        self.preparers: tuple[Preparer, ...] = tuple(preparers)

    # ---- request path ---------------------------------------------------------------------
    def decide(
        self,
        headers: Mapping[str, str],
        body: bytes | None,
        subset_hint: object = None,
        started: float | None = None,
    ) -> Routed | Rejected | Queued:
        """Decide for one request. `body` None means a header-only request. With flow control, or
        when a preparer must first await something for it (the engine's render of its tokens), the
        answer is Queued: the caller awaits `wait(queued)` for the decision."""
        started = time.perf_counter() if started is None else started
        request_id = headers.get(REQUEST_ID_HEADER) or ""
        set_headers: list[tuple[str, str]] = []
        if not request_id:
            request_id = uuid.uuid4().hex
            set_headers.append((REQUEST_ID_HEADER, request_id))
        path = headers.get(":path") or headers.get("x-original-path") or headers.get("x-forwarded-path") or ""
        if openai.api_for_path(path) is None:
            # the reference reads the API type from the path, then these headers
            alt = headers.get("x-original-path") or headers.get("x-forwarded-path")
            path = alt if alt and openai.api_for_path(alt) else path

        parsed: ParsedRequest | None = None
        new_body: bytes | None = None
        client_model = target = ""
        priority = 0
        source = rule = "none"
        grpc = False
        if body is not None:
            if len(body) > self.max_body_bytes:
                return self._reject(None, "", "", Rejected(413, "PayloadTooLarge",
                                                         f"request body exceeds {self.max_body_bytes} bytes"))
            try:
                parsed = self.parser.parse(headers, body, path)
            except ParseError as e:
                return self._reject(None, "", "", Rejected(e.status, e.code, e.message, grpc_status=e.grpc_status))
            except RecursionError:  # a parser's own walk over a deep body: the body is the problem
                return self._reject(None, "", "", Rejected(400, "BadRequest", "request body is nested too deeply"))
            grpc = parsed.grpc
            client_model = target = parsed.model
            if client_model:
                forced = header_value(headers, MODEL_REWRITE_HEADERS) or None
                try:
                    res = self.datastore.models.resolve(client_model, forced, self._rng)
                except NoValidTarget as e:
                    return self._reject(None, client_model, "", self._error(404, "NotFound", str(e), grpc))
                priority, source, rule = res.priority, res.source, res.rule
                if res.target != client_model and parsed.rewrite is not None:
                    try:
                        new_body = parsed.rewrite(res.target)
                    except RecursionError:
                        return self._reject(None, client_model, "", Rejected(
                            400, "BadRequest", "request body is nested too deeply"))
                    target = res.target
                elif res.target != client_model:
                    source, rule = "none", ""  # this parser cannot change the body's model
        objective = header_value(headers, OBJECTIVE_HEADERS)
        if objective:
            p = self.datastore.objective_priority(objective)
            if p is not None:
                priority = p

        sched = SchedulingRequest(
            request_id=request_id,
            model=target,
            client_model=client_model,
            priority=priority,
            headers=headers,
            prompt=parsed.prompt if parsed is not None else "",
            body=parsed.body if parsed is not None else None,
        )

        def route() -> Routed | Rejected:
            """Admission (without flow control), scheduling and accounting, on the pool as it is now."""
            candidates: Sequence[Endpoint] = self.datastore.candidates
            hint = _parse_subset(subset_hint)
            if hint is not None:
                hosts = {_host(a) for a in hint}
                candidates = [e for e in candidates if e.ip in hosts]
            if self.share is not None:
                self.share.refresh(candidates)
            if not candidates:
                # the reference: a header-only request finds no pods; a body request no candidates
                why = NO_PODS if body is None and hint is None else NO_CANDIDATES
                detail = ("no endpoint in the subset hint is in the pool" if hint is not None
                          else "no ready endpoints")
                return self._reject(None, client_model, target,
                                    self._error(503, "ServiceUnavailable", why, grpc, detail))

            if self.admission is not None and self.flow_control is None and priority < CRITICAL_PRIORITY:
                reason = self.admission.check(sched, candidates, time.monotonic())
                if reason:
                    return self._reject(None, client_model, target,
                                        self._error(429, "ResourceExhausted", SHED, grpc, reason))

            t0 = time.perf_counter()
            result = self.scheduler.schedule(sched, candidates)
            t1 = time.perf_counter()
            if not result.endpoints:
                return self._reject(None, client_model, target, self._error(
                    429, "ResourceExhausted",
                    f"failed to find target endpoint: {result.reason or 'no endpoint could be scheduled'}", grpc))

            primary = result.endpoints[0]
            ctx = RequestContext(
                request_id=request_id,
                sched=sched,
                endpoints=result.endpoints,
                client_model=client_model,
                target_model=target,
                stream=parsed.stream if parsed is not None else False,
                api=parsed.api if parsed is not None else "",
                request_size=len(body) if body is not None else 0,
                started=started,
                routed_at=t1,
                prompt_tokens_est=_prompt_tokens(parsed, body),
                rewrite_source=source,
                rewrite_rule=rule,
                sched_seconds=t1 - t0,
            )
            self.scheduler.on_routed(sched, primary)
            self._account(ctx, primary, sched)  # after on_routed: the plugins' notes for peers are made there
            # The decoded body can be several times the size of the bytes; the context lives as long
            # as the response, so let it go now that scheduling is done (nothing reads it afterwards).
            sched.body = None
            if self.telemetry is not None:
                self.telemetry.routed(ctx)
            destination = result.destination or ",".join(e.address for e in result.endpoints)
            set_headers.append((DEST_HEADER, destination))
            # P/D: the prefill (encode, data-parallel rank) pods the profile handler chose; a client
            # never chooses them (the sidecar would call whatever host the header names)
            set_headers.extend(result.headers)
            remove = [h for h in DISAGG_HEADERS if h in headers]
            # As the reference: every request with a body carries the length of the body sent on
            # (changed or not), so the proxy never forwards a stale Content-Length.
            size = len(new_body) if new_body is not None else len(body) if body is not None else 0
            if size > 0:
                set_headers.append(("content-length", str(size)))
            return Routed(ctx=ctx, destination=destination, body=new_body, set_headers=set_headers,
                          remove_headers=remove)

        prepare = self._prepare_for(sched) if self.preparers and body is not None else None
        if self.flow_control is None and prepare is None:
            return route()
        # Flow control: the request waits in its flow's queue; route() runs when it is dispatched
        # (late binding: the endpoints are chosen on the pool as it is then).
        return Queued(key=FlowKey(priority, fairness_id(headers)), byte_size=len(body) if body is not None else 0,
                      request_id=request_id, model=client_model, target=target, grpc=grpc, route=route,
                      slo_ttft=slo_ttft_seconds(headers),
                      prepare=prepare)

    def _prepare_for(self, sched: SchedulingRequest) -> Callable[[], Awaitable[None]] | None:
        """The preparers this request needs, as one awaitable step (None: it needs none)."""
        todo = [p for p in self.preparers if p.needs_prepare(sched)]
        if not todo:
            return None

        async def prepare() -> None:
            for p in todo:
                try:
                    await p.prepare(sched)
                except Exception:  # a preparer's bug must not fail the request: it is scheduled without
                    log.exception("pre-scheduling step failed", extra={"request_id": sched.request_id})

        return prepare

    async def wait(self, queued: Queued) -> Routed | Rejected:
        """Wait while flow control holds the request; its decision, or the flow-control error with
        the `x-llm-d-request-dropped-reason` header. Cancelled (the stream went away): the request
        leaves its queue at once. A request with a pre-scheduling step awaits it first."""
        if queued.prepare is not None:
            await queued.prepare()
        fc = self.flow_control
        if fc is None:
            return queued.route()
        out = await fc.admit(queued.key, queued.route, byte_size=queued.byte_size, request_id=queued.request_id,
                             model=queued.model, target_model=queued.target, unbind=self._unbind,
                             slo_ttft=queued.slo_ttft)
        if isinstance(out, Drop):
            err = self._error(out.status, out.code, out.message, queued.grpc, detail=f"flow control: {out.reason}")
            err.headers = ((DROPPED_REASON_HEADER, out.reason),)
            return self._reject(None, queued.model, queued.target, err)
        return out

    def _unbind(self, result: Routed | Rejected) -> None:
        if isinstance(result, Routed):
            self.finish(result.ctx)

    @staticmethod
    def _error(status: int, code: str, message: str, grpc: bool, detail: str = "") -> Rejected:
        return Rejected(status, code, message, grpc_status=_GRPC_CODE.get(status, 2) if grpc else None,
                        detail=detail)

    def _reject(self, ctx: RequestContext | None, model: str, target: str, error: Rejected) -> Rejected:
        if self.telemetry is not None:
            self.telemetry.rejected(ctx, model, target, error)
        return error

    def _account(self, ctx: RequestContext, ep: Endpoint, request: SchedulingRequest | None = None) -> None:
        ctx.served = ep
        ep.inflight += 1
        ep.inflight_tokens += ctx.prompt_tokens_est
        if self.share is not None:
            self.share.routed(ep, 1, ctx.prompt_tokens_est, request)

    def _release(self, ctx: RequestContext) -> None:
        ep = ctx.served
        if ep is not None:
            ep.inflight = max(0, ep.inflight - 1)
            ep.inflight_tokens = max(0, ep.inflight_tokens - ctx.prompt_tokens_est)
            if self.share is not None:
                self.share.routed(ep, -1, -ctx.prompt_tokens_est)

    # ---- response path --------------------------------------------------------------------
    def served_by(self, ctx: RequestContext, address: str) -> None:
        """The proxy reports which endpoint served (a fallback when the primary failed)."""
        if ctx.finished or not address:
            return
        address = address.split(",", 1)[0].strip()
        if ctx.served is not None and ctx.served.address == address:
            return
        ep = self.datastore.endpoints.get(address)
        if ep is None:
            return
        self._release(ctx)
        self._account(ctx, ep)

    def response_headers(self, ctx: RequestContext, served: str | None,
                         lb_metadata: bool = False) -> list[tuple[str, str]]:
        """Headers to add to the response: the session token, then the request-control plugins'.
        `served` is the endpoint the proxy reported (None: it reported none); `lb_metadata` whether
        its message carried an `envoy.lb` metadata namespace."""
        out: list[tuple[str, str]] = []
        address = served or (ctx.served.address if ctx.served is not None else "")
        if self.session_header and address:
            out.append((self.session_header, encode_session_token(address.split(",", 1)[0])))
        if self.request_control.response_header:
            info = ResponseInfo(served=served, lb_metadata=lb_metadata)
            for plugin in self.request_control.response_header:
                try:
                    out.extend(plugin.response_header(ctx, info))
                except Exception:  # a plugin bug must not fail the response
                    log.exception("response-header plugin %s failed", plugin.name,
                                  extra={"request_id": ctx.request_id})
        return out

    def response_metadata(self, ctx: RequestContext) -> dict[str, dict[str, float]] | None:
        """Dynamic metadata for the last response-body reply (request-control plugins), or None."""
        if not self.request_control.response_complete:
            return None
        out: dict[str, dict[str, float]] = {}
        for plugin in self.request_control.response_complete:
            try:
                md = plugin.response_complete(ctx)
            except Exception:
                log.exception("response plugin %s failed", plugin.name, extra={"request_id": ctx.request_id})
                continue
            for ns, fields in (md or {}).items():
                out.setdefault(ns, {}).update(fields)
        return out or None

    def finish(self, ctx: RequestContext | None) -> None:
        """The request ended (response complete, error, or the stream went away). Idempotent."""
        if ctx is None or ctx.finished:
            return
        ctx.finished = True
        self._release(ctx)
        if self.flow_control is not None:
            self.flow_control.notify()  # room may have opened for a queued request
        if ctx.served is not None:
            clock = ctx.served.prefill_until
            try:
                self.scheduler.on_finished(ctx.sched, ctx.served)
            except Exception:  # a plugin bug must not leak in-flight state or the stream
                log.exception("scheduler on_finished failed", extra={"request_id": ctx.request_id})
            if self._share_clock is not None and ctx.served.prefill_until != clock:
                self._share_clock(ctx.served)  # the prefill-backlog scorer moved it: the siblings see that
        if self.telemetry is not None:
            self.telemetry.finished(ctx)

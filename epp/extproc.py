"""The Envoy ext_proc servicer: one state machine per stream (one HTTP request).

It knows gRPC, Envoy's processing modes and reply order; every decision is the director's.

Request side:
- FULL_DUPLEX_STREAMED (the reference's mode): the request-headers reply is held until the body's
  end_of_stream, then the headers reply (destination, metadata) and the body in <= 62000-byte
  `streamed_response` chunks follow.
- BUFFERED / BUFFERED_PARTIAL: headers are answered at once; the one body message is answered with
  the header mutation, the (rewritten) body and the metadata.
- STREAMED: the pick is made on headers alone (body chunks cannot carry a header mutation later).
- Header-only requests (end_of_stream on headers): picked at once.
The mode comes from `protocol_config` on the first message (Envoy sends it); without one the
configured default applies (duplex, as the reference ships).

Response side: SSE bodies, gRPC bodies (application/grpc: usage read from the framed vLLM
messages of Generate/Embed calls), and every body of a `"stream": true` request whatever its
content type, are passed through chunk by chunk (with the client's model name restored when it was
rewritten, and usage read from the stream); other bodies are held to end_of_stream, then usage is read and the
body returned whole. A held body that ends with trailers instead is sent on the trailers (body
reply, end_of_stream false, then the trailers reply), as is a held restorer tail.

Bounds: one request body is capped by the director's `max_body_bytes` (413) and `max_body_chunks`
messages (413); all bodies held at once share `buffer_budget` bytes (429 for a request that would
exceed it; a held response that would, or that outgrows `max_body_bytes`, is streamed on instead).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from epp import openai
from epp.director import (
    DEST_HEADER,
    MODEL_REWRITE_HEADERS,
    Queued,
    Rejected,
    RequestContext,
    Routed,
)
from epp.parsers import vllmgrpc

log = logging.getLogger("epp.extproc")

CHUNK = 62000  # max bytes per streamed body reply (the reference's limit)
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
SERVED_KEY = "x-gateway-destination-endpoint-served"
# ParsedRequest.api of the vLLM gRPC calls whose responses carry token counts -> the scanner's method
_GRPC_METHODS = {"grpc-generate": "generate", "grpc-embed": "embed"}

_Mode = processing_mode_pb2.ProcessingMode
NONE, STREAMED, BUFFERED, BUFFERED_PARTIAL, DUPLEX = (
    _Mode.NONE, _Mode.STREAMED, _Mode.BUFFERED, _Mode.BUFFERED_PARTIAL, _Mode.FULL_DUPLEX_STREAMED)

# replies with no content are immutable once built: share them
_EMPTY_REQ_HEADERS = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
_EMPTY_RESP_HEADERS = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
_EMPTY_REQ_BODY = ep.ProcessingResponse(request_body=ep.BodyResponse())
_EMPTY_RESP_BODY = ep.ProcessingResponse(response_body=ep.BodyResponse())
_REQ_TRAILERS = ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
_RESP_TRAILERS = ep.ProcessingResponse(response_trailers=ep.TrailersResponse())


def _header_map(hm: Any) -> dict[str, str]:
    out = {}
    for h in hm.headers:
        raw = h.raw_value
        out[h.key] = raw.decode("utf-8", "replace") if raw else h.value
    return out


def _hvo(key: str, value: str, overwrite: bool = False) -> base_pb2.HeaderValueOption:
    hv = base_pb2.HeaderValue(key=key, raw_value=value.encode())
    if overwrite:
        return base_pb2.HeaderValueOption(
            header=hv, append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
    return base_pb2.HeaderValueOption(header=hv)


def immediate(error: Rejected) -> ep.ProcessingResponse:
    """An ImmediateResponse carrying the director's error. A gRPC request's error is a gRPC status
    error: HTTP 200, `grpc-status` / `grpc-message` headers, content-type application/grpc, no body."""
    details = f"{error.code}: {error.message}" + (f" ({error.detail})" if error.detail else "")
    if error.grpc_status is not None:
        return ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=200),  # type: ignore[arg-type]
            # overwrite: Envoy's own local reply to a gRPC request may set them as well
            headers=ep.HeaderMutation(set_headers=[
                _hvo("content-type", "application/grpc", overwrite=True),
                _hvo("grpc-status", str(error.grpc_status), overwrite=True),
                _hvo("grpc-message", _grpc_message(error.message), overwrite=True),
                *(_hvo(k, v, overwrite=True) for k, v in error.headers),
            ]),
            grpc_status=ep.GrpcStatus(status=error.grpc_status),
            details=details[:200],
        ))
    return ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=error.status),  # type: ignore[arg-type]
        headers=ep.HeaderMutation(set_headers=[_hvo("content-type", "text/plain; charset=utf-8"),
                                               *(_hvo(k, v) for k, v in error.headers)]),
        body=error.body,
        details=details[:200],
    ))


def _grpc_message(text: str) -> str:
    """`grpc-message` is percent-encoded (gRPC over HTTP/2): everything outside printable ASCII and '%'."""
    return "".join(c if " " <= c <= "~" and c != "%" else "".join(f"%{b:02X}" for b in c.encode("utf-8", "replace"))
                   for c in text[:512])


def _metadata(destination: str) -> struct_pb2.Struct | None:
    if not destination:
        return None
    md = struct_pb2.Struct()
    md.fields[LB_NAMESPACE].struct_value.fields[DEST_HEADER].string_value = destination
    return md


def _numbers_metadata(values: dict[str, dict[str, float]]) -> struct_pb2.Struct:
    md = struct_pb2.Struct()
    for ns, fields in values.items():
        target = md.fields[ns].struct_value
        for k, v in fields.items():
            target.fields[k].number_value = v
    return md


_ROUTE_REPLIES: dict[tuple[str, str, str], ep.ProcessingResponse] = {}


def _route_reply(kind: str, routed: Routed) -> ep.ProcessingResponse:
    """The routed reply (`kind`: request_headers or request_body). The common case (only the
    destination header, body unchanged) is built once per destination and reused: a reply message
    is never mutated after it is built, and building it is a measurable share of a request's CPU."""
    sh = routed.set_headers
    simple = routed.body is None and not routed.remove_headers and 1 <= len(sh) <= 2 and sh[0][0] == DEST_HEADER \
        and (len(sh) == 1 or sh[1][0] == "content-length")
    if simple:
        key = (kind, routed.destination, sh[1][1] if len(sh) == 2 else "")
        reply = _ROUTE_REPLIES.get(key)
        if reply is not None:
            return reply
    common = _common(routed, kind == "request_body")
    if kind == "request_headers":
        reply = ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common),
                                      dynamic_metadata=_metadata(routed.destination))
    else:
        reply = ep.ProcessingResponse(request_body=ep.BodyResponse(response=common),
                                      dynamic_metadata=_metadata(routed.destination))
    if simple:
        if len(_ROUTE_REPLIES) >= 4096:  # bounded: pools change, lists of fallbacks vary
            _ROUTE_REPLIES.clear()
        _ROUTE_REPLIES[key] = reply
    return reply


def _common(routed: Routed, body_in_reply: bool) -> ep.CommonResponse:
    drop = routed.remove_headers
    if drop:  # a header the decision sets replaces the client's; the others are removed
        setting = {k for k, _ in routed.set_headers}
        mutation = ep.HeaderMutation(set_headers=[_hvo(k, v, overwrite=k in drop) for k, v in routed.set_headers],
                                     remove_headers=[h for h in drop if h not in setting])
    else:
        mutation = ep.HeaderMutation(set_headers=[_hvo(k, v) for k, v in routed.set_headers])
    common = ep.CommonResponse(header_mutation=mutation, clear_route_cache=True)
    if body_in_reply and routed.body is not None:
        common.body_mutation.body = routed.body
    return common


def _streamed_body(kind: str, body: bytes, end: bool) -> list[ep.ProcessingResponse]:
    """`body` as streamed_response replies of at most CHUNK bytes (an empty body: one message).
    (A bytearray or memoryview is accepted too: slices become bytes in the message.)"""
    out = []
    n = len(body)
    pos = 0
    while True:
        piece = body[pos : pos + CHUNK] if n > CHUNK else body
        pos += CHUNK
        last = pos >= n
        br = ep.BodyResponse(response=ep.CommonResponse(body_mutation=ep.BodyMutation(
            streamed_response=ep.StreamedBodyResponse(body=piece, end_of_stream=end and last))))
        out.append(ep.ProcessingResponse(**{kind: br}))
        if last:
            return out


_OVERRIDES: dict[int, processing_mode_pb2.ProcessingMode] = {}


def _override_modes(req_mode: int) -> processing_mode_pb2.ProcessingMode:
    """The mode_override that drops the response body: the request side as configured (done by
    now), response headers and trailers SEND."""
    mode = _OVERRIDES.get(req_mode)
    if mode is None:
        send = _Mode.SEND
        mode = _Mode(request_header_mode=send, response_header_mode=send,  # type: ignore[arg-type]
                     request_body_mode=req_mode, response_body_mode=NONE,  # type: ignore[arg-type]
                     request_trailer_mode=send if req_mode == DUPLEX else _Mode.SKIP,
                     response_trailer_mode=send)
        _OVERRIDES[req_mode] = mode
    return mode


_SKIP_RESPONSE: dict[int, ep.ProcessingResponse] = {}


def _skip_response_reply(req_mode: int) -> ep.ProcessingResponse:
    """The request-headers reply that turns the whole response side off for this request: the
    request side as configured, response headers, body and trailers skipped. Envoy honours it on a
    headers reply only (allow_mode_override, request body not FULL_DUPLEX_STREAMED); with a
    BUFFERED request body the stream still stays open until the HTTP exchange ends (Envoy 1.40
    closes a stream early only after a streamed body's last reply; measured: tests/e2e/
    test_mode_override.py), so the in-flight count ends with the stream. Built once per mode."""
    reply = _SKIP_RESPONSE.get(req_mode)
    if reply is None:
        send, skip = _Mode.SEND, _Mode.SKIP
        mode = _Mode(request_header_mode=send, response_header_mode=skip,  # type: ignore[arg-type]
                     request_body_mode=req_mode, response_body_mode=NONE,  # type: ignore[arg-type]
                     request_trailer_mode=skip, response_trailer_mode=skip)
        reply = ep.ProcessingResponse(request_headers=ep.HeadersResponse(), mode_override=mode)
        _SKIP_RESPONSE[req_mode] = reply
    return reply


def _can_rewrite(models: Any) -> bool:
    """Whether the model table can send a request on under another model name (a rewrite rule,
    or an InferenceModel with a target of another name)."""
    if getattr(models, "exact", None) or getattr(models, "generic", None):
        return True
    return any(t.name != m.model_name for m in getattr(models, "models", {}).values() for t in m.targets)


def _struct_value(md: Any, namespace: str, key: str) -> object:
    """A value from metadata_context.filter_metadata[namespace][key] as str / list[str] / None."""
    fm = md.filter_metadata
    if namespace not in fm:
        return None
    fields = fm[namespace].fields
    if key not in fields:
        return None
    v = fields[key]
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "list_value":
        return [x.string_value for x in v.list_value.values if x.WhichOneof("kind") == "string_value"]
    return None


class Decider(Protocol):
    """What the servicer asks for each request: the endpoint picker's Director, or the body router."""

    max_body_bytes: int

    def decide(self, headers: dict[str, str], body: bytes | None, subset_hint: object = None,
               started: float | None = None) -> Routed | Rejected | Queued: ...

    def served_by(self, ctx: RequestContext, address: str) -> None: ...

    def response_headers(self, ctx: RequestContext, served: str | None,
                         lb_metadata: bool = False) -> list[tuple[str, str]]: ...

    def response_metadata(self, ctx: RequestContext) -> dict[str, dict[str, float]] | None: ...

    def finish(self, ctx: RequestContext | None) -> None: ...


TRIM_AFTER = 4 * 1024 * 1024  # a body this large, once released, asks the allocator to give memory back
TRIM_EVERY = 1.0  # seconds: at most one malloc_trim in this interval (it walks the heap: ~4 ms at worst)
_trim_state: dict[str, Any] = {"fn": None, "last": 0.0}


def _malloc_trim() -> None:
    """Return freed heap to the OS after a huge body (glibc keeps it otherwise: its mmap threshold
    grows after freeing a large block, so later large bodies land on the heap and stay resident).
    A no-op where there is no glibc; rate-limited."""
    now = time.monotonic()
    if now - _trim_state["last"] < TRIM_EVERY:
        return
    _trim_state["last"] = now
    fn = _trim_state["fn"]
    if fn is None:
        try:
            import ctypes

            fn = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            fn = False
        _trim_state["fn"] = fn
    if fn:
        fn(0)


MAX_BODY_CHUNKS = 16384  # body messages per request: a 16 MiB body at >= 1 KiB a message (TCP-segment sized)
BUFFER_BUDGET = 256 * 1024 * 1024  # bytes of request and response bodies held at once, all streams together


class _Stream:
    """Per-stream state. Slots keep it small: one per in-flight HTTP request."""

    __slots__ = (
        "body_chunks",
        "body_parts",
        "body_size",
        "ctx",
        "decided",
        "done",
        "headers",
        "held",
        "override",
        "pending",
        "req_mode",
        "resp_body_seen",
        "resp_ended",
        "resp_mode",
        "resp_parts",
        "resp_size",
        "resp_stream",
        "restorer",
        "sampled",
        "scanner",
        "started",
        "subset",
        "trim",
    )

    def __init__(self, started: float) -> None:
        self.started = started
        self.req_mode = -1
        self.resp_mode = -1
        self.headers: dict[str, str] = {}
        self.subset: object = None
        self.body_parts: list[bytes] = []  # joined once at the end: linear in the body, whatever the chunking
        self.body_size = 0
        self.body_chunks = 0
        self.held = 0  # bytes of this stream counted in the servicer's buffer budget
        self.decided = False
        self.done = False  # an immediate response was sent: nothing more to do
        self.ctx: RequestContext | None = None
        # flow control holds the request: what to await, and how to build the replies from the decision
        self.pending: tuple[Queued, Callable[[Routed], list[ep.ProcessingResponse]]] | None = None
        self.resp_stream = False  # pass the response body through chunk by chunk
        self.resp_parts: list[bytes] = []
        self.resp_size = 0
        self.resp_body_seen = False
        self.resp_ended = False  # the last response-body reply went out
        self.restorer: openai.ModelRestorer | None = None
        self.scanner: openai.SSEUsageScanner | vllmgrpc.UsageScanner | None = None
        self.trim = False  # a huge body was let go: trim the heap once the replies are written
        self.override: processing_mode_pb2.ProcessingMode | None = None  # the mode_override sent
        self.sampled: bool | None = None  # in the response-body sample (None: not drawn yet)


class ExtProcServicer(ep_grpc.ExternalProcessorServicer):
    """envoy.service.ext_proc.v3.ExternalProcessor/Process on grpc.aio."""

    def __init__(self, director: Decider, default_body_mode: int = DUPLEX,
                 default_response_mode: int = DUPLEX, *, buffer_budget: int = BUFFER_BUDGET,
                 max_body_chunks: int = MAX_BODY_CHUNKS, response_body_sample: float = 1.0,
                 response_headers_sample: float = 1.0) -> None:
        """`response_body_sample`: the share of requests whose response body still crosses the
        picker when nothing else needs it (token metrics are read from it); the others are told
        to skip it (`mode_override`, honoured when Envoy's filter sets `allow_mode_override`).
        1.0 (the default here) never overrides: every body crosses, as the reference's does.
        `response_headers_sample`: with a BUFFERED request body, the share of the others whose
        response headers still cross (time to first byte, TTFT, upstream status are read from
        them) when nothing else needs them (a possible model rewrite, a session header, a
        response plugin, fallbacks in the routes); the rest skip the whole response side, told on
        the request-headers reply: 2 messages a request. 1.0 (the default here) never skips them."""
        if not 0.0 <= response_body_sample <= 1.0:
            raise ValueError("response_body_sample must be within 0..1")
        if not 0.0 <= response_headers_sample <= 1.0:
            raise ValueError("response_headers_sample must be within 0..1")
        self.director = director
        self.response_body_sample = response_body_sample
        self.response_headers_sample = response_headers_sample
        self._sample_acc = 0.0  # deterministic sampling: one in 1/share requests, evenly spread
        self._headers_acc = 0.0
        self.body_overrides = 0  # requests told to skip the response body (tests, benchmarks)
        self.response_skips = 0  # requests told to skip the whole response side (tests, benchmarks)
        self.fallbacks_seen = False  # a decision named fallbacks: the served endpoint matters from now on
        self._rewrites: tuple[object, bool] = (None, True)  # (model table, it can rewrite)
        self.default_body_mode = default_body_mode
        self.default_response_mode = default_response_mode
        self.buffer_budget = buffer_budget
        self.max_body_chunks = max_body_chunks
        self.open_streams = 0
        self.buffered = 0  # bytes held right now by all streams (request bodies + held responses)

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """The stream on grpc.aio (`--grpc-server grpcio`); epp.h2server calls the stream_* steps
        below directly, as the messages arrive, with no task of its own a stream."""
        st = self.stream_open()
        try:
            while True:
                req = await context.read()
                if req is grpc.aio.EOF:
                    return
                replies = self.stream_message(st, req)
                if replies is None:
                    replies = await self.stream_wait(st)
                for reply in replies:
                    await context.write(reply)
                del replies
                self.stream_written(st)
        finally:
            self.stream_close(st)

    # ---- one stream, step by step ----------------------------------------------------------------
    def stream_open(self) -> _Stream:
        """A new ext_proc stream's state."""
        self.open_streams += 1
        return _Stream(time.perf_counter())

    def stream_message(self, st: _Stream, req: ep.ProcessingRequest) -> list[ep.ProcessingResponse] | None:
        """The replies to one message, in order; None when flow control queued the request
        (`stream_wait` then gives them: this stream waits, nothing else does)."""
        if st.done:
            # after an immediate response the proxy closes the stream; messages it had already
            # sent are drained, so the client sees the reply and a clean end
            return []
        replies = self._handle(st, req)
        return None if st.pending is not None else replies

    async def stream_wait(self, st: _Stream) -> list[ep.ProcessingResponse]:
        """The replies of a queued request, once flow control lets it go."""
        return await self._wait(st)

    def stream_written(self, st: _Stream) -> None:
        """The replies went out (the caller dropped them): trim the heap after a huge body."""
        if st.trim:
            st.trim = False
            _malloc_trim()

    def stream_close(self, st: _Stream) -> None:
        """The stream ended, however: buffers released, the request's accounting finished."""
        self.open_streams -= 1
        self._release(st)
        st.body_parts = st.resp_parts = []
        self.director.finish(st.ctx)

    # ---- buffer budget ----------------------------------------------------------------------
    def _hold(self, st: _Stream, n: int) -> bool:
        """Count n more held bytes for st; False (nothing counted) when the budget would overflow."""
        if self.buffered + n > self.buffer_budget:
            return False
        self.buffered += n
        st.held += n
        return True

    def _release(self, st: _Stream) -> None:
        self.buffered -= st.held
        st.held = 0

    # ---- dispatch ---------------------------------------------------------------------------
    def _handle(self, st: _Stream, req: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
        kind = req.WhichOneof("request")
        if st.req_mode < 0:
            if req.HasField("protocol_config"):
                pc = req.protocol_config
                st.req_mode, st.resp_mode = pc.request_body_mode, pc.response_body_mode
            else:
                st.req_mode, st.resp_mode = self.default_body_mode, self.default_response_mode
        if kind == "request_headers":
            return self._on_request_headers(st, req)
        if kind == "request_body":
            return self._on_request_body(st, req.request_body)
        if kind == "response_headers":
            return self._on_response_headers(st, req)
        if kind == "response_body":
            return self._on_response_body(st, req.response_body)
        if kind == "request_trailers":
            return self._on_request_trailers(st)
        if kind == "response_trailers":
            return self._on_response_trailers(st)
        return []

    def _reject(self, st: _Stream, error: Rejected) -> list[ep.ProcessingResponse]:
        st.done = True
        st.decided = True
        st.body_parts = []
        self._release(st)
        return [immediate(error)]

    async def _wait(self, st: _Stream) -> list[ep.ProcessingResponse]:
        """Await the decision for a queued request (cancelled with the stream), then its replies."""
        assert st.pending is not None
        queued, build = st.pending
        st.pending = None
        try:
            result = await self.director.wait(queued)  # type: ignore[attr-defined]
        except Exception:
            log.exception("decision failed", extra={"request_id": queued.request_id})
            result = Rejected(500, "Internal", "internal error while choosing an endpoint")
        self._release(st)  # the queued body no longer counts against the buffer budget
        if isinstance(result, Routed):
            st.ctx = result.ctx
            if "," in result.destination:
                self.fallbacks_seen = True
        return self._then(st, result, build)

    def _then(self, st: _Stream, result: Routed | Rejected | Queued,
              build: Callable[[Routed], list[ep.ProcessingResponse]]) -> list[ep.ProcessingResponse]:
        """The replies for a decision; for a queued one none yet (Process awaits it, then calls again)."""
        if isinstance(result, Queued):
            st.pending = (result, build)
            return []
        if isinstance(result, Rejected):
            return self._reject(st, result)
        return build(result)

    def _decide(self, st: _Stream, body: bytes | None) -> Routed | Rejected | Queued:
        st.decided = True
        self.director.finish(st.ctx)  # a well-behaved proxy never asks twice; never leak if it does
        try:
            result = self.director.decide(st.headers, body, st.subset, st.started)
        except Exception:
            log.exception("decision failed", extra={"request_id": st.headers.get("x-request-id", "")})
            return Rejected(500, "Internal", "internal error while choosing an endpoint")
        if isinstance(result, Routed):
            st.ctx = result.ctx
            if "," in result.destination:
                self.fallbacks_seen = True
        return result

    # ---- only the phases a request needs ----------------------------------------------------
    def _needs_response_body(self, st: _Stream) -> bool:
        """The response body must cross the picker: a model name to restore, a plugin that reads
        the completed response, or this request is in the token-metrics sample."""
        ctx = st.ctx
        if ctx is None or ctx.rewritten:
            return True
        rc = getattr(self.director, "request_control", None)
        if rc is not None and getattr(rc, "response_complete", None):
            return True
        if st.sampled is None:
            st.sampled = self._draw_body_sample()
        return st.sampled

    def _draw_body_sample(self) -> bool:
        share = self.response_body_sample
        if share >= 1.0:
            return True
        self._sample_acc += share
        if self._sample_acc >= 1.0:
            self._sample_acc -= 1.0
            return True
        return False

    def _needs_response(self, st: _Stream) -> bool:
        """Decided on the request headers, before the body: must the response side cross the
        picker at all? Anything that may need it says yes; only a decider that is the endpoint
        picker's Director (a datastore to read) can say no."""
        d = self.director
        ds = getattr(d, "datastore", None)
        if ds is None or self.response_headers_sample >= 1.0 or self.response_body_sample >= 1.0:
            return True
        if self.fallbacks_seen or getattr(d, "session_header", None):
            return True
        rc = getattr(d, "request_control", None)
        if rc is not None and (getattr(rc, "response_header", None) or getattr(rc, "response_complete", None)):
            return True
        models = ds.models
        table, can = self._rewrites
        if table is not models:  # rebuilt on every change of the model objects
            can = _can_rewrite(models)
            self._rewrites = (models, can)
        if can:
            return True
        headers = st.headers
        for name in MODEL_REWRITE_HEADERS:
            if name in headers:
                return True
        st.sampled = self._draw_body_sample()
        if st.sampled:
            return True
        self._headers_acc += self.response_headers_sample
        if self._headers_acc >= 1.0:
            self._headers_acc -= 1.0
            return True
        return False

    def _with_override(self, st: _Stream, reply: ep.ProcessingResponse) -> ep.ProcessingResponse:
        """The response-headers reply, with the response body switched off for this request when
        nothing needs it (every SSE chunk would otherwise cross the picker). Response trailers are
        asked for, so the stream stays open to the end and in-flight accounting ends with the
        exchange. Envoy 1.40 honours the override only when its filter sets allow_mode_override
        and the request body mode is not FULL_DUPLEX_STREAMED (measured: tests/e2e/
        test_mode_override.py); otherwise it ignores it, the body arrives and is handled as always."""
        if st.resp_mode == NONE or st.override is not None or self._needs_response_body(st):
            return reply
        st.override = _override_modes(st.req_mode)
        self.body_overrides += 1
        out = ep.ProcessingResponse()
        out.CopyFrom(reply)  # routed replies are shared per destination: never mutate one
        out.mode_override.CopyFrom(st.override)
        return out

    # ---- request phases ---------------------------------------------------------------------
    def _on_request_headers(self, st: _Stream, req: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
        if st.decided:  # out-of-order or repeated headers: nothing left to decide
            return [_EMPTY_REQ_HEADERS]
        rh = req.request_headers
        st.headers = _header_map(rh.headers)
        if req.HasField("metadata_context"):
            st.subset = _struct_value(req.metadata_context, SUBSET_NAMESPACE, SUBSET_KEY)
        if rh.end_of_stream or st.req_mode in (NONE, STREAMED):
            return self._then(st, self._decide(st, None), lambda r: [_route_reply("request_headers", r)])
        if st.req_mode in (BUFFERED, BUFFERED_PARTIAL):
            if st.resp_mode == DUPLEX or self._needs_response(st):
                return [_EMPTY_REQ_HEADERS]
            st.override = _skip_response_reply(st.req_mode).mode_override
            self.response_skips += 1
            return [_skip_response_reply(st.req_mode)]
        return []  # duplex: held until the body ends

    def _on_request_body(self, st: _Stream, b: ep.HttpBody) -> list[ep.ProcessingResponse]:
        if st.decided:  # STREAMED mode, or body after a header-only pick: pass it on untouched
            if st.req_mode == DUPLEX:
                return _streamed_body("request_body", b.body, b.end_of_stream)
            return [_EMPTY_REQ_BODY]
        chunk = b.body
        n = len(chunk)
        st.body_size += n
        st.body_chunks += 1
        cap = self.director.max_body_bytes
        if st.body_size > cap:
            return self._reject(st, Rejected(413, "PayloadTooLarge", f"request body exceeds {cap} bytes"))
        if st.body_chunks > self.max_body_chunks:
            return self._reject(st, Rejected(413, "PayloadTooLarge",
                                             f"request body arrives in more than {self.max_body_chunks} messages"))
        if not self._hold(st, n):
            return self._reject(st, Rejected(
                429, "ResourceExhausted", "the picker holds too many request bodies at once; retry later",
                detail=f"buffer budget of {self.buffer_budget} bytes reached"))
        if n:
            st.body_parts.append(chunk)
        final = b.end_of_stream or st.req_mode in (BUFFERED, BUFFERED_PARTIAL)
        if not final:
            return []
        return self._route_body(st, end=b.end_of_stream, trailers=False)

    def _route_body(self, st: _Stream, *, end: bool, trailers: bool) -> list[ep.ProcessingResponse]:
        """Decide on the body received so far and build the replies (duplex: headers, then body)."""
        parts = st.body_parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        st.body_parts = []
        del parts
        st.trim = len(body) >= TRIM_AFTER
        result = self._decide(st, body)
        if not isinstance(result, Queued):
            self._release(st)  # (a queued body stays counted in the buffer budget while it waits)

        def build(r: Routed) -> list[ep.ProcessingResponse]:
            if st.req_mode == DUPLEX:
                out = [_route_reply("request_headers", r)]
                out += _streamed_body("request_body", r.body if r.body is not None else body, end)
            else:
                out = [_route_reply("request_body", r)]
            if trailers:
                out.append(_REQ_TRAILERS)
            return out

        return self._then(st, result, build)

    def _on_request_trailers(self, st: _Stream) -> list[ep.ProcessingResponse]:
        if st.decided or st.req_mode != DUPLEX:
            return [_REQ_TRAILERS]
        # the body ended with trailers instead of end_of_stream: decide on what arrived, send it
        # (end_of_stream false: the trailers end the stream), then the trailers reply
        return self._route_body(st, end=False, trailers=True)

    # ---- response phases --------------------------------------------------------------------
    def _on_response_headers(self, st: _Stream, req: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
        ctx = st.ctx
        rh = req.response_headers
        served = None
        lb_metadata = False
        if req.HasField("metadata_context"):
            lb_metadata = LB_NAMESPACE in req.metadata_context.filter_metadata
            v = _struct_value(req.metadata_context, LB_NAMESPACE, SERVED_KEY)
            if isinstance(v, str) and v:
                served = v
        set_headers: list[base_pb2.HeaderValueOption] = []
        remove: list[str] = []
        status = content_type = ""
        for h in rh.headers.headers:
            key = h.key
            if key == ":status":
                status = (h.raw_value.decode() if h.raw_value else h.value)
            elif key == "content-type":
                content_type = (h.raw_value.decode() if h.raw_value else h.value)
            elif key == SERVED_KEY:
                # stamped by the route (envoyconf) with the upstream really used; never shown to clients
                remove.append(SERVED_KEY)
                if served is None:
                    served = h.raw_value.decode() if h.raw_value else h.value
        sse = "text/event-stream" in content_type
        # gRPC answers (application/grpc, +proto...) are length-prefixed messages ending in trailers:
        # never held, whatever the call
        grpc_body = content_type.startswith("application/grpc")
        # as the reference: a `"stream": true` request's response is passed through whatever its type
        st.resp_stream = sse or grpc_body or (ctx is not None and ctx.stream)
        if ctx is None:
            if remove:
                return [ep.ProcessingResponse(response_headers=ep.HeadersResponse(response=ep.CommonResponse(
                    header_mutation=ep.HeaderMutation(remove_headers=remove))))]
            return [_EMPTY_RESP_HEADERS]
        ctx.first_byte_at = time.perf_counter()
        if served:
            self.director.served_by(ctx, served)
        ctx.status = status
        if sse:
            st.scanner = openai.SSEUsageScanner()
        elif grpc_body and ctx.api in _GRPC_METHODS:
            # usage from the framed GenerateResponse/EmbedResponse messages (passthrough calls: none)
            st.scanner = vllmgrpc.UsageScanner(_GRPC_METHODS[ctx.api])
        if ctx.rewritten:
            st.restorer = openai.ModelRestorer(ctx.target_model, ctx.client_model)
            remove.append("content-length")  # the restored body may differ in length
        for k, v in self.director.response_headers(ctx, served, lb_metadata):
            set_headers.append(_hvo(k, v))
        metadata = self._finish_response(st) if rh.end_of_stream else None  # a response without a body
        if not set_headers and not remove and metadata is None:
            return [_EMPTY_RESP_HEADERS if rh.end_of_stream else self._with_override(st, _EMPTY_RESP_HEADERS)]
        reply = ep.ProcessingResponse(response_headers=ep.HeadersResponse(response=ep.CommonResponse(
            header_mutation=ep.HeaderMutation(set_headers=set_headers, remove_headers=remove))))
        if metadata is not None:
            reply.dynamic_metadata.CopyFrom(metadata)
        return [reply if rh.end_of_stream else self._with_override(st, reply)]

    def _body_replies(self, st: _Stream, chunk: bytes, end: bool, original: bytes | None,
                      metadata: struct_pb2.Struct | None) -> list[ep.ProcessingResponse]:
        """Replies carrying `chunk` (`original`: what Envoy sent, when unchanged replies may be empty)."""
        if st.resp_mode == DUPLEX:
            out = _streamed_body("response_body", chunk, end)
        elif original is not None and chunk is original and metadata is None:
            return [_EMPTY_RESP_BODY]
        elif original is not None and chunk is original:
            out = [ep.ProcessingResponse(response_body=ep.BodyResponse())]
        else:
            out = [ep.ProcessingResponse(response_body=ep.BodyResponse(response=ep.CommonResponse(
                body_mutation=ep.BodyMutation(body=chunk))))]
        if metadata is not None:
            out[-1].dynamic_metadata.CopyFrom(metadata)
        return out

    def _on_response_body(self, st: _Stream, b: ep.HttpBody) -> list[ep.ProcessingResponse]:
        ctx = st.ctx
        chunk, end = b.body, b.end_of_stream
        st.resp_body_seen = True
        if ctx is not None:
            ctx.response_size += len(chunk)
        mode = st.resp_mode
        if not st.resp_stream and mode != STREAMED:
            held = self._hold_response(st, chunk, end)
            if held is not None:
                return held
        # pass through chunk by chunk
        if st.scanner is not None:
            st.scanner.feed(chunk)
        out_chunk = st.restorer.feed(chunk, end) if st.restorer is not None else chunk
        metadata = self._finish_response(st) if end else None
        return self._body_replies(st, out_chunk, end, chunk if mode != DUPLEX else None, metadata)

    def _hold_response(self, st: _Stream, chunk: bytes, end: bool) -> list[ep.ProcessingResponse] | None:
        """A JSON body: held to the end to read usage and restore the model, then sent whole. None:
        it outgrew the per-body cap or the shared budget, so it is flushed and streamed from now on."""
        mode = st.resp_mode
        if mode == DUPLEX and not end:
            st.resp_size += len(chunk)
            if st.resp_size <= self.director.max_body_bytes and self._hold(st, len(chunk)):
                st.resp_parts.append(chunk)
                return []
            # too big to hold: send what is held and stream the rest (usage from it is lost)
            held = b"".join(st.resp_parts)
            st.resp_parts = []
            self._release(st)
            st.resp_stream = True
            out = st.restorer.feed(held + chunk, False) if st.restorer is not None else held + chunk
            return _streamed_body("response_body", out, False)
        parts = st.resp_parts
        if parts:
            parts.append(chunk)
            body = b"".join(parts)
        else:
            body = chunk
        st.resp_parts = []
        self._release(st)
        if st.ctx is not None:
            self._read_json_usage(st.ctx, body)
        restored = st.restorer.feed(body, True) if st.restorer is not None else body
        metadata = self._finish_response(st)
        return self._body_replies(st, restored, end, body if mode != DUPLEX else None, metadata)

    @staticmethod
    def _read_json_usage(ctx: RequestContext, body: bytes) -> None:
        usage = openai.Usage()
        openai.usage_from_json(body, usage)
        if usage.found:
            ctx.usage_prompt, ctx.usage_completion = usage.prompt_tokens, usage.completion_tokens
            ctx.usage_cached = usage.cached_tokens

    def _on_response_trailers(self, st: _Stream) -> list[ep.ProcessingResponse]:
        """Trailers end the response (gRPC answers always do): what is still held goes out first, as
        a body reply without end_of_stream, then the trailers reply."""
        ctx = st.ctx
        if st.resp_ended:
            self.director.finish(ctx)
            return [_RESP_TRAILERS]
        out: list[ep.ProcessingResponse] = []
        body: bytes | None = None
        if st.resp_parts:
            body = b"".join(st.resp_parts)
            st.resp_parts = []
            self._release(st)
            if ctx is not None:
                self._read_json_usage(ctx, body)
        if st.restorer is not None:
            body = st.restorer.feed(body or b"", True)  # the held tail, restored
        elif body is None and not st.resp_stream:
            body = b""  # held nothing yet: the held reply is empty, as the reference sends it
        metadata = self._finish_response(st)
        # a body reply only for a body Envoy sent (never one it did not ask about)
        if st.resp_body_seen and body is not None and (body or not st.resp_stream) and st.resp_mode == DUPLEX:
            out += self._body_replies(st, body, False, None, metadata)
            metadata = None
        trailers = ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
        if metadata is not None:
            trailers.dynamic_metadata.CopyFrom(metadata)
            out.append(trailers)
        else:
            out.append(_RESP_TRAILERS)
        return out

    def _finish_response(self, st: _Stream) -> struct_pb2.Struct | None:
        """The response is complete: usage from the stream, the request-control plugins' metadata,
        then the director's finish. Returns the metadata for the last body reply (or None)."""
        ctx = st.ctx
        st.resp_ended = True
        if ctx is None:
            return None
        if st.scanner is not None:
            st.scanner.finish()
            u = st.scanner.usage
            if u.found:
                ctx.usage_prompt, ctx.usage_completion = u.prompt_tokens, u.completion_tokens
                ctx.usage_cached = u.cached_tokens
        metadata = None
        if not ctx.finished:
            values = self.director.response_metadata(ctx)
            if values:
                metadata = _numbers_metadata(values)
        self.director.finish(ctx)
        return metadata

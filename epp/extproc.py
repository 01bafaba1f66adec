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

Response side: SSE bodies are passed through chunk by chunk (with the client's model name restored
when it was rewritten, and usage read from the stream); other bodies are held to end_of_stream,
then usage is read and the body returned whole.
"""

from __future__ import annotations

import logging
import time
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
    Rejected,
    RequestContext,
    Routed,
)

log = logging.getLogger("epp.extproc")

CHUNK = 62000  # max bytes per streamed body reply (the reference's limit)
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
SERVED_KEY = "x-gateway-destination-endpoint-served"

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


def _hvo(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode()))


def immediate(error: Rejected) -> ep.ProcessingResponse:
    """An ImmediateResponse carrying the director's error."""
    return ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=error.status),  # type: ignore[arg-type]
        headers=ep.HeaderMutation(set_headers=[_hvo("content-type", "text/plain; charset=utf-8")]),
        body=error.body,
        details=f"{error.code}: {error.message}"[:200],
    ))


def _metadata(destination: str) -> struct_pb2.Struct | None:
    if not destination:
        return None
    md = struct_pb2.Struct()
    md.fields[LB_NAMESPACE].struct_value.fields[DEST_HEADER].string_value = destination
    return md


_ROUTE_REPLIES: dict[tuple[str, str], ep.ProcessingResponse] = {}


def _route_reply(kind: str, routed: Routed) -> ep.ProcessingResponse:
    """The routed reply (`kind`: request_headers or request_body). The common case (only the
    destination header, body unchanged) is built once per destination and reused: a reply message
    is never mutated after it is built, and building it is a measurable share of a request's CPU."""
    simple = routed.body is None and len(routed.set_headers) == 1 and routed.set_headers[0][0] == DEST_HEADER
    if simple:
        key = (kind, routed.destination)
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
    common = ep.CommonResponse(
        header_mutation=ep.HeaderMutation(set_headers=[_hvo(k, v) for k, v in routed.set_headers]),
        clear_route_cache=True,
    )
    if body_in_reply and routed.body is not None:
        common.body_mutation.body = routed.body
    return common


def _streamed_body(kind: str, body: bytes, end: bool) -> list[ep.ProcessingResponse]:
    """`body` as streamed_response replies of at most CHUNK bytes (an empty body: one message)."""
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
               started: float | None = None) -> Routed | Rejected: ...

    def served_by(self, ctx: RequestContext, address: str) -> None: ...

    def response_headers(self, ctx: RequestContext, served: str | None) -> list[tuple[str, str]]: ...

    def finish(self, ctx: RequestContext | None) -> None: ...


class _Stream:
    """Per-stream state. Slots keep it small: one per in-flight HTTP request."""

    __slots__ = (
        "body_parts", "body_size", "ctx", "decided", "done", "headers", "req_mode", "resp_mode",
        "resp_parts", "resp_sse", "restorer", "scanner", "started", "subset", "too_large",
    )

    def __init__(self, started: float) -> None:
        self.started = started
        self.req_mode = -1
        self.resp_mode = -1
        self.headers: dict[str, str] = {}
        self.subset: object = None
        self.body_parts: list[bytes] = []
        self.body_size = 0
        self.decided = False
        self.done = False  # an immediate response was sent: nothing more to do
        self.too_large = False
        self.ctx: RequestContext | None = None
        self.resp_sse = False
        self.resp_parts: list[bytes] = []
        self.restorer: openai.ModelRestorer | None = None
        self.scanner: openai.SSEUsageScanner | None = None


class ExtProcServicer(ep_grpc.ExternalProcessorServicer):
    """envoy.service.ext_proc.v3.ExternalProcessor/Process on grpc.aio."""

    def __init__(self, director: Decider, default_body_mode: int = DUPLEX,
                 default_response_mode: int = DUPLEX) -> None:
        self.director = director
        self.default_body_mode = default_body_mode
        self.default_response_mode = default_response_mode
        self.open_streams = 0

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        st = _Stream(time.perf_counter())
        self.open_streams += 1
        try:
            while True:
                req = await context.read()
                if req is grpc.aio.EOF:
                    return
                if st.done:
                    # after an immediate response the proxy closes the stream; messages it had
                    # already sent are drained, so the client sees the reply and a clean end
                    continue
                for reply in self._handle(st, req):
                    await context.write(reply)
        finally:
            self.open_streams -= 1
            self.director.finish(st.ctx)

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
            self.director.finish(st.ctx)
            return [_RESP_TRAILERS]
        return []

    def _reject(self, st: _Stream, error: Rejected) -> list[ep.ProcessingResponse]:
        st.done = True
        st.decided = True
        return [immediate(error)]

    def _decide(self, st: _Stream, body: bytes | None) -> Routed | Rejected:
        st.decided = True
        self.director.finish(st.ctx)  # a well-behaved proxy never asks twice; never leak if it does
        try:
            result = self.director.decide(st.headers, body, st.subset, st.started)
        except Exception:
            log.exception("decision failed", extra={"request_id": st.headers.get("x-request-id", "")})
            return Rejected(500, "Internal", "internal error while choosing an endpoint")
        if isinstance(result, Routed):
            st.ctx = result.ctx
        return result

    # ---- request phases ---------------------------------------------------------------------
    def _on_request_headers(self, st: _Stream, req: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
        if st.decided:  # out-of-order or repeated headers: nothing left to decide
            return [_EMPTY_REQ_HEADERS]
        rh = req.request_headers
        st.headers = _header_map(rh.headers)
        if req.HasField("metadata_context"):
            st.subset = _struct_value(req.metadata_context, SUBSET_NAMESPACE, SUBSET_KEY)
        if rh.end_of_stream or st.req_mode in (NONE, STREAMED):
            result = self._decide(st, None)
            if isinstance(result, Rejected):
                return self._reject(st, result)
            return [_route_reply("request_headers", result)]
        if st.req_mode in (BUFFERED, BUFFERED_PARTIAL):
            return [_EMPTY_REQ_HEADERS]
        return []  # duplex: held until the body ends

    def _on_request_body(self, st: _Stream, b: ep.HttpBody) -> list[ep.ProcessingResponse]:
        if st.decided:  # STREAMED mode, or body after a header-only pick: pass it on untouched
            if st.req_mode == DUPLEX:
                return _streamed_body("request_body", b.body, b.end_of_stream)
            return [_EMPTY_REQ_BODY]
        st.body_size += len(b.body)
        if st.body_size > self.director.max_body_bytes:
            return self._reject(st, Rejected(413, "PayloadTooLarge",
                                             f"request body exceeds {self.director.max_body_bytes} bytes"))
        st.body_parts.append(b.body)
        final = b.end_of_stream or st.req_mode in (BUFFERED, BUFFERED_PARTIAL)
        if not final:
            return []
        body = st.body_parts[0] if len(st.body_parts) == 1 else b"".join(st.body_parts)
        st.body_parts = []
        result = self._decide(st, body)
        if isinstance(result, Rejected):
            return self._reject(st, result)
        if st.req_mode == DUPLEX:
            out = [_route_reply("request_headers", result)]
            out += _streamed_body("request_body", result.body if result.body is not None else body,
                                  b.end_of_stream)
            return out
        return [_route_reply("request_body", result)]

    def _on_request_trailers(self, st: _Stream) -> list[ep.ProcessingResponse]:
        if st.decided or st.req_mode != DUPLEX:
            return [_REQ_TRAILERS]
        # the body ended with trailers instead of end_of_stream: decide on what arrived
        body = b"".join(st.body_parts)
        st.body_parts = []
        result = self._decide(st, body)
        if isinstance(result, Rejected):
            return self._reject(st, result)
        out = [_route_reply("request_headers", result)]
        out += _streamed_body("request_body", result.body if result.body is not None else body, False)
        out.append(_REQ_TRAILERS)
        return out

    # ---- response phases --------------------------------------------------------------------
    def _on_response_headers(self, st: _Stream, req: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
        ctx = st.ctx
        if ctx is None:
            return [_EMPTY_RESP_HEADERS]
        rh = req.response_headers
        ctx.first_byte_at = time.perf_counter()
        served = None
        if req.HasField("metadata_context"):
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
        if served:
            self.director.served_by(ctx, served)
        ctx.status = status
        st.resp_sse = "text/event-stream" in content_type
        if st.resp_sse:
            st.scanner = openai.SSEUsageScanner()
        if ctx.rewritten:
            st.restorer = openai.ModelRestorer(ctx.target_model, ctx.client_model)
            remove.append("content-length")  # the restored body may differ in length
        for k, v in self.director.response_headers(ctx, served):
            set_headers.append(_hvo(k, v))
        if rh.end_of_stream:
            self.director.finish(ctx)
        if not set_headers and not remove:
            return [_EMPTY_RESP_HEADERS]
        return [ep.ProcessingResponse(response_headers=ep.HeadersResponse(response=ep.CommonResponse(
            header_mutation=ep.HeaderMutation(set_headers=set_headers, remove_headers=remove))))]

    def _on_response_body(self, st: _Stream, b: ep.HttpBody) -> list[ep.ProcessingResponse]:
        ctx = st.ctx
        chunk, end = b.body, b.end_of_stream
        if ctx is not None:
            ctx.response_size += len(chunk)
        mode = st.resp_mode
        if st.resp_sse or ctx is None or mode == STREAMED:
            # pass through chunk by chunk
            if st.scanner is not None:
                st.scanner.feed(chunk)
            out_chunk = st.restorer.feed(chunk, end) if st.restorer is not None else chunk
            if end:
                self._finish_response(st)
            if mode == DUPLEX:
                return _streamed_body("response_body", out_chunk, end)
            if out_chunk is chunk:
                return [_EMPTY_RESP_BODY]
            return [ep.ProcessingResponse(response_body=ep.BodyResponse(response=ep.CommonResponse(
                body_mutation=ep.BodyMutation(body=out_chunk))))]
        # a JSON body: hold it to the end, read usage, restore the model, send it whole
        st.resp_parts.append(chunk)
        if not end and mode == DUPLEX:
            return []
        body = b"".join(st.resp_parts)
        st.resp_parts = []
        usage = openai.Usage()
        openai.usage_from_json(body, usage)
        if usage.found:
            ctx.usage_prompt, ctx.usage_completion = usage.prompt_tokens, usage.completion_tokens
        restored = st.restorer.feed(body, True) if st.restorer is not None else body
        self._finish_response(st)
        if mode == DUPLEX:
            return _streamed_body("response_body", restored, end)
        if restored is body:
            return [_EMPTY_RESP_BODY]
        return [ep.ProcessingResponse(response_body=ep.BodyResponse(response=ep.CommonResponse(
            body_mutation=ep.BodyMutation(body=restored))))]

    def _finish_response(self, st: _Stream) -> None:
        ctx = st.ctx
        if ctx is None:
            return
        if st.scanner is not None:
            st.scanner.finish()
            u = st.scanner.usage
            if u.found:
                ctx.usage_prompt, ctx.usage_completion = u.prompt_tokens, u.completion_tokens
        self.director.finish(ctx)

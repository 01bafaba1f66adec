"""A real grpc.aio ext_proc client for tests: builds Envoy's messages and collects the picker's replies."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2

Mode = processing_mode_pb2.ProcessingMode
DUPLEX = Mode.FULL_DUPLEX_STREAMED
BUFFERED = Mode.BUFFERED


def protocol(req_mode: int = DUPLEX, resp_mode: int = DUPLEX) -> ep.ProtocolConfiguration:
    return ep.ProtocolConfiguration(request_body_mode=req_mode, response_body_mode=resp_mode)


def request_headers(path: str = "/v1/chat/completions", extra: dict[str, str] | None = None, *,
                    method: str = "POST", eos: bool = False, mode: int | None = DUPLEX,
                    resp_mode: int = DUPLEX, subset: Any = None, raw: bool = True) -> ep.ProcessingRequest:
    pairs = {":method": method, ":path": path, ":authority": "gw", "content-type": "application/json"}
    pairs.update(extra or {})
    hv = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) if raw else base_pb2.HeaderValue(key=k, value=v)
          for k, v in pairs.items()]
    msg = ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=hv),
                                                              end_of_stream=eos))
    if mode is not None:
        msg.protocol_config.CopyFrom(protocol(mode, resp_mode))
    if subset is not None:
        v = struct_pb2.Value()
        if isinstance(subset, str):
            v.string_value = subset
        else:
            v.list_value.values.extend(struct_pb2.Value(string_value=s) for s in subset)
        msg.metadata_context.filter_metadata["envoy.lb.subset_hint"].fields[
            "x-gateway-destination-endpoint-subset"].CopyFrom(v)
    return msg


def body_chunks(body: bytes, n: int = 1, *, response: bool = False, eos: bool = True) -> list[ep.ProcessingRequest]:
    """`body` cut into n pieces at arbitrary byte offsets (may split UTF-8 characters and tokens)."""
    n = max(1, n)
    size = max(1, -(-len(body) // n))
    pieces = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    key = "response_body" if response else "request_body"
    return [ep.ProcessingRequest(**{key: ep.HttpBody(body=p, end_of_stream=eos and i == len(pieces) - 1)})
            for i, p in enumerate(pieces)]


def response_headers(status: str = "200", content_type: str = "application/json", *, served: str | None = None,
                     eos: bool = False) -> ep.ProcessingRequest:
    hv = [base_pb2.HeaderValue(key=":status", raw_value=status.encode()),
          base_pb2.HeaderValue(key="content-type", raw_value=content_type.encode())]
    msg = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=hv),
                                                               end_of_stream=eos))
    if served is not None:
        msg.metadata_context.filter_metadata["envoy.lb"].fields[
            "x-gateway-destination-endpoint-served"].string_value = served
    return msg


def chat(model: str = "m", content: str = "hello", **kw: Any) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}], **kw},
                      ensure_ascii=False).encode()


async def exchange(channel: grpc.aio.Channel, messages: Iterable[ep.ProcessingRequest]) -> list[ep.ProcessingResponse]:
    """Send every message, close the send side, and return every reply until the server ends."""
    stub = ep_grpc.ExternalProcessorStub(channel)
    call = stub.Process()
    try:
        for m in messages:
            await call.write(m)
        await call.done_writing()
    except grpc.aio.AioRpcError:
        pass  # the server ended the stream early (an immediate response): read what it sent
    out = []
    while True:
        r = await call.read()
        if r is grpc.aio.EOF:
            return out
        out.append(r)


def set_headers(resp: ep.ProcessingResponse) -> dict[str, str]:
    """Header mutations of a headers or body reply, as a dict."""
    which = resp.WhichOneof("response")
    common = getattr(resp, which).response
    return {h.header.key: (h.header.raw_value.decode() or h.header.value) for h in common.header_mutation.set_headers}


def destination_metadata(resp: ep.ProcessingResponse) -> str:
    return resp.dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"].string_value


def streamed_body(replies: Sequence[ep.ProcessingResponse], kind: str = "request_body") -> tuple[bytes, list[bool]]:
    parts, eos = [], []
    for r in replies:
        if r.WhichOneof("response") == kind:
            sr = getattr(r, kind).response.body_mutation.streamed_response
            parts.append(sr.body)
            eos.append(sr.end_of_stream)
    return b"".join(parts), eos

"""Two messages a request: with a BUFFERED request body the picker tells Envoy on the request-headers
reply (mode_override) to skip the whole response side of a request that needs nothing from it.
Over real gRPC: which requests get that reply, which keep their response headers (a possible model
rewrite, the client's rewrite header, a session header, a response plugin, fallbacks seen, the
samples), and that the in-flight count still ends with the stream, not with the routed reply."""

from __future__ import annotations

import asyncio

import grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from tests.extproc_client import (
    BUFFERED,
    DUPLEX,
    body_chunks,
    chat,
    exchange,
    request_headers,
    response_headers,
)
from tests.integration.test_mode_override_replies import REWRITE

M = processing_mode_pb2.ProcessingMode
EPS = ["10.0.0.1:8000", "10.0.0.2:8000"]
NO_SAMPLES = {"response_body_sample": 0.0, "response_headers_sample": 0.0}


def _request(model: str = "m", *, mode: int = BUFFERED, resp_mode: int = M.STREAMED,
             extra: dict[str, str] | None = None) -> list:
    return [request_headers(mode=mode, resp_mode=resp_mode, extra=extra), *body_chunks(chat(model, "hi", stream=True))]


def _skip(replies: list) -> object:
    """The mode_override on the request-headers reply, or None."""
    heads = [r for r in replies if r.WhichOneof("response") == "request_headers"]
    return heads[0].mode_override if heads and heads[0].HasField("mode_override") else None


async def test_nothing_needs_the_response_so_it_is_skipped(start_picker):
    app, ch = await start_picker(endpoints=EPS, **NO_SAMPLES)
    replies = await exchange(ch, _request())
    mode = _skip(replies)
    assert mode is not None
    assert (mode.response_header_mode, mode.response_body_mode, mode.response_trailer_mode) == (M.SKIP, M.NONE, M.SKIP)
    assert (mode.request_header_mode, mode.request_body_mode, mode.request_trailer_mode) == (M.SEND, BUFFERED, M.SKIP)
    [rb] = [r for r in replies if r.WhichOneof("response") == "request_body"]
    assert rb.request_body.response.header_mutation.set_headers  # still routed on the body reply
    assert app.servicer.response_skips == 1


async def test_the_reference_behaviour_and_duplex_never_skip(start_picker):
    app, ch = await start_picker(endpoints=EPS, response_body_sample=0.0, response_headers_sample=1.0)
    assert _skip(await exchange(ch, _request())) is None  # every request's headers (sample 1)
    app2, ch2 = await start_picker(endpoints=EPS, response_body_sample=1.0, response_headers_sample=0.0)
    assert _skip(await exchange(ch2, _request())) is None  # every body, as the reference
    app3, ch3 = await start_picker(endpoints=EPS, **NO_SAMPLES)
    replies = await exchange(ch3, _request(mode=DUPLEX, resp_mode=DUPLEX))
    assert _skip(replies) is None  # duplex: no early headers reply at all, and Envoy would ignore it
    assert app.servicer.response_skips == app2.servicer.response_skips == app3.servicer.response_skips == 0


async def test_a_possible_rewrite_keeps_the_response(start_picker, tmp_path):
    (tmp_path / "m.yaml").write_text(REWRITE)
    app, ch = await start_picker(manifests=[str(tmp_path / "m.yaml")], endpoints=EPS, **NO_SAMPLES)
    app.datastore.set_static_endpoints(EPS)
    # a rewrite rule exists: any request may be rewritten, which is known only once the body is read
    assert _skip(await exchange(ch, _request("alias"))) is None
    assert _skip(await exchange(ch, _request("m"))) is None
    app2, ch2 = await start_picker(endpoints=EPS, **NO_SAMPLES)
    # the client's own rewrite header
    assert _skip(await exchange(ch2, _request(extra={"x-gateway-model-name-rewrite": "other"}))) is None
    assert _skip(await exchange(ch2, _request())) is not None


async def test_session_header_and_fallbacks_keep_the_response(start_picker):
    app, ch = await start_picker(endpoints=EPS, **NO_SAMPLES)
    app.decider.session_header = "x-session-token"  # the token goes out on the response headers
    assert _skip(await exchange(ch, _request())) is None
    app.decider.session_header = None
    assert _skip(await exchange(ch, _request())) is not None
    app.servicer.fallbacks_seen = True  # a decision named fallbacks: the served endpoint is read from now on
    assert _skip(await exchange(ch, _request())) is None


async def test_samples_are_even_shares(start_picker):
    app, ch = await start_picker(endpoints=EPS, response_body_sample=0.0, response_headers_sample=0.25)
    got = [_skip(await exchange(ch, _request())) is None for _ in range(8)]
    assert got == [False, False, False, True] * 2  # one in four keeps its headers, evenly
    app2, ch2 = await start_picker(endpoints=EPS, response_body_sample=0.5, response_headers_sample=0.0)
    kept = []
    for _ in range(4):
        replies = await exchange(ch2, [*_request(), response_headers(content_type="text/event-stream")])
        heads = [r for r in replies if r.WhichOneof("response") == "response_headers"]
        # a request in the body sample keeps headers and body: no override anywhere
        kept.append(_skip(replies) is None and not heads[0].HasField("mode_override"))
    assert kept == [False, True, False, True]
    assert app2.servicer.body_overrides == 0  # the unsampled ones were skipped whole, not at the headers


async def test_in_flight_ends_with_the_stream_not_the_routed_reply(start_picker):
    app, ch = await start_picker(endpoints=EPS, **NO_SAMPLES)
    stub = ep_grpc.ExternalProcessorStub(ch)
    call = stub.Process()
    for m in _request():
        await call.write(m)
    for _ in range(2):  # the headers reply (with the override) and the routed body reply
        r = await call.read()
        assert r is not grpc.aio.EOF
    inflight = lambda: sum(e.inflight for e in app.datastore.endpoints.values())  # noqa: E731
    assert inflight() == 1  # routed, the response is under way: nothing more will cross the picker
    await asyncio.sleep(0.05)
    assert inflight() == 1  # still counted while the stream is open
    await call.done_writing()  # Envoy ends the stream when the HTTP exchange ends
    assert await call.read() is grpc.aio.EOF
    for _ in range(100):
        if inflight() == 0:
            break
        await asyncio.sleep(0.01)
    assert inflight() == 0


POOL = """
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: pool, namespace: default}
spec: {selector: {matchLabels: {app: x}}, targetPorts: [{number: 8000}]}
"""


async def test_an_inference_model_with_other_targets_keeps_the_response(start_picker, tmp_path):
    """An InferenceModel whose targets are its own name rewrites nothing; one naming another does."""
    same = POOL + """---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata: {name: im, namespace: default}
spec: {modelName: m, poolRef: {name: pool}, targetModels: [{name: m, weight: 1}]}
"""
    (tmp_path / "same.yaml").write_text(same)
    app, ch = await start_picker(manifests=[str(tmp_path / "same.yaml")], endpoints=EPS, **NO_SAMPLES)
    app.datastore.set_static_endpoints(EPS)
    assert _skip(await exchange(ch, _request("m"))) is not None
    (tmp_path / "other.yaml").write_text(same.replace("[{name: m, weight: 1}]", "[{name: m-v2, weight: 1}]"))
    app2, ch2 = await start_picker(manifests=[str(tmp_path / "other.yaml")], endpoints=EPS, **NO_SAMPLES)
    app2.datastore.set_static_endpoints(EPS)
    assert _skip(await exchange(ch2, _request("m"))) is None

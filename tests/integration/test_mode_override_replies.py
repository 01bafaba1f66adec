"""The picker's side of mode_override over real gRPC: which response-headers replies carry it
(nothing needs the body), which do not (a rewritten model, the sample, a body-less response, a
response mode of NONE), and that a body Envoy sends anyway is handled as always."""

from __future__ import annotations

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2

from tests.extproc_client import BUFFERED, body_chunks, chat, exchange, request_headers, response_headers

M = processing_mode_pb2.ProcessingMode
STREAMED = M.STREAMED
EPS = ["10.0.0.1:8000", "10.0.0.2:8000"]
REWRITE = """
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: pool, namespace: default}
spec: {selector: {matchLabels: {app: x}}, targetPorts: [{number: 8000}]}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: rw, namespace: default}
spec:
  poolRef: {name: pool}
  rules:
  - matches: [{model: {value: alias}}]
    targets: [{modelRewrite: base}]
"""


def _request(model: str = "m", *, resp_mode: int = STREAMED, eos: bool = False) -> list:
    return [request_headers(mode=BUFFERED, resp_mode=resp_mode), *body_chunks(chat(model, "hi", stream=True)),
            response_headers(content_type="text/event-stream", eos=eos)]


def _override(replies: list) -> object:
    [rh] = [r for r in replies if r.WhichOneof("response") == "response_headers"]
    return rh.mode_override if rh.HasField("mode_override") else None


async def test_override_drops_only_the_response_body(start_picker):
    app, ch = await start_picker(endpoints=EPS, response_body_sample=0.0, response_headers_sample=1.0)
    mode = _override(await exchange(ch, _request()))
    assert mode is not None
    assert (mode.response_body_mode, mode.response_header_mode, mode.response_trailer_mode) == (M.NONE, M.SEND, M.SEND)
    assert mode.request_body_mode == BUFFERED
    assert app.servicer.body_overrides == 1


async def test_no_override_when_the_body_is_needed_or_absent(start_picker):
    app, ch = await start_picker(endpoints=EPS, response_body_sample=1.0, response_headers_sample=1.0)
    assert _override(await exchange(ch, _request())) is None  # every body crosses (the reference's way)
    app2, ch2 = await start_picker(endpoints=EPS, response_body_sample=0.0, response_headers_sample=1.0)
    assert _override(await exchange(ch2, _request(resp_mode=M.NONE))) is None  # Envoy sends no body anyway
    assert _override(await exchange(ch2, _request(eos=True))) is None  # a body-less response: nothing to drop
    assert app.servicer.body_overrides == app2.servicer.body_overrides == 0


async def test_a_rewritten_model_keeps_the_body(start_picker, tmp_path):
    (tmp_path / "m.yaml").write_text(REWRITE)
    app, ch = await start_picker(manifests=[str(tmp_path / "m.yaml")], endpoints=EPS, response_body_sample=0.0,
                                 response_headers_sample=1.0)
    app.datastore.set_static_endpoints(EPS)
    replies = await exchange(ch, _request("alias"))
    [rb] = [r for r in replies if r.WhichOneof("response") == "request_body"]
    assert b'"model":"base"' in rb.request_body.response.body_mutation.body  # rewritten and routed
    assert _override(replies) is None
    replies = await exchange(ch, _request("m"))
    assert _override(replies) is not None


async def test_the_sample_is_an_even_share(start_picker):
    app, ch = await start_picker(endpoints=EPS, response_body_sample=0.25, response_headers_sample=1.0)
    got = [_override(await exchange(ch, _request())) is None for _ in range(12)]
    assert sum(got) == 3 and got[3] and got[7] and got[11]  # one in four, evenly


async def test_a_body_sent_anyway_is_passed_on(start_picker):
    """Envoy ignored the override (no allow_mode_override, or a duplex request body): the chunk
    still gets its STREAMED reply, unchanged."""
    app, ch = await start_picker(endpoints=EPS, response_body_sample=0.0, response_headers_sample=1.0)
    sse = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    replies = await exchange(ch, [*_request(), *body_chunks(sse, response=True)])
    assert _override(replies) is not None
    [rb] = [r for r in replies if r.WhichOneof("response") == "response_body"]
    assert not rb.response_body.response.HasField("body_mutation")

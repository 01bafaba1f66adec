"""Parity with the reference picker's own integration cases (GIE v1.5.0 test/integration/epp:
hermetic_test.go, common_tests.go, request_attribute_reporter*_test.go, the gRPC response-trailer case),
message for message, through a real grpc.aio client and real metric endpoints.

The inputs are the reference's (headers set with `value`, not `raw_value`; bodies as Go's
json.Marshal writes them; pods as queue / KV / active adapters); the expected replies are the
reference's, except where docs/differences.md lists a deliberate difference:
- unchanged request headers are not echoed back in the header mutation (the reference re-sets
  every client header it read), and the response-headers reply carries no debugging header
  (`x-went-into-resp-headers`) nor echoed response headers;
- ImmediateResponse also sets `content-type: text/plain` and `details`; JSON syntax errors are
  worded by Python's decoder; a header-only request with no pods is 503, not 500.
Those parts are left out of the comparison (`_normalize`), everything else must be equal.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from epp.parsers.passthrough import PassthroughParser
from tests.extproc_client import exchange
from tests.integration.test_scheduling_live import fresh

# The reference harness's config (test/integration/epp/testdata/default-config.yaml), without its
# parser section (openai-parser is the default here).
REFERENCE_TEST_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: lora-affinity-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: prefix-cache-scorer
  - pluginRef: lora-affinity-scorer
"""

REPORTER_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- name: total-tokens-cost-reporter
  type: request-attribute-reporter
  parameters:
    attributes:
    - key:
        namespace: envoy.lb
        name: x-gateway-inference-request-cost
      expression: |
        usage.completion_tokens
      condition: "has(usage.completion_tokens)"
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: total-tokens-cost-reporter
"""

# test/testdata/inferencepool-with-model-hermetic.yaml: the objectives and the rewrite
MANIFEST = """\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: sql-lora, namespace: default}
spec: {priority: 2, poolRef: {name: pool}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: sql-lora-sheddable, namespace: default}
spec: {poolRef: {name: pool}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: my-model, namespace: default}
spec: {priority: 2, poolRef: {name: pool}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: direct-model, namespace: default}
spec: {priority: 2, poolRef: {name: pool}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: rewrite-test, namespace: default}
spec:
  poolRef: {name: pool}
  rules:
  - matches: [{model: {value: model-to-be-rewritten}}]
    targets: [{modelRewrite: rewritten-model}]
"""

SQL_LORA, SQL_LORA_TARGET = "sql-lora", "sql-lora-1fdg2"
SHEDDABLE, SHEDDABLE_TARGET = "sql-lora-sheddable", "sql-lora-1fdg3"
MY_MODEL, MY_MODEL_TARGET = "my-model", "my-model-12345"


# ---- the reference's request builders ------------------------------------------------------------
def _headers_msg(headers: dict[str, str], subset: list[str] | None = None, eos: bool = False) -> ep.ProcessingRequest:
    hv = [base_pb2.HeaderValue(key=k, value=v) for k, v in headers.items()]
    msg = ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=hv),
                                                              end_of_stream=eos))
    if subset is not None:
        v = struct_pb2.Value()
        v.list_value.values.extend(struct_pb2.Value(string_value=s) for s in subset)
        msg.metadata_context.filter_metadata["envoy.lb.subset_hint"].fields[
            "x-gateway-destination-endpoint-subset"].CopyFrom(v)
    return msg


def go_json(obj: dict) -> bytes:
    """What Go's json.Marshal writes for a map: sorted keys, no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def llm_body(prompt: str, model: str) -> bytes:
    return go_json({"prompt": prompt, "max_tokens": 100, "temperature": 0, "model": model})


def req_llm(prompt: str, model: str, target: str, subset: list[str] | None = None) -> list[ep.ProcessingRequest]:
    """integration.ReqLLM / ReqSubset: objective = the model, rewrite header = target."""
    headers = {"hi": "mom", "x-request-id": "test-request-id"}
    if model:
        headers["x-gateway-inference-objective"] = model
    if target:
        headers["x-gateway-model-name-rewrite"] = target
    return [_headers_msg(headers, subset),
            ep.ProcessingRequest(request_body=ep.HttpBody(body=llm_body(prompt, model), end_of_stream=True))]


def req_raw(headers: dict[str, str], *chunks: str | bytes) -> list[ep.ProcessingRequest]:
    out = [_headers_msg(headers)]
    for i, c in enumerate(chunks):
        out.append(ep.ProcessingRequest(request_body=ep.HttpBody(
            body=c.encode() if isinstance(c, str) else c, end_of_stream=i == len(chunks) - 1)))
    return out


def resp_only(headers: dict[str, str], *chunks: str | bytes, trailers: bool = False) -> list[ep.ProcessingRequest]:
    hv = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
    out = [ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=hv)))]
    for i, c in enumerate(chunks):
        out.append(ep.ProcessingRequest(response_body=ep.HttpBody(
            body=c.encode() if isinstance(c, str) else c, end_of_stream=not trailers and i == len(chunks) - 1)))
    if trailers:
        out.append(ep.ProcessingRequest(response_trailers=ep.HttpTrailers()))
    return out


# ---- the reference's expected replies ------------------------------------------------------------
def _hvo(k: str, v: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()))


def expect_route_raw(endpoint: str, body: bytes) -> list[ep.ProcessingResponse]:
    """integration.NewRequestBufferedResponse: headers (destination, Content-Length, route cache
    cleared, envoy.lb metadata), then the body in one streamed reply with end_of_stream."""
    md = struct_pb2.Struct()
    md.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"].string_value = endpoint
    headers = ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(response=ep.CommonResponse(
            clear_route_cache=True,
            header_mutation=ep.HeaderMutation(set_headers=[
                _hvo("content-length", str(len(body))), _hvo("x-gateway-destination-endpoint", endpoint)]))),
        dynamic_metadata=md)
    return [headers, _stream_chunk("request_body", body, True)]


def expect_route(endpoint: str, target: str, prompt: str) -> list[ep.ProcessingResponse]:
    return expect_route_raw(endpoint, llm_body(prompt, target))


def _stream_chunk(kind: str, body: bytes, eos: bool) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(**{kind: ep.BodyResponse(response=ep.CommonResponse(body_mutation=ep.BodyMutation(
        streamed_response=ep.StreamedBodyResponse(body=body, end_of_stream=eos))))})


def expect_reject(code: int, body: str) -> list[ep.ProcessingResponse]:
    return [ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(status={"code": code}, body=body.encode()))]


def _normalize(replies: list[ep.ProcessingResponse]) -> list[ep.ProcessingResponse]:
    """Our replies with the documented differences taken out (see the module docstring)."""
    out = []
    for r in replies:
        r2 = ep.ProcessingResponse()
        r2.CopyFrom(r)
        kind = r2.WhichOneof("response")
        if kind == "immediate_response":
            r2.immediate_response.ClearField("headers")
            r2.immediate_response.ClearField("details")
        elif kind in ("request_headers", "request_body") and getattr(r2, kind).response.HasField("header_mutation"):
            hm = getattr(r2, kind).response.header_mutation
            hs = sorted((h for h in hm.set_headers if h.header.key != "x-request-id"), key=lambda h: h.header.key)
            del hm.set_headers[:]
            hm.set_headers.extend(hs)
        elif kind == "response_headers":
            r2.response_headers.ClearField("response")
        out.append(r2)
    return out


def _page(q: float, kv: float, models: tuple[str, ...]) -> str:
    page = (f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting {q}\n"
            f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n"
            f"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc {kv}\n")
    if models:  # the reference's pods: adapters active, no free slot (MaxActiveModels 0)
        page += ("# TYPE vllm:lora_requests_info gauge\n"
                 f'vllm:lora_requests_info{{max_lora="0",running_lora_adapters="{",".join(models)}",'
                 'waiting_lora_adapters=""} 1\n')
    return page


@pytest.fixture
def manifest(tmp_path: Path) -> str:
    (tmp_path / "objects.yaml").write_text(textwrap.dedent(MANIFEST))
    return str(tmp_path)


@pytest.fixture
def picker(start_picker, servers, manifest):
    """`app, ch, addrs = await picker([(queue, kv, *models), ...])`: one metric server per pod."""

    async def _start(pods, config: str = REFERENCE_TEST_CONFIG):
        # pod i on its own loopback address 127.0.1.(i+1), as the reference's pods have distinct IPs
        # (subset hints match on the IP)
        addrs = [await servers.add(_page(p[0], p[1], tuple(p[2:])), host=f"127.0.1.{i + 1}")
                 for i, p in enumerate(pods)]
        app, ch = await start_picker(endpoints=addrs or [], manifests=[manifest], config_text=config,
                                     refresh_metrics_interval=0.02)
        if addrs:
            await fresh(app, len(addrs))
        return app, ch, addrs

    return _start


# ---- request path --------------------------------------------------------------------------------
async def test_select_lower_queue_and_kv_cache(picker):
    app, ch, a = await picker([(3, 0.2), (0, 0.1), (10, 0.2)])
    got = await exchange(ch, req_llm("test1", MY_MODEL, MY_MODEL_TARGET))
    assert _normalize(got) == expect_route(a[1], MY_MODEL_TARGET, "test1")


async def test_select_active_lora_low_queue(picker):
    app, ch, a = await picker([(0, 0.2, "foo", "bar"), (0, 0.1, "foo", SQL_LORA_TARGET), (10, 0.2, "foo", "bar")])
    got = await exchange(ch, req_llm("test2", SQL_LORA, SQL_LORA_TARGET))
    assert _normalize(got) == expect_route(a[1], SQL_LORA_TARGET, "test2")


async def test_select_lora_despite_higher_kv_cache(picker):
    app, ch, a = await picker([(10, 0.2, "foo", "bar"), (10, 0.4, "foo", SQL_LORA_TARGET), (10, 0.3, "foo")])
    got = await exchange(ch, req_llm("test3", SQL_LORA, SQL_LORA_TARGET))
    assert _normalize(got) == expect_route(a[1], SQL_LORA_TARGET, "test3")


async def test_passthrough_parser_success(picker):
    app, ch, a = await picker([(3, 0.2), (0, 0.1), (10, 0.2)])
    app.director.parser = PassthroughParser()  # the reference's `parser: {pluginRef: passthrough-parser}`
    got = await exchange(ch, req_raw({"hi": "mom", "x-request-id": "test-request-id",
                                      "x-gateway-inference-objective": MY_MODEL}, "passthrough-parser"))
    assert _normalize(got) == expect_route_raw(a[1], b"passthrough-parser")


async def test_do_not_shed_requests_by_default(picker):
    app, ch, a = await picker([(6, 0.2, "foo", "bar", SQL_LORA_TARGET), (0, 0.85, "foo"), (10, 0.9, "foo")])
    got = await exchange(ch, req_llm("test4", SQL_LORA, SQL_LORA_TARGET))
    assert _normalize(got) == expect_route(a[0], SQL_LORA_TARGET, "test4")


async def test_invalid_json_body(picker):
    app, ch, a = await picker([(0, 0.2, "foo", "bar")])
    got = _normalize(await exchange(ch, req_raw({"hi": "mom"}, "no healthy upstream")))
    # the reference's text is Go's decoder error; the status and the prefix are the same
    assert len(got) == 1 and got[0].immediate_response.status.code == 400
    assert got[0].immediate_response.body.startswith(b"inference error: BadRequest - request body is not valid JSON")


async def test_split_body_across_chunks(picker):
    app, ch, a = await picker([(4, 0.2, "foo", "bar", SHEDDABLE_TARGET), (4, 0.85, "foo", SHEDDABLE_TARGET)])
    got = await exchange(ch, req_raw({"hi": "mom", "x-gateway-inference-objective": SHEDDABLE,
                                      "x-gateway-model-name-rewrite": SHEDDABLE_TARGET,
                                      "x-request-id": "test-request-id"},
                                     '{"max_tokens":100,"model":"sql-lo',
                                     'ra-sheddable","prompt":"test6","temperature":0}'))
    assert _normalize(got) == expect_route(a[0], SHEDDABLE_TARGET, "test6")


async def test_no_backend_pods_available(picker):
    app, ch, a = await picker([])
    got = _normalize(await exchange(ch, [_headers_msg({"content-type": "application/json"}, eos=True)]))
    # documented difference: 503 (the reference answers 500 Internal); the text is the reference's
    assert got == expect_reject(503, "inference error: ServiceUnavailable - no pods available in datastore")


async def test_request_missing_model_field(picker):
    app, ch, a = await picker([])
    got = await exchange(ch, req_raw({"content-type": "application/json"}, '{"prompt":"hello world"}'))
    assert _normalize(got) == expect_reject(400, "inference error: BadRequest - model not found in request body")


async def test_subsetting_select_best_from_subset(picker):
    app, ch, a = await picker([(0, 0.2, "foo"), (0, 0.1, "foo", SQL_LORA_TARGET), (10, 0.2, "foo")])
    got = await exchange(ch, req_llm("test2", SQL_LORA, SQL_LORA_TARGET, subset=a))
    assert _normalize(got) == expect_route(a[1], SQL_LORA_TARGET, "test2")


async def test_subsetting_partial_match(picker):
    app, ch, a = await picker([(0, 0.2, "foo"), (0, 0.1, "foo", SQL_LORA_TARGET), (10, 0.2, "foo")])
    got = await exchange(ch, req_llm("test2", SQL_LORA, SQL_LORA_TARGET, subset=[a[2]]))
    assert _normalize(got) == expect_route(a[2], SQL_LORA_TARGET, "test2")


async def test_subsetting_no_pods_match(picker):
    app, ch, a = await picker([(0, 0.2, "foo"), (0, 0.1, "foo", SQL_LORA_TARGET)])
    got = await exchange(ch, req_llm("test2", SQL_LORA, SQL_LORA_TARGET, subset=["192.168.1.99:8000"]))
    assert _normalize(got) == expect_reject(
        503, "inference error: ServiceUnavailable - failed to find endpoint candidates for serving the request")


async def test_passthrough_model_not_in_objectives(picker):
    app, ch, a = await picker([(4, 0.2, "foo", "bar", SHEDDABLE_TARGET)])
    got = await exchange(ch, req_raw({"hi": "mom", "x-gateway-inference-objective": "direct-model",
                                      "x-gateway-model-name-rewrite": "direct-model",
                                      "x-request-id": "test-request-id"},
                                     '{"max_tokens":100,"model":"direct-', 'model","prompt":"test6","temperature":0}'))
    assert _normalize(got) == expect_route(a[0], "direct-model", "test6")


async def test_rewrite_request_model(picker):
    # the client's rewrite header names the model itself; the InferenceModelRewrite rule wins
    app, ch, a = await picker([(0, 0.1, "foo", "rewritten-model")])
    got = await exchange(ch, req_llm("test-rewrite", "model-to-be-rewritten", "model-to-be-rewritten"))
    assert _normalize(got) == expect_route(a[0], "rewritten-model", "test-rewrite")


async def test_llm_d_header_names(picker):
    app, ch, a = await picker([(0, 0.1, "foo", "rewritten-model")])
    got = await exchange(ch, req_raw({"x-llm-d-model-name-rewrite": "other-model", "x-request-id": "r"},
                                     llm_body("p", "my-model")))
    assert _normalize(got) == expect_route(a[0], "other-model", "p")


# ---- response path -------------------------------------------------------------------------------
async def test_response_buffering_multi_chunk_json(picker):
    app, ch, a = await picker([(4, 0.2, SHEDDABLE_TARGET)])
    got = _normalize(await exchange(ch, resp_only({"content-type": "application/json"},
                                                  '{"max_tokens":100,"model":"sql-lo',
                                                  'ra-sheddable","prompt":"test6","temperature":0}')))
    body = b'{"max_tokens":100,"model":"sql-lora-sheddable","prompt":"test6","temperature":0}'
    assert got == [ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
                   _stream_chunk("response_body", body, True)]


async def test_response_buffering_invalid_json(picker):
    app, ch, a = await picker([(4, 0.2, SHEDDABLE_TARGET)])
    got = _normalize(await exchange(ch, resp_only({"content-type": "application/json"}, "no healthy upstream")))
    assert got[1:] == [_stream_chunk("response_body", b"no healthy upstream", True)]


async def test_response_buffering_empty_eos_chunk(picker):
    app, ch, a = await picker([(4, 0.2, SHEDDABLE_TARGET)])
    body = '{"max_tokens":100,"model":"sql-lora-sheddable","prompt":"test6","temperature":0}'
    got = _normalize(await exchange(ch, resp_only({"content-type": "application/json"}, body, "")))
    assert got[1:] == [_stream_chunk("response_body", body.encode(), True)]


async def test_response_streaming_sse(picker):
    app, ch, a = await picker([(4, 0.2, SHEDDABLE_TARGET)])
    chunks = ["data: {}", 'data: {"usage":{"prompt_tokens":7,"total_tokens":17,"completion_tokens":10}}\ndata: [DONE]',
              ""]
    got = _normalize(await exchange(ch, resp_only({"content-type": "text/event-stream", "status": "200"}, *chunks)))
    assert got[1:] == [_stream_chunk("response_body", c.encode(), i == 2) for i, c in enumerate(chunks)]


async def test_response_buffering_grpc_with_trailers(picker):
    # The reference holds a gRPC answer until its trailers, then sends it in one piece. This picker
    # passes gRPC bodies through as they come (docs/differences.md): a server-streaming Generate
    # must reach the client token by token. Either way nothing is lost and trailers come last.
    app, ch, a = await picker([(4, 0.2)])
    payload = b"\x00\x00\x00\x00\x09" + b"\x12\x07\x01\x02\x03\x04\x05\x06\x07"
    got = _normalize(await exchange(ch, resp_only({"content-type": "application/grpc"},
                                                  payload[:7], payload[7:], trailers=True)))
    assert got == [ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
                   _stream_chunk("response_body", payload[:7], False),
                   _stream_chunk("response_body", payload[7:], False),
                   ep.ProcessingResponse(response_trailers=ep.TrailersResponse())]


async def test_response_buffering_invalid_grpc_with_trailers(picker):
    app, ch, a = await picker([(4, 0.2)])
    got = _normalize(await exchange(ch, resp_only({"content-type": "application/grpc"}, "no healthy upstream",
                                                  trailers=True)))
    assert got[1:] == [_stream_chunk("response_body", b"no healthy upstream", False),
                       ep.ProcessingResponse(response_trailers=ep.TrailersResponse())]


# ---- request-attribute-reporter ------------------------------------------------------------------
def _cost(reply: ep.ProcessingResponse) -> float | None:
    fields = reply.dynamic_metadata.fields
    if "envoy.lb" not in fields:
        return None
    lb = fields["envoy.lb"].struct_value.fields
    return lb["x-gateway-inference-request-cost"].number_value if "x-gateway-inference-request-cost" in lb else None


async def test_request_attribute_reporter_json(picker):
    app, ch, a = await picker([(0, 0.1, MY_MODEL_TARGET)], config=REPORTER_CONFIG)
    resp = ('{"choices":[{"finish_reason":"stop","index":0,"logprobs":null,"message":{"content":"Hello! How can I '
            'help you today?","role":"assistant"}}],"created":1773675992,"id":"chatcmpl-63a9a231","model":"modelName",'
            '"object":"chat.completion","usage":{"completion_tokens":10,"prompt_tokens":32,"total_tokens":42}}')
    got = await exchange(ch, [*req_llm("hello", "modelName", "modelName"),
                              *resp_only({"content-type": "application/json", "status": "200"}, resp)])
    assert [r.WhichOneof("response") for r in got] == ["request_headers", "request_body", "response_headers",
                                                       "response_body"]
    assert _cost(got[3]) == 10.0
    assert _cost(got[0]) is None or "x-gateway-inference-request-cost" not in str(got[0].dynamic_metadata)


async def test_request_attribute_reporter_streaming(picker):
    app, ch, a = await picker([(0, 0.1, MY_MODEL_TARGET)], config=REPORTER_CONFIG)
    chunks = [
        'data: {"choices":[{"delta":{"content":"Hello! "},"index":0,"finish_reason":null}],"id":"123","created":1,'
        '"model":"modelName","object":"chat.completion.chunk"}\n',
        'data: {"choices":[{"delta":{},"index":0,"finish_reason":"stop"}],"id":"123","created":1,"model":"modelName",'
        '"object":"chat.completion.chunk","usage":{"completion_tokens":10,"prompt_tokens":32,"total_tokens":42}}\n',
        "data: [DONE]\n",
    ]
    got = await exchange(ch, [*req_llm("hello", "modelName", "modelName"),
                              *resp_only({"content-type": "text/event-stream", "status": "200"}, *chunks)])
    assert len(got) == 6
    assert _cost(got[5]) == 10.0
    assert [_stream_chunk("response_body", c.encode(), i == 2) == _strip_md(got[3 + i])
            for i, c in enumerate(chunks)] == [True] * 3


def _strip_md(r: ep.ProcessingResponse) -> ep.ProcessingResponse:
    r2 = ep.ProcessingResponse()
    r2.CopyFrom(r)
    r2.ClearField("dynamic_metadata")
    return r2


async def test_passthrough_parser_selected_by_config(picker):
    from epp.scheduling.config import ConfigError, load_config

    config = REFERENCE_TEST_CONFIG.replace("plugins:\n- type: queue-scorer", "plugins:\n- type: passthrough-parser\n"
                                           "- type: queue-scorer", 1) + "parser:\n  pluginRef: passthrough-parser\n"
    try:
        load_config(config)
    except ConfigError as e:  # the config's `parser` section arrives with the config work
        pytest.skip(f"config has no parser section yet: {e}")
    app, ch, a = await picker([(3, 0.2), (0, 0.1), (10, 0.2)], config=config)
    assert isinstance(app.director.parser, PassthroughParser)
    got = await exchange(ch, req_raw({"hi": "mom", "x-request-id": "test-request-id"}, "passthrough-parser"))
    assert _normalize(got) == expect_route_raw(a[1], b"passthrough-parser")

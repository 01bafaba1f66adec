"""Token usage of vLLM gRPC answers, read on the response path: a real grpc.aio ext_proc client
drives the in-process picker (vllmgrpc-parser selected by config) through Envoy's message order,
with framed protobuf responses cut at odd byte boundaries (inside headers and inside messages).

Proves: gRPC response bodies pass through chunk by chunk (each body message is answered at once,
the bytes unchanged, a non-streaming Generate too); prompt/completion/cached counts from
GenerateStreamChunk/GenerateComplete and EmbedResponse reach the request's usage (Prometheus
token histograms, the request-attribute-reporter's metadata); passthrough calls are not read.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from epp._gen import vllm_engine_pb2 as pb
from epp.parsers.vllmgrpc import frame
from tests.extproc_client import body_chunks, request_headers, response_headers

EP = "127.0.0.1:8000"
GENERATE = "/vllm.grpc.engine.VllmEngine/Generate"
EMBED = "/vllm.grpc.engine.VllmEngine/Embed"
HEALTH = "/vllm.grpc.engine.VllmEngine/HealthCheck"
READ_BOUND = 10.0  # seconds: a reply that does not come within this fails the test instead of hanging

CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: vllmgrpc-parser
- type: queue-scorer
- type: request-attribute-reporter
  parameters:
    attributes:
    - key: {name: x-cost}
      expression: usage.prompt_tokens * 1000 + usage.completion_tokens
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
requestHandler:
  parsers:
  - pluginRef: vllmgrpc-parser
"""

GRPC_HEADERS = {"content-type": "application/grpc", "te": "trailers"}


def cut(data: bytes, sizes: tuple[int, ...]) -> list[bytes]:
    """`data` in pieces of the given sizes, cycled (the last piece takes what is left)."""
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        out.append(data[pos:pos + n])
        pos += n
        i += 1
    return out


def generate_answer(prompt: int, completion: int, cached: int, chunks: int = 3) -> bytes:
    """A streamed Generate answer: `chunks` GenerateStreamChunk messages with running counts, then
    the GenerateComplete with the final ones."""
    out = b""
    for i in range(1, chunks + 1):
        msg = pb.GenerateResponse(chunk=pb.GenerateStreamChunk(token_ids=[100 + i], prompt_tokens=prompt,
                                                               completion_tokens=i, cached_tokens=cached))
        out += frame(msg.SerializeToString())
    done = pb.GenerateResponse(complete=pb.GenerateComplete(output_ids=list(range(completion)), finish_reason="stop",
                                                            prompt_tokens=prompt, completion_tokens=completion,
                                                            cached_tokens=cached))
    return out + frame(done.SerializeToString())


def generate_request(stream: bool, ids: int = 12) -> bytes:
    req = pb.GenerateRequest(request_id="r1", tokenized=pb.TokenizedInput(input_ids=list(range(ids))), stream=stream)
    return frame(req.SerializeToString())


async def read(call: Any) -> ep.ProcessingResponse:
    r = await asyncio.wait_for(call.read(), READ_BOUND)
    assert r is not grpc.aio.EOF, "the picker ended the stream"
    return r


def streamed(reply: ep.ProcessingResponse) -> tuple[bytes, bool]:
    assert reply.WhichOneof("response") == "response_body"
    sr = reply.response_body.response.body_mutation.streamed_response
    return sr.body, sr.end_of_stream


def histogram_sums(app: Any) -> dict[str, float]:
    """inference_objective_*_tokens sums, from the picker's /metrics text."""
    text = generate_latest(app.telemetry.registry).decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("inference_objective_") and s.name.endswith("_tokens_sum"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def cost(reply: ep.ProcessingResponse) -> float | None:
    f = reply.dynamic_metadata.fields
    if "envoy.lb" not in f or "x-cost" not in f["envoy.lb"].struct_value.fields:
        return None
    return f["envoy.lb"].struct_value.fields["x-cost"].number_value


async def route(call: Any, path: str, body: bytes) -> None:
    """The request phase: headers and the framed request, answered with the pick and the body."""
    await call.write(request_headers(path, GRPC_HEADERS))
    for m in body_chunks(body):
        await call.write(m)
    headers = await read(call)
    assert headers.WhichOneof("response") == "request_headers"
    reply = await read(call)
    assert reply.WhichOneof("response") == "request_body"
    sr = reply.request_body.response.body_mutation.streamed_response
    assert sr.body == body and sr.end_of_stream


async def answer(call: Any, pieces: list[bytes]) -> tuple[bytes, list[ep.ProcessingResponse]]:
    """The response phase as Envoy sends a gRPC answer: headers, body pieces (each must be answered
    before the next is sent: nothing is held), then trailers. The bytes passed on, and the last replies."""
    await call.write(response_headers("200", "application/grpc"))
    assert (await read(call)).WhichOneof("response") == "response_headers"
    passed = b""
    for piece in pieces:
        await call.write(ep.ProcessingRequest(response_body=ep.HttpBody(body=piece, end_of_stream=False)))
        body = b""
        while len(body) < len(piece):  # a piece over 62000 bytes is answered in several replies
            part, eos = streamed(await read(call))
            assert part and not eos
            body += part
        assert body == piece  # unchanged, at once
        passed += body
    await call.write(ep.ProcessingRequest(response_trailers=ep.HttpTrailers()))
    last = [await read(call)]
    while last[-1].WhichOneof("response") != "response_trailers":
        last.append(await read(call))
    await call.done_writing()
    assert await asyncio.wait_for(call.read(), READ_BOUND) is grpc.aio.EOF
    return passed, last


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
@pytest.mark.parametrize("sizes", [(1,), (3, 7), (4, 1, 6, 2), (5,), (11, 13, 64)], ids=str)
async def test_generate_usage_from_framed_messages_cut_anywhere(start_picker, stream: bool,
                                                                sizes: tuple[int, ...]) -> None:
    app, ch = await start_picker(endpoints=[EP], config_text=CONFIG)
    data = generate_answer(prompt=37, completion=9, cached=16)
    call = ep_grpc.ExternalProcessorStub(ch).Process()
    await route(call, GENERATE, generate_request(stream))
    passed, last = await answer(call, cut(data, sizes))
    assert passed == data
    assert [cost(r) for r in last] == [37 * 1000 + 9]  # the trailers reply ends it and carries the usage
    sums = histogram_sums(app)
    assert sums["inference_objective_input_tokens_sum"] == 37
    assert sums["inference_objective_output_tokens_sum"] == 9
    assert sums["inference_objective_prompt_cached_tokens_sum"] == 16


async def test_embed_usage(start_picker) -> None:
    app, ch = await start_picker(endpoints=[EP], config_text=CONFIG)
    req = pb.EmbedRequest(request_id="e1", tokenized=pb.TokenizedInput(input_ids=list(range(21))))
    data = frame(pb.EmbedResponse(embedding=[0.5] * 8, prompt_tokens=21, embedding_dim=8).SerializeToString())
    call = ep_grpc.ExternalProcessorStub(ch).Process()
    await route(call, EMBED, frame(req.SerializeToString()))
    passed, last = await answer(call, cut(data, (2, 9)))
    assert passed == data and [cost(r) for r in last] == [21 * 1000]
    assert histogram_sums(app)["inference_objective_input_tokens_sum"] == 21


async def test_oversized_and_partial_messages_are_skipped(start_picker) -> None:
    """A message over the scanner's bound is passed on (never buffered) and read past; a message
    cut off by the trailers is dropped: the counts are those of the last whole message."""
    app, ch = await start_picker(endpoints=[EP], config_text=CONFIG)
    big = pb.GenerateResponse(complete=pb.GenerateComplete(output_ids=[300_000] * 400_000, prompt_tokens=99,
                                                           completion_tokens=99))
    tail = frame(pb.GenerateResponse(complete=pb.GenerateComplete(prompt_tokens=50,
                                                                  completion_tokens=60)).SerializeToString())
    data = generate_answer(prompt=5, completion=6, cached=0) + frame(big.SerializeToString()) + tail[:-3]
    assert len(big.SerializeToString()) > 1 << 20
    call = ep_grpc.ExternalProcessorStub(ch).Process()
    await route(call, GENERATE, generate_request(True))
    passed, last = await answer(call, cut(data, (65536, 1000, 7)))
    assert passed == data and [cost(r) for r in last] == [5 * 1000 + 6]


async def test_passthrough_call_passes_through_unread(start_picker) -> None:
    """HealthCheck (not Generate/Embed) is routed without reading its body; its answer is passed on
    chunk by chunk and no usage is taken from it, even bytes that would decode as a GenerateComplete."""
    app, ch = await start_picker(endpoints=[EP], config_text=CONFIG)
    lookalike = generate_answer(prompt=8, completion=8, cached=0, chunks=0)
    call = ep_grpc.ExternalProcessorStub(ch).Process()
    await route(call, HEALTH, frame(pb.HealthCheckRequest().SerializeToString()))
    passed, last = await answer(call, cut(lookalike, (3,)))
    assert passed == lookalike and [cost(r) for r in last] == [None]
    assert histogram_sums(app).get("inference_objective_input_tokens_sum", 0.0) == 0


@pytest.mark.parametrize("ids", [5000, 20000])
async def test_in_flight_tokens_are_the_prompt_token_count(start_picker, ids: int) -> None:
    """A token-id request counts its exact prompt length (the parser's extra["prompt_tokens"], the
    whole prompt even past the 16384 ids kept for prefix matching) on the endpoint while in flight,
    not the body's bytes / 4; a text prompt still counts bytes / 4. Released at the end."""
    app, ch = await start_picker(endpoints=[EP], config_text=CONFIG)
    endpoint = next(iter(app.datastore.endpoints.values()))
    body = generate_request(True, ids=ids)
    assert len(body) // 4 != ids
    call = ep_grpc.ExternalProcessorStub(ch).Process()
    await route(call, GENERATE, body)
    assert endpoint.inflight_tokens == ids
    await answer(call, [generate_answer(prompt=ids, completion=2, cached=0)])
    assert endpoint.inflight_tokens == 0
    text = frame(pb.GenerateRequest(request_id="t", text="x" * 4000, stream=True).SerializeToString())
    call = ep_grpc.ExternalProcessorStub(ch).Process()
    await route(call, GENERATE, text)
    assert endpoint.inflight_tokens == len(text) // 4
    await answer(call, [generate_answer(prompt=1000, completion=2, cached=0)])
    assert endpoint.inflight_tokens == 0

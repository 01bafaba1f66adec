"""Body-based-routing mode through the real ext_proc server: model headers, route cache, no destination."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.bbr import parse_base_models
from tests.extproc_client import BUFFERED, body_chunks, chat, exchange, request_headers, set_headers, streamed_body


async def test_bbr_sets_model_headers_and_clears_route_cache(start_picker):
    app, ch = await start_picker(mode="bbr", pool_name="", base_models={"sql-lora": "llama-8b"})
    body = chat("sql-lora", "x" * 100)
    replies = await exchange(ch, [request_headers(), *body_chunks(body, 3)])
    h = replies[0]
    assert h.WhichOneof("response") == "request_headers"
    assert set_headers(h) == {"x-gateway-model-name": "sql-lora", "x-gateway-base-model-name": "llama-8b"}
    assert h.request_headers.response.clear_route_cache
    assert not h.HasField("dynamic_metadata")  # no endpoint is picked in this mode
    assert streamed_body(replies)[0] == body

    replies = await exchange(ch, [request_headers(mode=BUFFERED), *body_chunks(chat("base"))])
    assert set_headers(replies[1]) == {"x-gateway-model-name": "base", "x-gateway-base-model-name": "base"}


async def test_bbr_passes_non_openai_bodies_untouched_and_is_ready_without_pool(start_picker):
    app, ch = await start_picker(mode="bbr", pool_name="")
    replies = await exchange(ch, [request_headers(), *body_chunks(b"not json", 1)])
    assert set_headers(replies[0]) == {}
    assert streamed_body(replies)[0] == b"not json"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_health_port}") as hc:
        r = await health_pb2_grpc.HealthStub(hc).Check(health_pb2.HealthCheckRequest(service="readiness"))
    assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_parse_base_models():
    assert parse_base_models("a=b, c=d") == {"a": "b", "c": "d"}

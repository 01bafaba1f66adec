"""`python -m epp` as a real process: start-up, bad config, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.extproc_client import body_chunks, chat, request_headers, response_headers, set_headers
from tests.procs import free_ports, wait_serving


@pytest.fixture
def picker_proc():
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> tuple[subprocess.Popen, int, int]:
        port, hport = free_ports(2)
        p = subprocess.Popen([sys.executable, "-m", "epp", "--grpc-port", str(port), "--grpc-health-port", str(hport),
                              "--metrics-port", "0", "--bind-address", "127.0.0.1", "--log-format", "text", *args],
                             stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p, port, hport

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


async def test_sigterm_finishes_open_streams_then_exits(picker_proc):
    p, port, hport = picker_proc("--pool-name", "p", "--endpoints", "127.0.0.1:9", "--secure-serving=false",
                                 "--shutdown-grace", "5s", "--drain-timeout", "0")
    await wait_serving(hport)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ep_grpc.ExternalProcessorStub(ch).Process()
        await call.write(request_headers())
        for m in body_chunks(chat()):
            await call.write(m)
        assert set_headers(await call.read())["x-gateway-destination-endpoint"] == "127.0.0.1:9"
        await call.read()
        p.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        # new streams are refused while the open one still completes its response phase
        with pytest.raises(grpc.aio.AioRpcError):
            c2 = ep_grpc.ExternalProcessorStub(ch).Process()
            await c2.write(request_headers())
            await c2.read()
        await call.write(response_headers())
        assert (await call.read()).WhichOneof("response") == "response_headers"
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
    assert p.wait(timeout=10) == 0
    err = p.stderr.read() if p.stderr else ""
    assert "shutting down" in err and "picker stopped" in err


def test_bad_config_is_a_clear_error(picker_proc):
    p, _, _ = picker_proc("--pool-name", "p", "--endpoints", "127.0.0.1:9", "--config-text",
                          "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
                          "plugins: [{type: no-such-scorer}]\n"
                          "schedulingProfiles: [{name: d, plugins: [{pluginRef: no-such-scorer}]}]\n")
    assert p.wait(timeout=30) == 2
    err = p.stderr.read() if p.stderr else ""
    assert "config" in err and "no-such-scorer" in err


async def test_grpc_receive_limit_follows_the_body_cap(start_picker):
    """A buffered body message larger than the cap + margin is refused by gRPC from its length prefix
    (never read whole); one under the margin reaches the picker, which answers 413."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

    from tests.extproc_client import BUFFERED

    cap = 1 << 20
    app, ch = await start_picker(endpoints=["127.0.0.1:9"], max_request_body_bytes=cap)
    assert app.opts.grpc_recv_limit == 2 * cap

    async def send(size: int) -> ep.ProcessingResponse | grpc.aio.AioRpcError:
        call = ep_grpc.ExternalProcessorStub(ch).Process()
        try:
            await call.write(request_headers(mode=BUFFERED))
            await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=b"x" * size, end_of_stream=True)))
            await call.done_writing()
            out = None
            while (r := await call.read()) is not grpc.aio.EOF:
                out = r if out is None or r.WhichOneof("response") == "immediate_response" else out
            return out
        except grpc.aio.AioRpcError as e:
            return e

    over = await send(3 * cap)
    assert isinstance(over, grpc.aio.AioRpcError) and over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    under = await send(cap + cap // 2)
    assert not isinstance(under, grpc.aio.AioRpcError)
    assert under.immediate_response.status.code == 413
    assert (await send(100)) is not None  # the server is fine afterwards


async def test_disable_endpoint_subset_filter_ignores_the_hint(start_picker):
    from tests.extproc_client import exchange

    msgs = [request_headers(subset=["10.9.9.9:8000"]), *body_chunks(chat())]
    _, ch = await start_picker(endpoints=["127.0.0.1:9"])
    replies = await exchange(ch, msgs)
    assert any(r.immediate_response.status.code == 503 for r in replies)  # no hinted endpoint is in the pool
    _, ch2 = await start_picker(endpoints=["127.0.0.1:9"], disable_endpoint_subset_filter=True)
    replies = await exchange(ch2, msgs)
    assert any(set_headers(r).get("x-gateway-destination-endpoint") == "127.0.0.1:9" for r in replies)


async def test_standalone_mode_and_start_notices(start_picker, tmp_path, caplog, monkeypatch):
    import logging

    from epp.cli import parse_args

    caplog.set_level(logging.INFO)
    (tmp_path / "pods.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: x}}\n"
        "status: {podIP: 10.0.0.1, conditions: [{type: Ready, status: 'True'}]}\n")
    monkeypatch.setenv("POD_NAME", "my-epp-5d8c7b9f4-abcde")
    o = parse_args(["--endpoint-selector", "app=x", "--endpoint-target-ports", "8000", "--manifests",
                    str(tmp_path), "--health-checking", "--tls-min-version", "VersionTLS13"])
    app, _ = await start_picker(pool_name=o.pool_name, standalone=o.standalone, endpoint_selector=o.endpoint_selector,
                                endpoint_target_ports=o.endpoint_target_ports, manifests=o.manifests,
                                notices=o.notices)
    assert app.datastore.pool_name == "my-epp" and list(app.datastore.endpoints) == ["10.0.0.1:8000"]
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("standalone mode" in m for m in msgs) == 1
    assert sum(m.startswith("--health-checking has no effect here") for m in msgs) == 1
    assert sum(m.startswith("--tls-min-version has no effect here") for m in msgs) == 1


async def test_grpc_bind_address_moves_the_ext_proc_listener_alone(start_picker):
    from tests.extproc_client import exchange

    app, _ = await start_picker(endpoints=["127.0.0.1:9"], grpc_bind_address="127.0.0.2")
    async with grpc.aio.insecure_channel(f"127.0.0.2:{app.grpc_port}") as ch:
        replies = await exchange(ch, [request_headers(), *body_chunks(chat())])
        assert any(set_headers(r).get("x-gateway-destination-endpoint") == "127.0.0.1:9" for r in replies)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await exchange(ch, [request_headers(), *body_chunks(chat())])
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # nothing listens there for ext_proc
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_health_port}") as ch:  # probes unchanged
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="inference-extension"),
                                                       timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_hostport_brackets_ipv6():
    from epp.server import hostport

    assert hostport("::1", 9002) == "[::1]:9002" and hostport("0.0.0.0", 9002) == "0.0.0.0:9002"
    assert hostport("[::]", 1) == "[::]:1"

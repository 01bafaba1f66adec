"""`python -m epp` as a real process: start-up, bad config, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.extproc_client import body_chunks, chat, request_headers, response_headers, set_headers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def picker_proc():
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> tuple[subprocess.Popen, int, int]:
        port, hport = free_port(), free_port()
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


async def wait_serving(hport: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{hport}") as ch:
                r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="readiness"),
                                                               timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        await asyncio.sleep(0.1)
    raise AssertionError("picker never became ready")


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

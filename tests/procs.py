"""Loopback helpers shared by tests that start real listeners: a free port, and waiting for a
picker process to report SERVING on its gRPC health port."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    """A loopback port the OS just handed out and nothing listens on (connections are refused
    until someone binds it): for a process to listen on, or as a dead endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def dead_port() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block runs: bound, never
    listening, so no server started meanwhile can be handed it (a port from free_port() can be)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports: all held bound at once, since one released port may be the
    next one the OS hands out (two free_port() calls in a row can return the same port)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


async def wait_serving(hport: int, timeout: float = 30.0) -> None:
    """Poll the readiness health service on 127.0.0.1:`hport` until SERVING; AssertionError after `timeout`."""
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

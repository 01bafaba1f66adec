"""Shared fixtures: an in-process picker on OS-assigned loopback ports, and channels to it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

import grpc
import pytest

from epp.cli import Options
from epp.server import App
from tests.procs import dead_port

BASE = Options(pool_name="pool", grpc_port=0, grpc_health_port=0, metrics_port=0, secure_serving=False,
               bind_address="127.0.0.1", shutdown_grace=1.0)


@pytest.fixture
async def start_picker() -> AsyncIterator[Callable[..., Any]]:
    """`app, channel = await start_picker(endpoints=[...], manifests=[...], scheduler=...)`; all stopped after."""
    started: list[tuple[App, grpc.aio.Channel]] = []

    async def _start(scheduler: Any = None, **kw: Any) -> tuple[App, grpc.aio.Channel]:
        app = App(replace(BASE, **kw), scheduler=scheduler)
        await app.start()
        target = f"127.0.0.1:{app.grpc_port}"
        if app.opts.secure_serving:
            assert app.cert is not None
            creds = grpc.ssl_channel_credentials(root_certificates=app.cert.cert)
            ch = grpc.aio.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "localhost")])
        else:
            ch = grpc.aio.insecure_channel(target)
        started.append((app, ch))
        return app, ch

    yield _start
    for app, ch in started:
        with contextlib.suppress(Exception):
            await ch.close()
        await app.stop(0.5)


@pytest.fixture
def dead_address() -> Iterator[str]:
    """A loopback host:port that refuses connections for the whole test (kept bound: no server the
    test starts can be handed the port, as one can a port from free_port())."""
    with dead_port() as port:
        yield f"127.0.0.1:{port}"

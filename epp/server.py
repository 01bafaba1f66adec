"""Wiring: the datastore and its source, the director, the gRPC servers (ext_proc + health), shutdown.

`App` is what `python -m epp` runs and what integration tests start in-process (ports 0 = from
the OS; the bound ports are on the App after start()).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from epp import tls
from epp.bbr import BodyRouter
from epp.cli import Options
from epp.datastore import Datastore
from epp.director import Director
from epp.parsers import build_parser
from epp.requestcontrol.base import build_request_control
from epp.extproc import BUFFERED, DUPLEX, Decider, ExtProcServicer
from epp.metrics.engines import apply_overrides
from epp.metrics.scrape import Scraper
from epp.resources import pool_from_flags
from epp.scheduling.config import PickerConfig, build_admission, build_scheduler, describe, load_config
from epp.scheduling.framework import Scheduler
from epp.scheduling.scorers import pool_serves_adapters
from epp.scheduling.session import SessionAffinityScorer
from epp.telemetry import Telemetry

log = logging.getLogger("epp.server")

EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_SERVICES = ("", "liveness", "readiness", EXTPROC_SERVICE)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Source(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def session_header(scheduler: Scheduler) -> str | None:
    """The request header a configured session-affinity scorer reads (the response sets it)."""
    for ws in getattr(scheduler, "scorers", ()):
        if isinstance(ws.scorer, SessionAffinityScorer):
            return str(ws.scorer.header)
    return None


def config_text(opts: Options) -> str | None:
    """The EndpointPickerConfig YAML from --config-text or --config-file (None: the defaults)."""
    if opts.config_text:
        return opts.config_text
    if opts.config_file:
        with open(opts.config_file, encoding="utf-8") as f:
            return f.read()
    return None


class App:
    """One picker process: everything started by start() is stopped by stop()."""

    def __init__(self, opts: Options, *, scheduler: Scheduler | None = None) -> None:
        """Build everything that needs no I/O; raises ConfigError / ResourceError for a bad config."""
        self.opts = opts
        self.config: PickerConfig = load_config(config_text(opts))
        self.engines = apply_overrides(self.config.engine_metrics)
        self.datastore = Datastore(opts.pool_name, opts.pool_namespace)
        self.scheduler: Scheduler = scheduler or build_scheduler(
            self.config, has_lora=lambda: pool_serves_adapters(self.datastore.candidates))
        forget = getattr(self.scheduler, "on_endpoints_changed", None)
        if forget is not None:
            self.datastore.subscribe(forget)
        self.telemetry = Telemetry(pool_name=opts.pool_name)
        if hasattr(self.scheduler, "plugin_timer"):
            self.scheduler.plugin_timer = self.telemetry.plugin_observed
        self.director = Director(self.datastore, self.scheduler, telemetry=self.telemetry,
                                 admission=build_admission(self.config),
                                 session_header=session_header(self.scheduler),
                                 max_body_bytes=opts.max_request_body_bytes,
                                 parser=build_parser(getattr(self.config, "parser", None)),
                                 request_control=build_request_control(self.config.plugins))
        self.scraper: Scraper | None = None
        self.kube: Any = None  # the KubeSource, when watching a cluster
        mode = BUFFERED if opts.default_body_mode == "buffered" else DUPLEX
        decider: Decider = self.director
        if opts.mode == "bbr":
            decider = BodyRouter(opts.base_models, opts.max_request_body_bytes)
        self.servicer = ExtProcServicer(decider, default_body_mode=mode, default_response_mode=mode)
        self.health = HealthServicer()
        self.is_leader = not opts.ha_enable_leader_election
        self.sources: list[Source] = []
        self.grpc_port = 0
        self.grpc_health_port = 0
        self.metrics_port = 0
        self._servers: list[grpc.aio.Server] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._ready: tuple[bool, bool] | None = None
        self.cert: tls.KeyPair | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        o = self.opts
        if o.endpoints:
            self.datastore.set_static_endpoints(o.endpoints)
        pool_override = None
        if o.endpoint_selector:
            pool_override = pool_from_flags(o.pool_name, o.pool_namespace, o.endpoint_selector,
                                            o.endpoint_target_ports)
        if o.mode == "bbr":
            pass  # body-based routing reads no pool
        elif o.manifests:
            from epp.sources.files import FileSource

            self.sources.append(FileSource(self.datastore, o.manifests, pool_override=pool_override,
                                           pool_group=o.pool_group))
        elif o.endpoints and pool_override is None:
            self.datastore.set_pool(None)  # static endpoints alone make the pool
        else:
            self.sources.append(self._kube_source(pool_override))
        for src in self.sources:
            await src.start()
        if o.ha_enable_leader_election and o.mode == "epp":
            from epp.sources.leader import LeaderElector, lease_name

            # followers keep watching, scraping and serving ext_proc, so a failover starts warm;
            # only `readiness` follows leadership
            lease = lease_name(o.pool_name, o.pool_namespace)
            self.sources.append(LeaderElector(namespace=o.pool_namespace, name=lease, on_change=self.set_leader,
                                              kubeconfig=o.kubeconfig or None))
            await self.sources[-1].start()
        if o.mode == "epp":
            self.scraper = Scraper(self.datastore, interval=o.refresh_metrics_interval, engines=self.engines)
            self.scraper.start()
            log.info("scheduling profile", extra={"profile": describe(self.config)})

        for svc in HEALTH_SERVICES:
            await self.health.set(svc, _NOT_SERVING)
        await self.health.set("liveness", _SERVING)

        main = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)])
        ep_grpc.add_ExternalProcessorServicer_to_server(self.servicer, main)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, main)
        addr = f"{o.bind_address}:{o.grpc_port}"
        if o.secure_serving and o.enable_cert_reload and o.cert_path:
            reloader = tls.ReloadingCert(o.cert_path)
            self.cert = reloader.current

            def fetch() -> grpc.ServerCertificateConfiguration | None:
                pair = reloader.fetch()
                if pair is None:
                    return None
                self.cert = pair
                log.info("serving certificate reloaded", extra={"path": o.cert_path})
                return grpc.ssl_server_certificate_configuration([(pair.key, pair.cert)])

            creds = grpc.dynamic_ssl_server_credentials(
                grpc.ssl_server_certificate_configuration([(self.cert.key, self.cert.cert)]), fetch)
            self.grpc_port = main.add_secure_port(addr, creds)
        elif o.secure_serving:
            self.cert = (tls.load_dir(o.cert_path) if o.cert_path else None) or tls.self_signed()
            creds = grpc.ssl_server_credentials([(self.cert.key, self.cert.cert)])
            self.grpc_port = main.add_secure_port(addr, creds)
        else:
            self.grpc_port = main.add_insecure_port(addr)
        self._servers.append(main)
        if o.grpc_health_port != o.grpc_port or o.grpc_health_port == 0:
            hs = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, hs)
            self.grpc_health_port = hs.add_insecure_port(f"{o.bind_address}:{o.grpc_health_port}")
            self._servers.append(hs)
        for s in self._servers:
            await s.start()
        self.metrics_port = self.telemetry.serve(o.metrics_port, o.bind_address)
        self._tasks.append(asyncio.create_task(self._readiness_loop(), name="readiness"))
        self._tasks.append(asyncio.create_task(self.telemetry.run_pool_refresh(
            self.datastore, o.refresh_prometheus_metrics_interval, o.metrics_staleness_threshold,
            prefix_stats=getattr(self.scheduler, "stats", None)), name="pool-gauges"))
        await self._update_readiness()
        log.info("picker started", extra={
            "pool": f"{o.pool_namespace}/{o.pool_name}", "grpc_port": self.grpc_port,
            "health_port": self.grpc_health_port, "metrics_port": self.metrics_port, "tls": o.secure_serving})

    def _kube_source(self, pool_override: Any) -> Source:
        from epp.sources.kube import KubeSource  # the kubernetes client is only needed in a cluster

        # with leader election only the leader writes InferenceModel status (set_leader switches it)
        self.kube = KubeSource(self.datastore, pool_name=self.opts.pool_name, namespace=self.opts.pool_namespace,
                               pool_group=self.opts.pool_group, kubeconfig=self.opts.kubeconfig or None,
                               pool_override=pool_override, write_status=not self.opts.ha_enable_leader_election)
        return self.kube

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking new streams, let open ones finish within `grace`, then stop everything."""
        grace = self.opts.shutdown_grace if grace is None else grace
        for svc in HEALTH_SERVICES:
            with contextlib.suppress(Exception):
                await self.health.set(svc, _NOT_SERVING)
        await asyncio.gather(*(s.stop(grace) for s in self._servers), return_exceptions=True)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for src in self.sources:
            with contextlib.suppress(Exception):
                await src.stop()
        if self.scraper is not None:
            await self.scraper.stop()
        self.telemetry.close()
        log.info("picker stopped")

    async def wait(self) -> None:
        await asyncio.gather(*(s.wait_for_termination() for s in self._servers))

    # ---- readiness ------------------------------------------------------------------------
    def set_leader(self, leader: bool) -> None:
        """Leader election callback: readiness follows leadership."""
        self.is_leader = leader
        if self.kube is not None:
            self.kube.set_status_writer(leader)
        asyncio.get_running_loop().create_task(self._update_readiness())

    async def _update_readiness(self) -> None:
        # every replica serves ext_proc once the pool is loaded; `readiness` (what Kubernetes uses to
        # send traffic) also requires leadership when leader election is on, as the reference does
        loaded = self.opts.mode == "bbr" or self.datastore.ready
        state = (loaded, loaded and self.is_leader)
        if state == self._ready:
            return
        self._ready = state
        for svc in ("", EXTPROC_SERVICE):
            await self.health.set(svc, _SERVING if loaded else _NOT_SERVING)
        await self.health.set("readiness", _SERVING if state[1] else _NOT_SERVING)
        log.info("readiness changed", extra={"pool_loaded": loaded, "leader": self.is_leader, "ready": state[1]})

    async def _readiness_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            await self._update_readiness()

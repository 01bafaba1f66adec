"""Wiring: the datastore and its source, the director, the gRPC servers (ext_proc + health), shutdown.

`App` is what `python -m epp` runs and what integration tests start in-process (ports 0 = from
the OS; the bound ports are on the App after start()).

Health (gRPC, on the health port and the ext_proc port): `liveness` is SERVING while the process
runs. Without leader election every other service name, including the `inference-extension` the
reference's chart probes ask for, is SERVING once the pool is loaded. With leader election
`readiness` and `inference-extension` are SERVING on the loaded leader only, `""` and the
ExternalProcessor service on every loaded replica (followers keep answering the proxy), other
names are SERVICE_UNKNOWN, as in the reference.

Active-active (`--ha-mode active-active`): every loaded replica is ready and serving whatever the
Lease says; with `--ha-enable-leader-election` the Lease still picks the one replica that writes
InferenceModel status. Replicas share no state: prefix affinity that agrees across replicas comes
from the engines' KV events (precise-prefix-cache-producer: every replica hears every event), and
in-flight counts are each replica's own.

Shutdown (SIGTERM): `begin_drain()` turns every service but `liveness` NOT_SERVING at once and
gives up the leader Lease, while ext_proc keeps serving new streams for `--drain-timeout` (the
proxy and the Service notice the change within their probe period); then `stop()` refuses new
streams and lets open ones finish within `--shutdown-grace`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from epp import h2server, tls
from epp.bbr import BodyRouter
from epp.cli import Options, config_text
from epp.datalayer import DataLayerConfig
from epp.datastore import Datastore
from epp.director import Director, LoadShare
from epp.extproc import BUFFERED, DUPLEX, ExtProcServicer
from epp.flowcontrol import build as flow_build
from epp.flowcontrol.aio import AsyncFlowControl
from epp.flowcontrol.metrics import FlowControlMetrics
from epp.metrics.engines import apply_data_layer, apply_flag_overrides, apply_overrides
from epp.metrics.scrape import ScrapeThread
from epp.metrics_http import KubeAuthorizer, KubeReviews, MetricsServer
from epp.metrics_merge import fetch_pages
from epp.parsers import build_parser
from epp.peers import DEFAULT_PORT as PEER_PORT
from epp.peers import PeerCollector, PeerSync, parse_peers
from epp.requestcontrol.base import build_request_control
from epp.resources import pool_from_flags
from epp.scheduling.config import (
    ConfigError,
    PickerConfig,
    build_admission,
    build_scheduler,
    describe,
    load_config,
)
from epp.scheduling.framework import Scheduler
from epp.scheduling.scorers import pool_serves_adapters
from epp.scheduling.session import SessionAffinityScorer, configure_session_keys, read_session_keys
from epp.telemetry import Telemetry
from epp.workershare import SharedMetricsThread, SharePublisher, SiblingShare, WorkerShare

log = logging.getLogger("epp.server")

EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
PROBE_SERVICE = "inference-extension"  # what the reference's chart probes ask for
HEALTH_SERVICES = ("", "liveness", "readiness", EXTPROC_SERVICE, PROBE_SERVICE)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Source(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def session_header(scheduler: Scheduler) -> str | None:
    """The request header a configured session-affinity scorer reads (the response sets it)."""
    for ws in getattr(scheduler, "scorers", ()):
        if isinstance(ws.scorer, SessionAffinityScorer):
            return str(ws.scorer.header)
    return None


class PickerHealth(HealthServicer):
    """gRPC health by rule (see module doc) rather than by a fixed list of names."""

    def __init__(self, leader_election: bool) -> None:
        super().__init__()
        self.leader_election = leader_election
        self.loaded = False
        self.leader = not leader_election
        self.draining = False

    def status(self, service: str) -> int:
        """The answer for one service name."""
        if service == "liveness":
            return _SERVING
        up = self.loaded and not self.draining
        if not self.leader_election:
            return _SERVING if up else _NOT_SERVING
        if service in ("readiness", PROBE_SERVICE):
            return _SERVING if up and self.leader else _NOT_SERVING
        if service in ("", EXTPROC_SERVICE):
            return _SERVING if up else _NOT_SERVING
        return _UNKNOWN

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=self.status(request.service))  # type: ignore[arg-type]

    async def publish(self) -> None:
        """Push the current answers to Watch streams of the well-known names."""
        for svc in HEALTH_SERVICES:
            await self.set(svc, self.status(svc))  # type: ignore[arg-type]


class SubsetIgnored:
    """`--disable-endpoint-subset-filter`: the director never sees the proxy's subset hint.
    Everything but decide() is the wrapped decider's own (attribute lookup falls through)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def decide(self, headers: dict[str, str], body: bytes | None, subset_hint: object = None,
               started: float | None = None) -> Any:
        return self.inner.decide(headers, body, None, started)


def hostport(host: str, port: int) -> str:
    """`host:port` for gRPC, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@dataclass(slots=True)
class _DataLayerGiven:
    """The data layer's where-to-scrape settings that differ from its defaults (None: not given)."""

    scheme: str | None
    path: str | None
    port: int | None
    insecure_skip_verify: bool | None


def data_layer_given(dl: DataLayerConfig | None) -> _DataLayerGiven | None:
    """What of the config's metrics-data-source to apply to every engine: only what differs from
    the source's defaults, so a source declared with defaults keeps each engine's own path and
    port (Triton, SGLang) instead of forcing `/metrics` on all of them."""
    if dl is None:
        return None
    d = DataLayerConfig()
    return _DataLayerGiven(
        scheme=dl.scheme if dl.scheme != d.scheme else None,
        path=dl.path if dl.path != d.path else None,
        port=dl.port if dl.port != d.port else None,
        insecure_skip_verify=dl.insecure_skip_verify if dl.insecure_skip_verify != d.insecure_skip_verify else None)


def engine_specs(config_engines: Any, opts: Options, data_layer: DataLayerConfig | None = None) -> dict[str, Any]:
    """The engine metric map: built-ins, the config's engineMetrics, the config's metrics-data-source
    (scheme/path/port/insecureSkipVerify), then the reference's flags (a flag wins over the config)."""
    f = opts.metric_flags
    return apply_flag_overrides(
        apply_data_layer(apply_overrides(config_engines), data_layer_given(data_layer)),
        scheme=opts.model_server_metrics_scheme, path=opts.model_server_metrics_path,
        port=opts.model_server_metrics_port, insecure_skip_verify=opts.model_server_metrics_insecure,
        queued=f.get("total-queued-requests-metric"), running=f.get("total-running-requests-metric"),
        kv=f.get("kv-cache-usage-percentage-metric"), lora=f.get("lora-info-metric"),
        cache_info=f.get("cache-info-metric"))


class App:
    """One picker process: everything started by start() is stopped by stop()."""

    def __init__(self, opts: Options, *, scheduler: Scheduler | None = None) -> None:
        """Build everything that needs no I/O; raises ConfigError / ResourceError for a bad config."""
        self.opts = opts
        if opts.session_key_file:  # before anything signs a token; a bad file stops the start (exit 2)
            try:
                configure_session_keys(opts.session_key_file)
            except ValueError as e:
                raise ConfigError("--session-key-file", str(e)) from None
        self.config: PickerConfig = load_config(config_text(opts))
        self.engines = engine_specs(self.config.engine_metrics, opts, getattr(self.config, "data_layer", None))
        self.datastore = Datastore(opts.pool_name, opts.pool_namespace)
        self.scheduler: Scheduler = scheduler or build_scheduler(
            self.config, has_lora=lambda: pool_serves_adapters(self.datastore.candidates))
        forget = getattr(self.scheduler, "on_endpoints_changed", None)
        if forget is not None:
            self.datastore.subscribe(forget)
        self.telemetry = Telemetry(pool_name=opts.pool_name)
        # precise prefix producers (KV events): per-pod mode when wired to an endpoint-notification-
        # source, endpoints that leave forgotten, index metrics exported; subscribers start in start()
        from epp.kvevents.metrics import register as register_kv_metrics
        from epp.producers.precise_prefix import find_producers, wire
        self.kv_producers = find_producers(self.scheduler)
        wire(self.kv_producers, getattr(self.config, "data_layer", None), self.config.plugins)
        for prod in self.kv_producers:
            self.datastore.subscribe(prod.on_endpoints_changed)
            register_kv_metrics(self.telemetry.registry, prod)
        if hasattr(self.scheduler, "plugin_timer"):
            self.scheduler.plugin_timer = self.telemetry.plugin_observed
        self.flow: AsyncFlowControl | None = self._flow_control(opts)
        # --workers: worker 0's scrapes and every worker's in-flight counts, through shared memory
        self.share: WorkerShare | None = (WorkerShare(opts.worker_share, max(0, opts.worker_index))
                                          if opts.worker_share else None)
        # --ha-peers: active-active replicas tell each other what they route (epp.peers)
        self.peers: PeerSync | None = None
        if opts.ha_peers:
            self.peers = PeerSync(key=read_session_keys(opts.session_key_file)[0],
                                  port=opts.ha_peer_port or PEER_PORT, peers=parse_peers(opts.ha_peers),
                                  bind_address=opts.bind_address, scheduler=self.scheduler,
                                  endpoints=self.datastore.endpoints.get)
        # --workers: what each worker's plugins learn (the approximate prefix index's placements) goes
        # to its siblings as --ha-peers notes over ipc://, signed with the share's key
        self.siblings: PeerSync | None = None
        if self.share is not None and self.peers is None and self.share.workers > 1 and opts.worker_prefix_notes:
            me = self.share.worker
            others = [self.share.sibling_url(i) for i in range(self.share.workers) if i != me]
            self.siblings = PeerSync(key=self.share.sibling_key(), port=0, peers=[], scheduler=self.scheduler,
                                     endpoints=self.datastore.endpoints.get, bind_url=self.share.sibling_url(me),
                                     peer_urls=others, notes_only=True)
        load_share: LoadShare | None = self.share if self.share is not None else self.peers
        if self.share is not None and self.siblings is not None:
            load_share = SiblingShare(self.share, self.siblings)
        self.director = Director(self.datastore, self.scheduler, telemetry=self.telemetry,
                                 admission=build_admission(self.config),
                                 session_header=session_header(self.scheduler),
                                 max_body_bytes=opts.max_request_body_bytes,
                                 parser=build_parser(getattr(self.config, "parsers", None)
                                                     or getattr(self.config, "parser", None)),
                                 request_control=build_request_control(self.config.plugins),
                                 flow_control=self.flow,
                                 share=load_share)
        self.scraper: ScrapeThread | SharedMetricsThread | None = None
        self.kube: Any = None  # the KubeSource, when watching a cluster
        mode = BUFFERED if opts.default_body_mode == "buffered" else DUPLEX
        decider: Any = self.director  # a Decider, maybe wrapped
        if opts.mode == "bbr":
            decider = BodyRouter(opts.base_models, opts.max_request_body_bytes)
        elif opts.disable_endpoint_subset_filter:
            decider = SubsetIgnored(decider)
        self.tracer_provider: Any = None
        if opts.tracing:
            from epp import tracing  # the OpenTelemetry SDK is imported only when asked for

            try:
                self.tracer_provider = tracing.setup()
            except Exception as e:  # a missing SDK or a bad OTEL_* setting must not stop the picker
                log.error("tracing is off: it could not be set up", extra={"flag": "--tracing", "error": str(e)})
            else:
                decider = tracing.TracingDecider(decider, self.tracer_provider)
        self.decider = decider
        self.servicer = ExtProcServicer(decider, default_body_mode=mode, default_response_mode=mode,
                                        response_body_sample=opts.response_body_sample,
                                        response_headers_sample=opts.response_headers_sample)
        # active-active: readiness never follows the Lease (every replica takes traffic)
        self.health = PickerHealth(opts.ha_enable_leader_election and opts.mode == "epp"
                                   and opts.ha_mode != "active-active")
        self.is_leader = not opts.ha_enable_leader_election
        self.elector: Any = None
        self.metrics_http: MetricsServer | None = None
        self.sources: list[Source] = []
        self.grpc_port = 0
        self.grpc_health_port = 0
        self.metrics_port = 0
        self._servers: list[Any] = []  # grpc.aio.Server or h2server.GrpcServer (start/stop/wait)
        self._tasks: list[asyncio.Task[Any]] = []
        self._ready: tuple[bool, bool, bool] | None = None
        self.cert: tls.KeyPair | None = None

    def _flow_control(self, opts: Options) -> AsyncFlowControl | None:
        """Flow control when `featureGates: [flowControl]`: its metrics join the picker's registry;
        endpoint changes wake its dispatch."""
        if not flow_build.enabled(self.config):
            return None
        s = flow_build.settings(self.config)
        metrics = FlowControlMetrics(self.telemetry.registry, opts.pool_name, detector=s.detector_name)
        controller = flow_build.build(self.config, lambda: self.datastore.candidates, metrics=metrics)
        assert controller is not None
        metrics.watch(controller)
        flow = AsyncFlowControl(controller)
        self.datastore.subscribe(lambda added, removed: flow.notify())
        log.info("flow control on", extra={"detector": s.detector_name, "default_ttl_s": s.default_ttl,
                                           "max_requests": s.max_requests, "max_bytes": s.max_bytes})
        return flow

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        o = self.opts
        for notice in o.notices:
            log.info(notice)
        if o.workers_why:  # --workers not given, one process: why (a supervisor says it for its workers)
            log.info("workers", extra={"workers": o.workers, "why": o.workers_why})
        for warning in self.config.warnings:  # what the config asked for but will not get, once per start
            log.warning("config: %s", warning)
        for prod in self.kv_producers:  # binds the centralized KV-event endpoint, when configured
            await asyncio.to_thread(prod.start)
        if self.peers is not None:
            self.peers.start()
            self.telemetry.registry.register(PeerCollector(self.peers))  # type: ignore[arg-type]
        if self.siblings is not None:
            self.siblings.start()
        if o.standalone:
            log.info("standalone mode: no InferencePool object; the pool comes from --endpoint-selector",
                     extra={"pool": o.pool_name, "selector": o.endpoint_selector, "ports": o.endpoint_target_ports})
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
            self.elector = LeaderElector(namespace=o.pool_namespace, name=lease, on_change=self.set_leader,
                                         kubeconfig=o.kubeconfig or None)
            self.sources.append(self.elector)
            await self.elector.start()
        if o.mode == "epp" and not self._metrics_off() and self.share is not None and self.share.worker > 0:
            # --workers: worker 0 polls the model servers; this one copies its pages (a thread too)
            self.scraper = SharedMetricsThread(self.datastore, self.share, period=o.refresh_metrics_interval / 4)
            self.scraper.start()
            log.info("scheduling profile", extra={"profile": describe(self.config)})
        elif o.mode == "epp" and not self._metrics_off():
            # on a thread with its own loop: nothing but requests on the serving loop
            self.scraper = ScrapeThread(self.datastore, interval=o.refresh_metrics_interval, engines=self.engines,
                                        idle_interval=o.refresh_metrics_idle_interval or None,
                                        quiet_interval=o.refresh_metrics_quiet_interval or None,
                                        max_age=self.config.saturation.stale_after,
                                        publish=SharePublisher(self.share) if self.share is not None else None)
            self.scraper.start()
            log.info("scheduling profile", extra={"profile": describe(self.config)})

        await self.health.publish()

        if o.grpc_server == "grpcio":
            await self._serve_grpcio()
        else:
            await self._serve_native()
        share = self.share
        if share is not None and share.worker > 0:
            # --workers: worker 0 merges this page into its own; loopback only, so no auth and no debug
            self.metrics_http = MetricsServer(self.telemetry.registry)
            self.metrics_port = self.metrics_http.start(0, "127.0.0.1")
            share.set_metrics_port(self.metrics_port)
        else:
            peers = ((lambda: fetch_pages(share.peer_metrics_ports())) if share is not None else None)
            self.metrics_http = MetricsServer(self.telemetry.registry, authorizer=self._metrics_authorizer(),
                                              debug=self._debug_routes(), peers=peers)
            self.metrics_port = self.metrics_http.start(o.metrics_port, o.bind_address)
        self._tasks.append(asyncio.create_task(self._readiness_loop(), name="readiness"))
        self._tasks.append(asyncio.create_task(self.telemetry.run_pool_refresh(
            self.datastore, o.refresh_prometheus_metrics_interval, o.metrics_staleness_threshold,
            prefix_stats=getattr(self.scheduler, "stats", None)), name="pool-gauges"))
        await self._update_readiness()
        log.info("picker started", extra={
            "pool": f"{o.pool_namespace}/{o.pool_name}", "grpc_port": self.grpc_port,
            "health_port": self.grpc_health_port, "metrics_port": self.metrics_port, "tls": o.secure_serving,
            "client_certs_required": bool(o.secure_serving and o.client_ca_file), "grpc_server": o.grpc_server})

    async def _serve_grpcio(self) -> None:
        """`--grpc-server grpcio`: ext_proc and health on grpc.aio (the C core's own threads)."""
        o = self.opts
        # the receive limit follows the body cap, so an oversized message is refused by its length
        # prefix instead of being read whole first
        reuse = 1 if o.workers > 1 else 0  # --workers: every worker listens on the same port
        grpc_opts: list[tuple[str, Any]] = [("grpc.so_reuseport", reuse),
                                            ("grpc.max_receive_message_length", o.grpc_recv_limit)]
        if o.grpc_max_send_msg_size:
            grpc_opts.append(("grpc.max_send_message_length", o.grpc_max_send_msg_size))
        main = grpc.aio.server(options=grpc_opts)
        ep_grpc.add_ExternalProcessorServicer_to_server(self.servicer, main)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, main)
        addr = hostport(o.grpc_bind_address or o.bind_address, o.grpc_port)
        # --client-ca-file: mutual TLS, a client without a certificate from that CA fails the handshake
        mtls = bool(o.secure_serving and o.client_ca_file)
        if o.secure_serving and o.enable_cert_reload and o.cert_path:
            reloader = tls.ReloadingCert(o.cert_path, o.client_ca_file if mtls else "")
            self.cert = reloader.current

            def fetch() -> grpc.ServerCertificateConfiguration | None:
                pair = reloader.fetch()
                if pair is None:
                    return None
                self.cert = pair
                log.info("serving certificate reloaded", extra={"path": o.cert_path, "client_ca": o.client_ca_file})
                return grpc.ssl_server_certificate_configuration([(pair.key, pair.cert)], reloader.ca)

            creds = grpc.dynamic_ssl_server_credentials(
                grpc.ssl_server_certificate_configuration([(self.cert.key, self.cert.cert)], reloader.ca), fetch,
                require_client_authentication=mtls)
            self.grpc_port = main.add_secure_port(addr, creds)
        elif o.secure_serving:
            self.cert = (tls.load_dir(o.cert_path) if o.cert_path else None) or tls.self_signed()
            creds = grpc.ssl_server_credentials([(self.cert.key, self.cert.cert)],
                                                tls.read_ca(o.client_ca_file) if mtls else None,
                                                require_client_auth=mtls)
            self.grpc_port = main.add_secure_port(addr, creds)
        else:
            self.grpc_port = main.add_insecure_port(addr)
        self._servers.append(main)
        if o.grpc_health_port != o.grpc_port or o.grpc_health_port == 0:
            hs = grpc.aio.server(options=[("grpc.so_reuseport", reuse)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, hs)
            self.grpc_health_port = hs.add_insecure_port(hostport(o.bind_address, o.grpc_health_port))
            self._servers.append(hs)
        for s in self._servers:
            await s.start()

    async def _serve_native(self) -> None:
        """ext_proc and health on epp.h2server: HTTP/2 read and answered on the serving loop."""
        o = self.opts
        health = h2server.servicer_methods("grpc.health.v1.Health", self.health, {
            "Check": ("unary_unary", health_pb2.HealthCheckRequest),
            "Watch": ("unary_stream", health_pb2.HealthCheckRequest)})
        methods = {"/envoy.service.ext_proc.v3.ExternalProcessor/Process":
                   h2server.Method("stream_steps", ProcessingRequest.FromString, self.servicer), **health}
        # the receive limit follows the body cap, so an oversized message is refused by its length
        # prefix instead of being read whole first
        main = h2server.GrpcServer(methods, max_receive=o.grpc_recv_limit, max_send=o.grpc_max_send_msg_size or None)
        mtls = bool(o.secure_serving and o.client_ca_file)
        factory: Callable[[], ssl.SSLContext] | None = None
        if o.secure_serving and o.enable_cert_reload and o.cert_path:
            reloader = tls.ReloadingCert(o.cert_path, o.client_ca_file if mtls else "")
            self.cert = reloader.current
            current = [h2server.server_context(self.cert.cert, self.cert.key, reloader.ca if mtls else None)]

            def factory() -> ssl.SSLContext:  # asked at every new connection, as grpc's dynamic credentials
                pair = reloader.fetch()
                if pair is not None:
                    try:
                        current[0] = h2server.server_context(pair.cert, pair.key, reloader.ca if mtls else None)
                    except (ssl.SSLError, ValueError, OSError) as e:
                        log.error("serving certificate not reloaded: it does not load",
                                  extra={"path": o.cert_path, "error": str(e)})
                    else:
                        self.cert = pair
                        log.info("serving certificate reloaded",
                                 extra={"path": o.cert_path, "client_ca": o.client_ca_file})
                return current[0]
        elif o.secure_serving:
            self.cert = (tls.load_dir(o.cert_path) if o.cert_path else None) or tls.self_signed()
            fixed = h2server.server_context(self.cert.cert, self.cert.key,
                                            tls.read_ca(o.client_ca_file) if mtls else None)
            factory = lambda: fixed  # noqa: E731
        reuse = o.workers > 1  # --workers: every worker listens on the same port (unless handed connections)
        if o.worker_handoff_fd >= 0:  # --worker-connections balanced: the supervisor accepts (epp.handoff)
            main.adopt_from(o.worker_handoff_fd, ssl_context=factory)
            self.grpc_port = o.grpc_port
        else:
            self.grpc_port = await main.listen(o.grpc_bind_address or o.bind_address, o.grpc_port,
                                               reuse_port=reuse, ssl_context=factory)
        self._servers.append(main)
        if o.grpc_health_port != o.grpc_port or o.grpc_health_port == 0:
            hs = h2server.GrpcServer(health)
            self.grpc_health_port = await hs.listen(o.bind_address, o.grpc_health_port, reuse_port=reuse)
            self._servers.append(hs)

    def _metrics_off(self) -> bool:
        """The config wires data sources but no metrics-data-source (its warning says so): no scraping."""
        dl = getattr(self.config, "data_layer", None)
        return dl is not None and not dl.metrics_enabled

    def _metrics_authorizer(self) -> KubeAuthorizer | None:
        o = self.opts
        if not o.metrics_endpoint_auth:
            return None
        if self.kube is None and not o.kubeconfig:
            log.warning("metrics endpoint auth is off: no cluster to review tokens with (no-cluster mode); "
                        "/metrics is open to anyone who can reach the port",
                        extra={"flag": "--metrics-endpoint-auth"})
            return None
        from epp.sources.kube_client import make_api_client

        try:
            api = make_api_client(o.kubeconfig or None)
        except Exception as e:
            log.warning("metrics endpoint auth is off: no Kubernetes client configuration",
                        extra={"error": str(e)})
            return None
        log.info("metrics endpoint auth on: bearer token, TokenReview + SubjectAccessReview")
        return KubeAuthorizer(KubeReviews(api))

    def _debug_routes(self) -> Any:
        if not self.opts.enable_pprof:
            return None
        from epp.debug import DebugRoutes

        return DebugRoutes(asyncio.get_running_loop())

    def _kube_source(self, pool_override: Any) -> Source:
        from epp.sources.kube import KubeSource  # the kubernetes client is only needed in a cluster

        # with leader election only the leader writes InferenceModel status (set_leader switches it)
        self.kube = KubeSource(self.datastore, pool_name=self.opts.pool_name, namespace=self.opts.pool_namespace,
                               pool_group=self.opts.pool_group, kubeconfig=self.opts.kubeconfig or None,
                               pool_override=pool_override, write_status=not self.opts.ha_enable_leader_election)
        return self.kube

    async def begin_drain(self) -> None:
        """SIGTERM, step one: NOT_SERVING everywhere but `liveness` (the Service and the proxy take
        this replica out) and the leader Lease given up; ext_proc keeps serving new streams."""
        if self.health.draining:
            return
        self.health.draining = True
        await self._update_readiness()
        if self.elector is not None:
            with contextlib.suppress(Exception):
                await self.elector.stop()  # releases the Lease so a follower takes over at once

    async def drain(self, timeout: float | None = None) -> None:
        """begin_drain(), then keep serving for `timeout` (default --drain-timeout)."""
        await self.begin_drain()
        await asyncio.sleep(self.opts.drain_timeout if timeout is None else timeout)

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking new streams, let open ones finish within `grace`, then stop everything."""
        grace = self.opts.shutdown_grace if grace is None else grace
        self.health.draining = True
        if self.flow is not None:
            n = self.flow.close()  # every queued request is answered 500 (rejected-shutting-down)
            if n:
                log.info("flow control shut down", extra={"evicted": n})
        with contextlib.suppress(Exception):
            await self.health.publish()
        await asyncio.gather(*(s.stop(grace) for s in self._servers), return_exceptions=True)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for prod in getattr(self, "kv_producers", ()):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(prod.stop)
        for prep in self.director.preparers:  # engine render clients hold an HTTP session
            render = getattr(prep, "render", None)
            if render is not None:
                with contextlib.suppress(Exception):
                    await render.close()
        for src in self.sources:
            with contextlib.suppress(Exception):
                await src.stop()
        if self.scraper is not None:
            await self.scraper.stop()
        if self.peers is not None:
            await self.peers.stop()
        if self.siblings is not None:
            await self.siblings.stop()
        if self.share is not None:
            self.share.close()
        if self.metrics_http is not None:
            self.metrics_http.close()
        if self.tracer_provider is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.tracer_provider.shutdown)  # flushes queued spans
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
        state = (loaded, self.is_leader, self.health.draining)
        if state == self._ready:
            return
        self._ready = state
        self.health.loaded, self.health.leader = loaded, self.is_leader
        await self.health.publish()
        log.info("readiness changed", extra={"pool_loaded": loaded, "leader": self.is_leader,
                                             "draining": self.health.draining,
                                             "ready": self.health.status("readiness") == _SERVING})

    async def _readiness_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            await self._update_readiness()

"""Envoy bootstrap for one or more InferencePools: the single source of every Envoy config we ship.

`bootstrap(pools, ...)` returns a complete Envoy v3 bootstrap (a plain dict, dumped as YAML or JSON):
a listener with the HTTP connection manager, the ext_proc filter calling the pool's picker, the
router, a routing cluster per pool, a picker cluster per pool and an admin endpoint. The standalone
chart, the e2e tests and `python -m epp envoy-config` all use it.

Processing profiles (what Envoy sends the picker; every message costs picker CPU, so each profile
asks only for the phases its features need):

| profile  | req headers | req body             | req trailers | resp headers | resp body            | resp trailers |
|----------|-------------|----------------------|--------------|--------------|----------------------|---------------|
| duplex   | SEND        | FULL_DUPLEX_STREAMED | SEND         | SEND         | FULL_DUPLEX_STREAMED | SEND          |
| buffered | SEND        | BUFFERED             | SKIP         | SEND         | STREAMED (override)  | SEND          |
| lean     | SEND        | FULL_DUPLEX_STREAMED | SEND         | SKIP         | NONE                 | SEND          |

buffered is the default (DEFAULT_PROFILE): per request it costs the picker 2 messages (3 for the
requests whose response headers it needs or samples), where duplex costs two per SSE chunk of the
response; duplex is the reference gateway's profile.

- Picking, model rewrite and the request-side objective/fairness headers need the request headers
  and body: every profile.
- Usage (token counts), token metrics and restoring the client's model name in the response body
  need the response body: duplex for every request; buffered for the requests that need it (the
  picker's `mode_override` on the response-headers reply turns the body off for the others:
  `allow_mode_override` is set for this profile only, because Envoy 1.40 ignores an override
  while the request body mode is FULL_DUPLEX_STREAMED; buffered's response trailers SEND keep the
  ext_proc stream open to the end of the exchange once the body is off).
- The served endpoint (fallback feedback), the conformance echo header and time to first byte need
  the response headers: duplex and buffered (in buffered the picker's `mode_override` on the
  request-headers reply skips the whole response side of a request that can need none of it; a
  `header_mutation` filter first in the chain then removes the route's served-endpoint stamp the
  picker would otherwise remove). The end of in-flight accounting needs the ext_proc
  stream to stay open until the exchange ends: with a FULL_DUPLEX_STREAMED request body Envoy 1.40
  closes it as soon as no phase is left to send, so lean asks for response trailers, which keeps
  it open to the end at no cost (a response without trailers sends no message); without them the
  stream closed ~10 ms into a 2 s request and in-flight counts ended at dispatch.
- BUFFERED makes Envoy hold the whole request body (up to `buffer_limit_bytes`, else 413);
  FULL_DUPLEX_STREAMED needs request trailers SEND (Envoy rejects the config otherwise), and gets
  the body coalesced by a `buffer` filter first (same bound): one message however it was framed.

Routing on the pick:
- `original_dst`: an ORIGINAL_DST cluster reading `x-gateway-destination-endpoint`. Any pod
  address works without Envoy knowing the pods, but the header must hold exactly one `ip:port`
  (Envoy 1.40 answers 503 for a comma-separated list) and a retry goes to the same pod, so there
  are no fallbacks, and FailOpen cannot route (no header, no host; a client's copy of the header
  is removed at the edge, docs/security.md).
- `override_host`: the `envoy.load_balancing_policies.override_host` policy reading the header, then
  the `envoy.lb` metadata; a list is tried in order (a dead primary falls back to the next on
  retry), and without a usable pick it balances by least-request. Envoy must know the endpoints:
  static `endpoints` or `endpoints_dns` (a headless Service name, resolved to every pod IP).

Multi-pool (seed 003's two callouts): a first ext_proc filter calls a picker in body-based-routing
mode, which copies the body's model into `X-Gateway-Model-Name` and clears the route cache; routes
matching that header pick the pool, and each route's `ExtProcPerRoute` points the second ext_proc
filter at that pool's picker. Unmatched models get a 404 (or go to `default_pool`).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from epp import resources

PROFILES = ("duplex", "buffered", "lean")
# The shipped default: the cheapest profile that keeps every feature (FailOpen works only here, and
# the response body crosses the picker only for the requests that need it). duplex is the reference's.
DEFAULT_PROFILE = "buffered"
ROUTINGS = ("original_dst", "override_host")
DEST_HEADER = "x-gateway-destination-endpoint"
SERVED_HEADER = "x-gateway-destination-endpoint-served"  # stamped by the router on the response
MODEL_HEADER = "x-gateway-model-name"
BASE_MODEL_HEADER = "x-gateway-base-model-name"
OBJECTIVE_HEADER = "x-gateway-inference-objective"
FAIRNESS_HEADER = "x-gateway-inference-fairness-id"
REWRITE_HEADER = "x-gateway-model-name-rewrite"
CONFORMANCE_HEADER = "test-epp-endpoint-selection"
# llm-d's names for the objective, fairness and rewrite headers (the picker reads both)
LLMD_OBJECTIVE_HEADER = "x-llm-d-inference-objective"
LLMD_FAIRNESS_HEADER = "x-llm-d-inference-fairness-id"
LLMD_REWRITE_HEADER = "x-llm-d-model-name-rewrite"
# Set only by the picker (or the router) for Envoy and the model servers: a client's copy would
# choose the destination (ORIGINAL_DST reads the header as given when the picker does not answer)
# or a disaggregated prefill/encode host or data-parallel rank. Removed at the edge in every generated config.
DP_HEADER = "x-data-parallel-host-port"  # set by data-parallel-profile-handler, read by the sidecar
CONTROL_HEADERS = (DEST_HEADER, SERVED_HEADER, "x-prefiller-host-port", "x-encoder-hosts-ports", DP_HEADER)
# Routed on in multi-pool configs (set by the body-based-routing callout): removed there.
ROUTING_HEADERS = (MODEL_HEADER, BASE_MODEL_HEADER)
# A client's choice of priority, fairness flow, target model or endpoint: removed at the edge unless
# allowed (`allow_client_headers`, for clients the operator trusts or a gateway that sets them).
CLIENT_HEADERS = (OBJECTIVE_HEADER, LLMD_OBJECTIVE_HEADER, FAIRNESS_HEADER, LLMD_FAIRNESS_HEADER, REWRITE_HEADER,
                  LLMD_REWRITE_HEADER, CONFORMANCE_HEADER)
LB_NAMESPACE = "envoy.lb"
EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
EPP_FILTER = "envoy.filters.http.ext_proc"  # the per-pool picker callout
BBR_FILTER = "envoy.filters.http.ext_proc.bbr"  # the body-based-routing callout (multi-pool)

_T = "type.googleapis.com/"
_HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_EXT_PROC = _T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_EXT_PROC_ROUTE = _T + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
_HEADER_MUTATION = _T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
_ROUTER = _T + "envoy.extensions.filters.http.router.v3.Router"
_HEALTH = _T + "envoy.extensions.filters.http.health_check.v3.HealthCheck"
_HTTP_OPTS = _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_PREVIOUS_HOSTS = _T + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
_OVERRIDE_HOST = _T + "envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost"
_LEAST_REQUEST = _T + "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest"
_MAX_CONN = _T + "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
_STDOUT_LOG = _T + "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
_BUFFER = _T + "envoy.extensions.filters.http.buffer.v3.Buffer"
_EARLY_MUTATION = _T + "envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation"

# processing_mode per profile (see the table above)
_MODES: dict[str, dict[str, str]] = {
    "duplex": {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "response_body_mode": "FULL_DUPLEX_STREAMED",
        "request_trailer_mode": "SEND",
        "response_trailer_mode": "SEND",
    },
    "buffered": {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        # STREAMED, not FULL_DUPLEX_STREAMED: Envoy holds the body until the response-headers reply,
        # whose mode_override switches it off for the requests that need nothing from it; an
        # unchanged chunk is answered with an empty reply (no copy back)
        "response_body_mode": "STREAMED",
        "request_trailer_mode": "SKIP",
        # with the body off, trailers SEND keep the stream open to the end (in-flight accounting)
        "response_trailer_mode": "SEND",
    },
    "lean": {
        "request_header_mode": "SEND",
        "response_header_mode": "SKIP",
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "response_body_mode": "NONE",
        "request_trailer_mode": "SEND",
        # trailers SEND keeps the ext_proc stream open until the exchange ends (HTTP/1 and most
        # HTTP/2 responses have no trailers, so no message is sent): in-flight accounting then lasts
        # to completion at no cost; with SKIP Envoy closes the stream right after the request
        "response_trailer_mode": "SEND",
    },
}

# Generous limits: every in-flight HTTP request holds one ext_proc stream and one upstream request,
# and Envoy's default circuit breakers (1024) would cap a busy gateway far below what it can carry.
_BREAKERS = {
    "thresholds": [
        {"priority": "DEFAULT", "max_connections": 100000, "max_pending_requests": 100000,
         "max_requests": 100000, "max_retries": 10000},
    ]
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What Envoy needs to know about one pool."""

    name: str
    target_ports: tuple[int, ...]
    namespace: str = "default"
    selector: Mapping[str, str] = field(default_factory=dict)  # documentation only: Envoy never sees pods
    picker: str = "127.0.0.1:9002"  # host:port of the pool's picker (ext_proc); replicas: a comma list
    failure_mode: str = "FailClose"  # FailOpen: requests pass when the picker fails
    app_protocol: str = "http"  # or kubernetes.io/h2c
    models: tuple[str, ...] = ()  # model names routed to this pool (multi-pool)
    endpoints: tuple[str, ...] = ()  # static ip:port list (override_host routing)
    endpoints_dns: str = ""  # name resolving to every pod IP, e.g. a headless Service (override_host)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("pool name is empty")
        if not self.target_ports:
            raise ValueError(f"pool {self.name}: no target ports")
        if self.failure_mode not in ("FailOpen", "FailClose"):
            raise ValueError(f"pool {self.name}: failure mode must be FailOpen or FailClose")
        if self.app_protocol not in ("http", "kubernetes.io/h2c"):
            raise ValueError(f"pool {self.name}: appProtocol must be http or kubernetes.io/h2c")
        for addr in self.picker.split(","):
            split_address(addr.strip())
        for ep in self.endpoints:
            split_address(ep)

    @classmethod
    def from_pool(
        cls,
        pool: resources.InferencePool,
        picker: str | None = None,
        models: Iterable[str] = (),
        endpoints: Iterable[str] = (),
        endpoints_dns: str = "",
    ) -> PoolSpec:
        """A PoolSpec from a parsed InferencePool. Without `picker`, the pool's endpointPickerRef
        Service is used (`name.namespace.svc:port`, as a gateway would); without either, 127.0.0.1:9002."""
        ref = pool.picker
        if picker is None:
            picker = f"{ref.name}.{pool.meta.namespace}.svc:{ref.port}" if ref else "127.0.0.1:9002"
        return cls(
            name=pool.meta.name,
            namespace=pool.meta.namespace,
            target_ports=tuple(pool.target_ports),
            selector=dict(pool.selector),
            picker=picker,
            failure_mode=ref.failure_mode if ref else "FailClose",
            app_protocol=pool.app_protocol,
            models=tuple(models),
            endpoints=tuple(endpoints),
            endpoints_dns=endpoints_dns,
        )

    @property
    def key(self) -> str:
        """A name safe for Envoy cluster and stat names."""
        return f"{self.namespace}.{self.name}"


def split_address(addr: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); ValueError naming the problem."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid address {addr!r}: expected host:port")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def _http2_options(max_streams: int | None = None) -> dict[str, Any]:
    h2: dict[str, Any] = {} if max_streams is None else {"max_concurrent_streams": max_streams}
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": _HTTP_OPTS,
            "explicit_http_config": {"http2_protocol_options": h2},
        }
    }


# Requests per HTTP/2 connection to a picker: past it Envoy opens another connection, so a reset
# connection (Envoy's flood protection, a picker fault) fails at most this many requests at once
# (measured: with 2 the tiny-frame flood of docs/security.md spared all 6 victims on other connections).
PICKER_STREAMS_PER_CONNECTION = 100


@dataclass(frozen=True, slots=True)
class PickerTLS:
    """How Envoy checks the pickers it calls: with `ca_file`, their certificate must chain to that CA
    and carry one of `sans` (default: the picker's host); with `cert_file`/`key_file`, Envoy also
    presents a client certificate (mTLS). Without a CA the connection is encrypted, not verified
    (the picker's certificate is self-signed by default)."""

    ca_file: str = ""
    sans: tuple[str, ...] = ()
    cert_file: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a picker client certificate needs both the certificate and the key file")
        if self.cert_file and not self.ca_file:
            raise ValueError("a picker client certificate (mTLS) needs the picker's CA too: without it "
                             "Envoy would present its certificate to whoever answers")
        if self.sans and not self.ca_file:
            raise ValueError("picker SANs need the picker's CA file")

    def context(self, host: str) -> dict[str, Any]:
        """The `common_tls_context` for a picker at `host`."""
        ctx: dict[str, Any] = {"alpn_protocols": ["h2"]}
        if not self.ca_file:
            # empty validation context: encrypt, but accept the picker's self-signed certificate
            ctx["validation_context"] = {}
        else:
            sans = self.sans or (host,)
            ctx["validation_context"] = {
                "trusted_ca": {"filename": self.ca_file},
                "match_typed_subject_alt_names": [
                    {"san_type": "IP_ADDRESS" if _is_ip(san) else "DNS", "matcher": {"exact": san}} for san in sans
                ],
            }
        if self.cert_file:
            ctx["tls_certificates"] = [
                {"certificate_chain": {"filename": self.cert_file}, "private_key": {"filename": self.key_file}}
            ]
        return ctx


def picker_cluster(name: str, address: str, tls: bool | PickerTLS) -> dict[str, Any]:
    """The cluster of one picker: HTTP/2 (gRPC), TLS (verified when `tls` names a CA, see
    PickerTLS) or plaintext, and a gRPC health check on the ext_proc service name. `address` may
    list several replicas (`host:port,host:port`): each ext_proc stream goes to one of them, round
    robin (active-active replicas, docs/precise-prefix.md)."""
    hosts = [split_address(a.strip()) for a in address.split(",") if a.strip()]
    host = hosts[0][0]
    static = all(_is_ip(h) for h, _ in hosts)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if static else "STRICT_DNS",
        "connect_timeout": "5s",
        "typed_extension_protocol_options": _http2_options(PICKER_STREAMS_PER_CONNECTION),
        "circuit_breakers": _BREAKERS,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(h, p)}} for h, p in hosts]}],
        },
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "2s",
                "no_traffic_interval": "5s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": EXTPROC_SERVICE},
            }
        ],
    }
    if not static:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if tls:
        settings = tls if isinstance(tls, PickerTLS) else PickerTLS()
        tls_ctx: dict[str, Any] = {"@type": _TLS, "common_tls_context": settings.context(host)}
        if not _is_ip(host):
            tls_ctx["sni"] = host
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls_ctx}
    return cluster


def pool_cluster(pool: PoolSpec, routing: str) -> dict[str, Any]:
    """The cluster requests of one pool are forwarded through, honouring the picker's choice."""
    name = f"pool.{pool.key}"
    cluster: dict[str, Any] = {"name": name, "connect_timeout": "5s", "circuit_breakers": _BREAKERS}
    if pool.app_protocol == "kubernetes.io/h2c":
        cluster["typed_extension_protocol_options"] = _http2_options()
    if routing == "original_dst":
        cluster.update(
            {
                "type": "ORIGINAL_DST",
                "lb_policy": "CLUSTER_PROVIDED",
                "original_dst_lb_config": {"use_http_header": True, "http_header_name": DEST_HEADER},
            }
        )
        return cluster
    if pool.endpoints:
        lb_endpoints = [{"endpoint": {"address": _socket(*split_address(ep))}} for ep in pool.endpoints]
        cluster["type"] = "STATIC"
    elif pool.endpoints_dns:
        lb_endpoints = [{"endpoint": {"address": _socket(pool.endpoints_dns, port)}} for port in pool.target_ports]
        cluster["type"] = "STRICT_DNS"
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    else:
        raise ValueError(
            f"pool {pool.name}: override_host routing needs the pool's endpoints "
            "(static endpoints or a DNS name such as a headless Service)"
        )
    cluster["load_assignment"] = {"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}]}
    cluster["load_balancing_policy"] = {
        "policies": [
            {
                "typed_extension_config": {
                    "name": "envoy.load_balancing_policies.override_host",
                    "typed_config": {
                        "@type": _OVERRIDE_HOST,
                        "override_host_sources": [
                            {"header": DEST_HEADER},
                            {"metadata": {"key": LB_NAMESPACE, "path": [{"key": DEST_HEADER}]}},
                        ],
                        "fallback_policy": {
                            "policies": [
                                {
                                    "typed_extension_config": {
                                        "name": "envoy.load_balancing_policies.least_request",
                                        "typed_config": {"@type": _LEAST_REQUEST},
                                    }
                                }
                            ]
                        },
                    },
                }
            }
        ]
    }
    return cluster


def _ext_proc(
    cluster: str, modes: Mapping[str, str], fail_open: bool, message_timeout_s: float, lb_metadata: bool = True
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": _EXT_PROC,
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
        "processing_mode": dict(modes),
        "failure_mode_allow": fail_open,
        # the picker drops the response body per request (epp.extproc); Envoy 1.40 honours that only
        # when the request body is not FULL_DUPLEX_STREAMED, so the other profiles stay as shipped
        "allow_mode_override": modes.get("response_body_mode") == "STREAMED",
        "message_timeout": _duration(message_timeout_s),
    }
    if lb_metadata:
        # without this Envoy drops the picker's envoy.lb metadata before the load balancer sees it
        config["metadata_options"] = {"receiving_namespaces": {"untyped": [LB_NAMESPACE]}}
    return config


def _bbr_modes(profile: str) -> dict[str, str]:
    """The body-based-routing callout reads the request body only."""
    body = "BUFFERED" if profile == "buffered" else "FULL_DUPLEX_STREAMED"
    return {
        "request_header_mode": "SEND",
        "response_header_mode": "SKIP",
        "request_body_mode": body,
        "response_body_mode": "NONE",
        "request_trailer_mode": "SEND" if body == "FULL_DUPLEX_STREAMED" else "SKIP",
        "response_trailer_mode": "SKIP",
    }


def _route_action(pool: PoolSpec, routing: str, retries: int, route_timeout_s: float) -> dict[str, Any]:
    retry: dict[str, Any] = {
        # before any response byte: a dead or refusing pod is retried (on the next endpoint of the
        # picker's list with override_host); never after the response started
        "retry_on": "connect-failure,refused-stream,reset",
        "num_retries": retries,
    }
    if routing == "override_host":
        retry["retry_host_predicate"] = [
            {"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {"@type": _PREVIOUS_HOSTS}}
        ]
        retry["host_selection_retry_max_attempts"] = 3
    action: dict[str, Any] = {"cluster": f"pool.{pool.key}", "timeout": _duration(route_timeout_s)}
    if retries > 0:
        action["retry_policy"] = retry
    return action


def _per_route_picker(pool: PoolSpec) -> dict[str, Any]:
    return {
        EPP_FILTER: {
            "@type": _EXT_PROC_ROUTE,
            "overrides": {
                "grpc_service": {"envoy_grpc": {"cluster_name": f"epp.{pool.key}"}},
                "failure_mode_allow": pool.failure_mode == "FailOpen",
            },
        }
    }


def bootstrap(
    pools: Sequence[PoolSpec],
    profile: str = DEFAULT_PROFILE,
    routing: str = "original_dst",
    *,
    listen_address: str = "0.0.0.0",
    listen_port: int = 8081,
    admin_address: str = "127.0.0.1",
    admin_port: int = 9901,
    health_port: int | None = None,
    picker_tls: bool | PickerTLS = True,
    bbr_picker: str | None = None,
    bbr_failure_open: bool = False,
    default_pool: str | None = None,
    message_timeout_s: float = 120.0,
    route_timeout_s: float = 0.0,
    stream_idle_timeout_s: float = 600.0,
    request_timeout_s: float = 300.0,
    request_headers_timeout_s: float = 10.0,
    idle_timeout_s: float = 300.0,
    max_request_headers_kb: int = 60,
    retries: int = 2,
    buffer_limit_bytes: int = 16 * 1024 * 1024,
    max_downstream_connections: int = 50000,
    allow_client_headers: Iterable[str] = (),
    access_log: bool = False,
) -> dict[str, Any]:
    """A complete Envoy v3 bootstrap routing OpenAI requests to `pools` through their pickers.

    One pool: every request goes to it. Several pools: `bbr_picker` (a picker in body-based-routing
    mode) must be given; it sets X-Gateway-Model-Name, and each pool's `models` select its route.

    Hardening (docs/security.md): the picker's control headers (CONTROL_HEADERS, and in multi-pool
    configs ROUTING_HEADERS) are removed from every request before any filter runs, and so are the
    client-choice headers (CLIENT_HEADERS) not named in `allow_client_headers`; a request body is
    coalesced (at most `buffer_limit_bytes`, else 413) before it reaches a FULL_DUPLEX_STREAMED
    callout, so it costs the picker one message however many frames it came in; the admin endpoint
    must be on a loopback address; FailOpen is refused where it cannot fail open.
    Timeouts suit long generations: no route timeout by default (0 = disabled), a stream idle timeout
    of minutes, `request_timeout_s` for the upload (Envoy disarms it once the request is sent upstream
    or the response starts), `request_headers_timeout_s` for the headers, `idle_timeout_s` for idle
    connections; the ext_proc message timeout bounds each wait for the picker (it may queue requests).
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: expected one of {', '.join(PROFILES)}")
    routing = routing.replace("-", "_")
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}: expected one of {', '.join(ROUTINGS)}")
    if not pools:
        raise ValueError("no pools")
    keys = [p.key for p in pools]
    if len(set(keys)) != len(keys):
        raise ValueError("pools must have distinct namespace/name")
    multi = len(pools) > 1
    if multi and bbr_picker is None:
        raise ValueError("several pools need a body-based-routing picker (bbr_picker) to choose between them")
    by_name = {p.name: p for p in pools}
    if default_pool is not None and default_pool not in by_name:
        raise ValueError(f"default pool {default_pool!r} is not one of the pools")
    if retries < 0:
        raise ValueError("retries must not be negative")
    if multi:
        for p in pools:
            if not p.models and p.name != default_pool:
                raise ValueError(f"pool {p.name}: no model names route to it (give it models, or make it the default)")
    problems = fail_open_problems(pools, profile, routing)
    if problems:
        raise ValueError("; ".join(problems))
    if not _is_loopback(admin_address):
        raise ValueError(f"admin address {admin_address!r}: Envoy's admin interface must listen on a loopback "
                         "address (it can read the config and shut Envoy down)")
    for t in (message_timeout_s, route_timeout_s, stream_idle_timeout_s, request_timeout_s,
              request_headers_timeout_s, idle_timeout_s):
        if t < 0:
            raise ValueError("timeouts must not be negative")
    if not 1 <= max_request_headers_kb <= 8192:
        raise ValueError("max_request_headers_kb must be 1..8192")
    if buffer_limit_bytes < 1024:
        raise ValueError("buffer_limit_bytes must be at least 1024")
    allowed = {h.lower() for h in allow_client_headers}
    unknown = allowed - set(CLIENT_HEADERS)
    if unknown:
        raise ValueError(f"unknown client header(s) {', '.join(sorted(unknown))}: "
                         f"expected some of {', '.join(CLIENT_HEADERS)}")
    stripped = [*CONTROL_HEADERS, *(ROUTING_HEADERS if multi else ()),
                *(h for h in CLIENT_HEADERS if h not in allowed)]

    modes = _MODES[profile]
    first = pools[0]
    filters: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    if modes["request_body_mode"] == "FULL_DUPLEX_STREAMED" or (bbr_picker is not None and profile != "buffered"):
        # A streamed callout gets one message per body chunk Envoy reads: a body sent as 100k tiny
        # HTTP/2 frames became 100k messages, flooded the one HTTP/2 connection to the picker and
        # Envoy reset it with every request on it. The picker waits for the whole body before it
        # picks anyway, so coalescing it here costs no latency and bounds it (413 above the limit).
        filters.append({"name": "envoy.filters.http.buffer",
                        "typed_config": {"@type": _BUFFER, "max_request_bytes": buffer_limit_bytes}})
    if bbr_picker is not None:
        filters.append(
            {
                "name": BBR_FILTER,
                "typed_config": _ext_proc(
                    "bbr", _bbr_modes(profile), bbr_failure_open, message_timeout_s, lb_metadata=False
                ),
            }
        )
        clusters.append(picker_cluster("bbr", bbr_picker, picker_tls))
    filters.append(
        {
            "name": EPP_FILTER,
            "typed_config": _ext_proc(f"epp.{first.key}", modes, first.failure_mode == "FailOpen", message_timeout_s),
        }
    )
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}})

    # Envoy 1.40 reports no served endpoint to ext_proc; the router can stamp the upstream it really
    # used (a fallback after a retry) on the response, where the picker reads and removes it
    served = ({"response_headers_to_add": [{"header": {"key": SERVED_HEADER, "value": "%UPSTREAM_REMOTE_ADDRESS%"},
                                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}
              if modes["response_header_mode"] == "SEND" else {})
    if served and modes["response_body_mode"] == "STREAMED":
        # buffered: the picker may tell Envoy to skip a request's response headers (mode_override on
        # the request-headers reply), so it never sees the stamp to remove it; this filter, first in
        # the chain and so last on the response path (after the picker's), removes it for every
        # response: clients never see pod addresses
        filters.insert(0, {"name": "envoy.filters.http.header_mutation",
                           "typed_config": {"@type": _HEADER_MUTATION,
                                            "mutations": {"response_mutations": [{"remove": SERVED_HEADER}]}}})
    routes: list[dict[str, Any]] = []
    for pool in pools:
        clusters.append(picker_cluster(f"epp.{pool.key}", pool.picker, picker_tls))
        clusters.append(pool_cluster(pool, routing))
        action = _route_action(pool, routing, retries, route_timeout_s)
        if not multi:
            continue
        for model in pool.models:
            routes.append(
                {
                    "name": f"{pool.key}/{model}",
                    "match": {"prefix": "/", "headers": [{"name": MODEL_HEADER, "string_match": {"exact": model}}]},
                    "route": action,
                    "typed_per_filter_config": _per_route_picker(pool),
                    **served,
                }
            )
    if not multi:
        routes.append(
            {
                "name": first.key,
                "match": {"prefix": "/"},
                "route": _route_action(first, routing, retries, route_timeout_s),
                **served,
            }
        )
    elif default_pool is not None:
        pool = by_name[default_pool]
        routes.append(
            {
                "name": f"{pool.key}/default",
                "match": {"prefix": "/"},
                "route": _route_action(pool, routing, retries, route_timeout_s),
                "typed_per_filter_config": _per_route_picker(pool),
                **served,
            }
        )
    else:
        routes.append(
            {
                "name": "no-pool",
                "match": {"prefix": "/"},
                "direct_response": {
                    "status": 404,
                    "body": {"inline_string": "inference error: NotFound - no InferencePool serves this model"},
                },
                # no pool: do not call any picker
                "typed_per_filter_config": {EPP_FILTER: {"@type": _EXT_PROC_ROUTE, "disabled": True}},
            }
        )

    hcm: dict[str, Any] = {
        "@type": _HCM,
        "stat_prefix": "inference",
        "codec_type": "AUTO",
        # the upload (disarmed once the request is upstream or the response starts: generations
        # may run long), the headers, and idle connections are all bounded
        "request_timeout": _duration(request_timeout_s),
        "request_headers_timeout": _duration(request_headers_timeout_s),
        "stream_idle_timeout": _duration(stream_idle_timeout_s),
        "max_request_headers_kb": max_request_headers_kb,
        "common_http_protocol_options": {
            "idle_timeout": _duration(idle_timeout_s),
            "max_headers_count": 100,
            # x_gateway_destination_endpoint must not reach a server that folds _ into -
            "headers_with_underscores_action": "DROP_HEADER",
        },
        "http2_protocol_options": {
            "max_concurrent_streams": 100,
            "initial_stream_window_size": 1 << 20,
            "initial_connection_window_size": 16 << 20,
        },
        # before route selection and every filter: what only the picker may set, and client
        # choices the operator did not allow (docs/security.md lists them)
        "early_header_mutation_extensions": [
            {
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": {"@type": _EARLY_MUTATION, "mutations": [{"remove": h} for h in stripped]},
            }
        ],
        "route_config": {
            "name": "inference",
            "virtual_hosts": [{"name": "inference", "domains": ["*"], "routes": routes}],
        },
        "http_filters": filters,
    }
    if access_log:
        hcm["access_log"] = [{"name": "envoy.access_loggers.stdout", "typed_config": {"@type": _STDOUT_LOG}}]
    listeners: list[dict[str, Any]] = [
        {
            "name": "inference",
            "address": _socket(listen_address, listen_port),
            # BUFFERED bodies and retried requests are held in this buffer
            "per_connection_buffer_limit_bytes": buffer_limit_bytes,
            "filter_chains": [
                {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
            ],
        }
    ]
    if health_port is not None:
        listeners.append(_health_listener(listen_address, health_port))

    return {
        "node": {"id": f"epp-envoy-{first.key}", "cluster": "epp-envoy"},
        "admin": {"address": _socket(admin_address, admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _MAX_CONN,
                        "max_active_downstream_connections": max_downstream_connections,
                    },
                }
            ]
        },
    }


def _health_listener(address: str, port: int) -> dict[str, Any]:
    """GET /ready -> 200 while Envoy serves (503 once it drains): a probe target that does not
    expose the admin interface."""
    hcm = {
        "@type": _HCM,
        "stat_prefix": "health",
        "route_config": {
            "name": "health",
            "virtual_hosts": [
                {
                    "name": "health",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.health_check",
                "typed_config": {
                    "@type": _HEALTH,
                    "pass_through_mode": False,
                    "headers": [{"name": ":path", "string_match": {"exact": "/ready"}}],
                },
            },
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
        ],
    }
    return {
        "name": "health",
        "address": _socket(address, port),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def dumps(config: Mapping[str, Any], fmt: str = "yaml") -> str:
    """The bootstrap as text: YAML (what the charts embed) or JSON."""
    if fmt == "json":
        return json.dumps(config, indent=2) + "\n"
    if fmt != "yaml":
        raise ValueError(f"unknown format {fmt!r}")
    return yaml.dump(dict(config), Dumper=_Dumper, sort_keys=False, width=120)


class _Dumper(yaml.SafeDumper):
    """Writes shared sub-objects out in full: anchors and aliases confuse readers of the config."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


# ---- command line -------------------------------------------------------------------------------


def _pools_from_args(a: argparse.Namespace) -> list[PoolSpec]:
    pickers: dict[str, str] = {}
    default_picker: str | None = None
    for item in a.picker or []:
        pool_name, sep, addr = item.rpartition("=")
        if sep:
            pickers[pool_name] = addr
        else:
            default_picker = addr
    models: dict[str, list[str]] = {}
    for item in a.pool_models or []:
        pool_name, sep, names = item.partition("=")
        if not sep:
            raise ValueError(f"--pool-models {item!r}: expected POOL=MODEL[,MODEL...]")
        models.setdefault(pool_name, []).extend(n.strip() for n in names.split(",") if n.strip())
    endpoints = [e.strip() for e in (a.endpoints or "").split(",") if e.strip()]

    pools: list[resources.InferencePool] = []
    extra_models: dict[str, list[str]] = {}
    for path in a.pool_file or []:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for i, doc in enumerate(docs):
            if not resources.is_known(doc) or doc.get("kind") == "Pod":
                continue
            obj = resources.parse_object(doc, a.pool_namespace, seq=i)
            if isinstance(obj, resources.InferencePool):
                pools.append(obj)
            elif isinstance(obj, resources.InferenceModel):
                extra_models.setdefault(obj.pool_ref.name, []).append(obj.model_name)
            elif isinstance(obj, resources.InferenceModelRewrite):
                for rule in obj.rules:
                    extra_models.setdefault(obj.pool_ref.name, []).extend(rule.matches)
    if a.pool_name and not a.pool_file:
        if not a.endpoint_selector or not a.endpoint_target_ports:
            raise ValueError("--pool-name needs --endpoint-selector and --endpoint-target-ports (or use --pool-file)")
        selector = resources.parse_selector(a.endpoint_selector)
        ports = [int(p) for p in a.endpoint_target_ports.split(",") if p.strip()]
        pools.append(resources.pool_from_flags(a.pool_name, a.pool_namespace, selector, ports))
    elif a.pool_name:
        pools = [p for p in pools if p.meta.name == a.pool_name]
    if not pools:
        raise ValueError("no InferencePool: give --pool-file, or --pool-name with --endpoint-selector")

    out = []
    for pool in pools:
        name = pool.meta.name
        picker = pickers.get(name, default_picker)
        if picker is None and not a.picker_from_ref:
            if len(pools) > 1:
                raise ValueError(f"pool {name}: give --picker {name}=HOST:PORT (several pools)")
            picker = "127.0.0.1:9002"
        spec = PoolSpec.from_pool(
            pool,
            picker=picker,
            models=dict.fromkeys(models.get(name, []) + extra_models.get(name, [])),
            endpoints=endpoints if len(pools) == 1 else (),
            endpoints_dns=a.endpoints_dns or "",
        )
        if a.failure_mode:
            spec = dataclasses.replace(spec, failure_mode=a.failure_mode)
        out.append(spec)
    return out


def build_parser() -> argparse.ArgumentParser:
    """Flags of `python -m epp envoy-config`."""
    p = argparse.ArgumentParser(
        prog="epp envoy-config",
        description="Write an Envoy bootstrap that routes OpenAI requests to InferencePools through their "
        "endpoint pickers (ext_proc).",
    )
    src = p.add_argument_group("pool")
    src.add_argument(
        "--pool-file",
        action="append",
        metavar="PATH",
        help="YAML with InferencePool objects (and optionally InferenceModel/InferenceModelRewrite, "
        "whose model names route to their pool); repeatable",
    )
    src.add_argument("--pool-name", default="", help="pool name (with --endpoint-selector), or which pool of the files")
    src.add_argument("--pool-namespace", default="default", help="namespace (default %(default)s)")
    src.add_argument("--endpoint-selector", default="", metavar="K=V,...", help="pod labels of a pool from flags")
    src.add_argument(
        "--endpoint-target-ports", default="", metavar="PORT,...", help="target ports of a pool from flags"
    )
    src.add_argument(
        "--picker",
        action="append",
        metavar="[POOL=]HOST:PORT",
        help="picker address, per pool with POOL= (default 127.0.0.1:9002 for one pool); several "
             "active-active replicas as HOST:PORT,HOST:PORT (each request goes to one, round robin)",
    )
    src.add_argument(
        "--picker-from-ref",
        action="store_true",
        help="use each pool's endpointPickerRef Service (name.namespace.svc:port) as its picker",
    )
    src.add_argument(
        "--pool-models",
        action="append",
        metavar="POOL=MODEL,...",
        help="model names routed to POOL (several pools); repeatable",
    )
    src.add_argument(
        "--failure-mode", choices=["FailOpen", "FailClose"], default="", help="override the pool's failureMode"
    )
    src.add_argument("--endpoints", default="", metavar="IP:PORT,...", help="static endpoints (override-host routing)")
    src.add_argument(
        "--endpoints-dns",
        default="",
        metavar="NAME",
        help="DNS name resolving to the pool's pod IPs, e.g. a headless Service (override-host routing)",
    )
    env = p.add_argument_group("envoy")
    env.add_argument("--profile", choices=PROFILES, default=DEFAULT_PROFILE,
                     help="processing profile (default %(default)s; duplex is the reference's)")
    env.add_argument(
        "--routing",
        choices=["original-dst", "override-host"],
        default="original-dst",
        help="how Envoy honours the pick (default %(default)s)",
    )
    env.add_argument("--listen-address", default="0.0.0.0")
    env.add_argument("--listen-port", type=int, default=8081, help="(default %(default)s)")
    env.add_argument("--admin-address", default="127.0.0.1")
    env.add_argument("--admin-port", type=int, default=9901, help="(default %(default)s)")
    env.add_argument("--health-port", type=int, default=None, help="serve GET /ready on this port")
    env.add_argument(
        "--picker-tls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TLS to the pickers (default on); the certificate is verified only with --epp-ca-file",
    )
    env.add_argument("--epp-ca-file", default="", metavar="PATH",
                     help="CA bundle (in Envoy's filesystem) the pickers' certificates must chain to")
    env.add_argument("--epp-san", action="append", metavar="NAME",
                     help="subject alt name (DNS name or IP) the picker's certificate must carry; repeatable "
                          "(default: the picker's host)")
    env.add_argument("--epp-client-cert", default="", metavar="PATH",
                     help="client certificate Envoy presents to the pickers (mTLS; with --epp-client-key)")
    env.add_argument("--epp-client-key", default="", metavar="PATH", help="its private key")
    env.add_argument(
        "--allow-client-header",
        action="append",
        choices=CLIENT_HEADERS,
        metavar="NAME",
        help="let a client-choice header through to the picker (removed at the edge otherwise): "
        f"{', '.join(CLIENT_HEADERS)}; repeatable",
    )
    env.add_argument(
        "--bbr-picker",
        default=None,
        metavar="HOST:PORT",
        help="picker in body-based-routing mode (required with several pools)",
    )
    env.add_argument("--default-pool", default=None, help="pool for models no route matches (several pools)")
    env.add_argument("--message-timeout", type=float, default=120.0, metavar="SECONDS",
                     help="longest wait for one picker reply; keep it above the picker's flow-control queue TTL "
                          "(default %(default)s)")
    env.add_argument("--route-timeout", type=float, default=0.0, metavar="SECONDS", help="0 disables (default)")
    env.add_argument("--stream-idle-timeout", type=float, default=600.0, metavar="SECONDS",
                     help="(default %(default)s)")
    env.add_argument("--request-timeout", type=float, default=300.0, metavar="SECONDS",
                     help="longest request upload, until it is sent upstream or the response starts; 0 disables "
                          "(default %(default)s)")
    env.add_argument("--request-headers-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="(default %(default)s)")
    env.add_argument("--idle-timeout", type=float, default=300.0, metavar="SECONDS",
                     help="close client connections idle this long (default %(default)s)")
    env.add_argument("--max-request-headers-kb", type=int, default=60, metavar="KB", help="(default %(default)s)")
    env.add_argument("--max-request-bytes", type=int, default=16 * 1024 * 1024, metavar="BYTES",
                     help="largest request body; larger gets 413 (default %(default)s)")
    env.add_argument("--retries", type=int, default=2)
    env.add_argument("--access-log", action="store_true", help="log every request to stdout")
    out = p.add_argument_group("output")
    out.add_argument("--output", "-o", default="-", metavar="FILE", help="default stdout")
    out.add_argument("--format", choices=["yaml", "json"], default="yaml")
    return p


def fail_open_problems(pools: Sequence[PoolSpec], profile: str, routing: str) -> list[str]:
    """Why FailOpen cannot fail open with this profile and routing (measured on Envoy 1.40, see
    docs/envoy-profiles.md): a streamed request body is already on its way to the dead picker when
    Envoy notices, and ORIGINAL_DST has no destination without the picker's header (before the
    edge stripped it, a client's own header became the destination). `bootstrap` refuses these."""
    routing = routing.replace("-", "_")
    out = []
    for pool in pools:
        if pool.failure_mode != "FailOpen":
            continue
        if profile != "buffered":
            out.append(f"pool {pool.name}: FailOpen needs the buffered profile; with {profile} Envoy answers 500 "
                       "while the picker is down")
        if routing != "override_host":
            out.append(f"pool {pool.name}: FailOpen needs override_host routing; with {routing} a request without "
                       "the picker's header has no safe destination")
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _picker_tls(a: argparse.Namespace) -> bool | PickerTLS:
    verify = a.epp_ca_file or a.epp_san or a.epp_client_cert or a.epp_client_key
    if not verify:
        return bool(a.picker_tls)
    if not a.picker_tls:
        raise ValueError("--epp-ca-file, --epp-san and --epp-client-* need TLS to the pickers (drop --no-picker-tls)")
    return PickerTLS(ca_file=a.epp_ca_file, sans=tuple(a.epp_san or ()), cert_file=a.epp_client_cert,
                     key_file=a.epp_client_key)


def main(argv: list[str]) -> int:
    """`python -m epp envoy-config ...`: write the bootstrap; 2 on bad input."""
    p = build_parser()
    a = p.parse_args(argv)
    try:
        pools = _pools_from_args(a)
        config = bootstrap(
            pools,
            profile=a.profile,
            routing=a.routing,
            listen_address=a.listen_address,
            listen_port=a.listen_port,
            admin_address=a.admin_address,
            admin_port=a.admin_port,
            health_port=a.health_port,
            picker_tls=_picker_tls(a),
            bbr_picker=a.bbr_picker,
            default_pool=a.default_pool,
            message_timeout_s=a.message_timeout,
            route_timeout_s=a.route_timeout,
            stream_idle_timeout_s=a.stream_idle_timeout,
            request_timeout_s=a.request_timeout,
            request_headers_timeout_s=a.request_headers_timeout,
            idle_timeout_s=a.idle_timeout,
            max_request_headers_kb=a.max_request_headers_kb,
            buffer_limit_bytes=a.max_request_bytes,
            allow_client_headers=a.allow_client_header or (),
            retries=a.retries,
            access_log=a.access_log,
        )
    except (ValueError, OSError, resources.ResourceError) as e:
        print(f"epp envoy-config: error: {e}", file=sys.stderr)
        return 2
    text = dumps(config, a.format)
    if a.output == "-":
        sys.stdout.write(text)
    else:
        with open(a.output, "w") as f:
            f.write(text)
    return 0

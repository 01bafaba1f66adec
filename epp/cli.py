"""Command-line flags: the reference picker's names and defaults, plus the no-cluster mode.

Boolean flags take `--flag`, `--flag=true|false` (the form the reference's charts pass) and
`--flag false`. Durations take Go-style values (`50ms`, `5s`, `1m30s`) or plain seconds.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from typing import Any

from epp import __version__
from epp.resources import GROUP_V1, GROUP_X, parse_selector

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from `250ms`, `2s`, `1m30s` or `0.05`."""
    t = text.strip()
    try:
        value = float(t)
    except ValueError:
        pos, total = 0, 0.0
        for m in _DURATION.finditer(t):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(t) or not t:
            raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use e.g. 50ms, 5s, 1m)") from None
        return total
    if value < 0:
        raise argparse.ArgumentTypeError(f"duration must not be negative: {text!r}")
    return value


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "yes", "on", "t"):
        return True
    if t in ("false", "0", "no", "off", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {v}")
    return v


def _ports(text: str) -> list[int]:
    ports = [_port(p) for p in text.split(",") if p.strip()]
    if not ports or any(p == 0 for p in ports):
        raise argparse.ArgumentTypeError(f"expected a list of ports 1-65535, got {text!r}")
    return ports


def _endpoints(text: str) -> list[str]:
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise argparse.ArgumentTypeError(f"invalid endpoint {part!r}: expected ip:port")
        out.append(part)
    if not out:
        raise argparse.ArgumentTypeError("no endpoints given")
    return out


def _selector(text: str) -> dict[str, str]:
    try:
        return parse_selector(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _base_models(text: str) -> dict[str, str]:
    from epp.bbr import parse_base_models

    try:
        return parse_base_models(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


@dataclass(slots=True)
class Options:
    """Everything the server needs, parsed and validated."""

    pool_name: str = ""
    pool_namespace: str = "default"
    pool_group: str = GROUP_V1
    grpc_port: int = 9002
    grpc_health_port: int = 9003
    metrics_port: int = 9090
    secure_serving: bool = True
    cert_path: str = ""
    enable_cert_reload: bool = False
    config_file: str = ""
    config_text: str = ""
    refresh_metrics_interval: float = 0.05
    refresh_prometheus_metrics_interval: float = 5.0
    metrics_staleness_threshold: float = 2.0
    ha_enable_leader_election: bool = False
    endpoint_selector: dict[str, str] = field(default_factory=dict)
    endpoint_target_ports: list[int] = field(default_factory=list)
    kubeconfig: str = ""
    manifests: list[str] = field(default_factory=list)
    endpoints: list[str] = field(default_factory=list)
    max_request_body_bytes: int = 16 * 1024 * 1024
    default_body_mode: str = "duplex"
    shutdown_grace: float = 30.0
    log_level: str = "info"
    log_format: str = "json"
    bind_address: str = "0.0.0.0"
    mode: str = "epp"
    event_loop: str = "auto"
    base_models: dict[str, str] = field(default_factory=dict)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="epp",
        description=(
            "Endpoint picker for an InferencePool: an Envoy ext_proc server that chooses the model-server "
            "pod for each OpenAI request. Watches the pool in Kubernetes, or reads the same objects from "
            "--manifests files (no cluster needed)."
        ),
        epilog=(
            "Subcommands: `epp envoy-config --help` writes an Envoy bootstrap for a pool. "
            "Examples: epp --pool-name my-pool --pool-namespace prod;  "
            "epp --pool-name demo --manifests deploy/examples/no-cluster.yaml --secure-serving=false"
        ),
    )
    B: dict[str, Any] = dict(nargs="?", const=True, type=parse_bool, metavar="BOOL")
    pool = p.add_argument_group("pool")
    pool.add_argument("--pool-name", default="", help="name of the InferencePool this picker serves (required)")
    pool.add_argument("--pool-namespace", default=os.environ.get("NAMESPACE", "default"),
                      help="namespace of the pool (env NAMESPACE; default %(default)s)")
    pool.add_argument("--pool-group", default=GROUP_V1, choices=[GROUP_V1, GROUP_X],
                      help="API group of the InferencePool (default %(default)s)")
    pool.add_argument("--endpoint-selector", type=_selector, default={}, metavar="K=V,...",
                      help="select pods by labels instead of reading an InferencePool object")
    pool.add_argument("--endpoint-target-ports", type=_ports, default=[], metavar="PORT,...",
                      help="target ports with --endpoint-selector")
    pool.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", ""),
                      help="kubeconfig file (default: in-cluster config, or env KUBECONFIG)")
    pool.add_argument("--manifests", action="append", default=[], metavar="PATH",
                      help="no-cluster mode: read InferencePool/InferenceModel/InferenceModelRewrite/"
                           "InferenceObjective/Pod objects from a YAML file or directory (repeatable); "
                           "edits take effect without a restart")
    pool.add_argument("--endpoints", type=_endpoints, default=[], metavar="IP:PORT,...",
                      help="no-cluster mode: model-server endpoints of the pool")

    srv = p.add_argument_group("serving")
    srv.add_argument("--grpc-port", type=_port, default=9002, help="ext_proc gRPC port (default %(default)s)")
    srv.add_argument("--grpc-health-port", type=_port, default=9003, help="gRPC health port (default %(default)s)")
    srv.add_argument("--metrics-port", type=_port, default=9090, help="Prometheus /metrics port (default %(default)s)")
    srv.add_argument("--bind-address", default="0.0.0.0", help="address to listen on (default %(default)s)")
    srv.add_argument("--secure-serving", default=True, **B,
                     help="serve ext_proc over TLS (default true; self-signed unless --cert-path has a pair)")
    srv.add_argument("--cert-path", default="", help="directory holding tls.crt and tls.key")
    srv.add_argument("--enable-cert-reload", default=False, **B, help="reload the certificate when the files change")
    srv.add_argument("--ha-enable-leader-election", default=False, **B,
                     help="run several replicas; readiness is SERVING only on the leader")
    srv.add_argument("--max-request-body-bytes", type=_positive_int, default=16 * 1024 * 1024,
                     help="larger request bodies are answered with 413 (default %(default)s)")
    srv.add_argument("--default-body-mode", choices=["duplex", "buffered"], default="duplex",
                     help="request body mode assumed when Envoy does not send protocol_config (default %(default)s)")
    srv.add_argument("--event-loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                     help="auto: uvloop when installed (about 8%% less CPU per request), else asyncio")
    srv.add_argument("--shutdown-grace", type=parse_duration, default=30.0,
                     help="on SIGTERM, how long open streams may finish (default 30s)")

    sch = p.add_argument_group("scheduling and metrics")
    sch.add_argument("--config-file", default="", help="EndpointPickerConfig YAML file")
    sch.add_argument("--config-text", default="", help="EndpointPickerConfig YAML given inline")
    sch.add_argument("--refresh-metrics-interval", type=parse_duration, default=0.05,
                     help="how often each model server is scraped (default 50ms)")
    sch.add_argument("--refresh-prometheus-metrics-interval", type=parse_duration, default=5.0,
                     help="how often pool-average gauges are recomputed (default 5s)")
    sch.add_argument("--metrics-staleness-threshold", type=parse_duration, default=2.0,
                     help="scrapes older than this are left out of pool averages (default 2s)")

    lg = p.add_argument_group("logging")
    lg.add_argument("--log-level", "--v", dest="log_level", default="info",
                    help="debug, info, warning or error; numeric --v levels map onto these (default info)")
    lg.add_argument("--log-format", choices=["json", "text"], default="json", help="(default %(default)s)")
    md = p.add_argument_group("mode")
    md.add_argument("--mode", choices=["epp", "bbr"], default="epp",
                    help="epp: pick endpoints for one pool (default). bbr: body-based routing, the first of two "
                         "callouts: copy the body's model into x-gateway-model-name (and its base model into "
                         "x-gateway-base-model-name) so HTTPRoute header matches choose the pool; needs no pool")
    md.add_argument("--base-model", type=_base_models, default={}, metavar="ADAPTER=BASE,...",
                    help="bbr mode: base model of each LoRA adapter (default: the model itself)")
    p.add_argument("--version", action="version", version=f"epp {__version__}")
    return p


def _level(value: str) -> str:
    if value.isdigit():  # the reference's klog-style --v=N
        return "debug" if int(value) >= 4 else "info"
    v = value.lower()
    if v not in ("debug", "info", "warning", "error"):
        raise argparse.ArgumentTypeError(f"invalid log level {value!r}")
    return v


def parse_args(argv: list[str]) -> Options:
    """Parse and cross-check flags; exits with status 2 and a clear message on bad input."""
    p = build_parser()
    a = p.parse_args(argv)
    if not a.pool_name and a.mode == "epp":
        p.error("--pool-name is required")
    if bool(a.endpoint_selector) != bool(a.endpoint_target_ports):
        p.error("--endpoint-selector and --endpoint-target-ports must be given together")
    if a.config_file and a.config_text:
        p.error("give --config-file or --config-text, not both")
    if a.config_file and not os.path.isfile(a.config_file):
        p.error(f"--config-file {a.config_file!r} does not exist")
    for m in a.manifests:
        if not os.path.exists(m):
            p.error(f"--manifests {m!r} does not exist")
    if a.cert_path and not os.path.isdir(a.cert_path):
        p.error(f"--cert-path {a.cert_path!r} is not a directory")
    try:
        level = _level(a.log_level)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if a.refresh_metrics_interval <= 0:
        p.error("--refresh-metrics-interval must be positive")
    return Options(
        pool_name=a.pool_name,
        pool_namespace=a.pool_namespace,
        pool_group=a.pool_group,
        grpc_port=a.grpc_port,
        grpc_health_port=a.grpc_health_port,
        metrics_port=a.metrics_port,
        secure_serving=a.secure_serving,
        cert_path=a.cert_path,
        enable_cert_reload=a.enable_cert_reload,
        config_file=a.config_file,
        config_text=a.config_text,
        refresh_metrics_interval=a.refresh_metrics_interval,
        refresh_prometheus_metrics_interval=a.refresh_prometheus_metrics_interval,
        metrics_staleness_threshold=a.metrics_staleness_threshold,
        ha_enable_leader_election=a.ha_enable_leader_election,
        endpoint_selector=a.endpoint_selector,
        endpoint_target_ports=a.endpoint_target_ports,
        kubeconfig=a.kubeconfig,
        manifests=a.manifests,
        endpoints=a.endpoints,
        max_request_body_bytes=a.max_request_body_bytes,
        default_body_mode=a.default_body_mode,
        shutdown_grace=a.shutdown_grace,
        log_level=level,
        log_format=a.log_format,
        bind_address=a.bind_address,
        mode=a.mode,
        event_loop=a.event_loop,
        base_models=a.base_model,
    )

"""Command-line flags: the reference picker's names and defaults, plus the no-cluster mode.

Boolean flags take `--flag`, `--flag=true|false` (the form the reference's charts pass) and
`--flag false`. Durations take Go-style values (`50ms`, `5s`, `1m30s`) or plain seconds; sizes take
bytes or Kubernetes quantities (`10Mi`, `25MB`).

Every flag of the reference binaries (GIE v1.5 and llm-d router v0.10) is accepted. A flag that has
no effect here is listed in `Options.notices` (the server logs each once at start) instead of
being an error, so the reference's charts and scripts run unchanged.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

from epp import __version__, tls
from epp.cpus import DEFAULT_WORKERS_CAP, cpu_limit, default_workers
from epp.resources import GROUP_V1, GROUP_X, parse_selector
from epp.scheduling.session import SESSION_KEY_ENV, read_session_keys
from epp.units import go_duration


def parse_duration(text: str) -> float:
    """Seconds from `250ms`, `2s`, `1m30s` or `0.05`."""
    try:
        value = float(text)
    except ValueError:
        try:
            return go_duration(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use e.g. 50ms, 5s, 1m)") from None
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


def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return v


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


_SET_BASED = re.compile(r"!|==|\(|\s(in|notin)\s")


def _selector(text: str) -> dict[str, str]:
    if _SET_BASED.search(text):  # llm-d's set-based forms: say so rather than misread `k!=v` as key `k!`
        raise argparse.ArgumentTypeError(f"--endpoint-selector {text!r}: only key=value terms are supported "
                                         "(not !=, in, notin, !key)")
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


def _default_workers(a: argparse.Namespace) -> tuple[int, str]:
    """--workers not given: the CPU limit (epp.cpus.default_workers), or 1 where more processes
    would change what the flags ask for; (workers, why)."""
    n, why = default_workers()
    if n == 1:
        return 1, why
    single = [("--grpc-port 0", a.grpc_port == 0), ("leader election", a.ha_enable_leader_election),
              ("--ha-peers", bool(a.ha_peers)), ("--mode bbr", a.mode != "epp")]
    for what, on in single:
        if on:
            return 1, f"{what} (one process; {why} would give {n})"
    return n, why


def _workers(text: str) -> int:
    if text == "auto":
        return cpu_limit()
    v = _positive_int(text)
    if v > 256:
        raise argparse.ArgumentTypeError(f"at most 256 workers, got {v}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|Pi|Ei|k|K|M|G|T|P|E)?$")
_SIZE_UNITS = {None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
               "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_MAX_MSG = 2**31 - 1  # gRPC's message-size options are C ints


def parse_size(text: str) -> int:
    """Bytes from `10485760`, `10Mi`, `10MiB`, `25MB` or `1.5Gi` (llm-d's --grpc-max-*-msg-size forms)."""
    t = text.strip()
    if len(t) > 1 and t[-1] in "Bb":  # 10MiB = 10Mi, 25MB = 25M, 100B = 100
        t = t[:-1]
    m = _SIZE.match(t)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use bytes or e.g. 10Mi, 25MB)")
    value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    if value > _MAX_MSG:
        raise argparse.ArgumentTypeError(f"size {text!r} is larger than gRPC allows ({_MAX_MSG} bytes)")
    return value


def parse_level(value: str) -> str:
    """Our level name from `debug|info|warning|error|panic` or a klog/zap verbosity number.

    The reference logs its routine messages at verbosity 2 and debug detail at 4 and above, so a
    number of 4 or more is `debug` and smaller numbers are `info`."""
    v = value.strip().lower()
    if v.lstrip("-").isdigit():
        return "debug" if int(v) >= 4 else "info"
    v = {"warn": "warning", "panic": "error", "dpanic": "error", "fatal": "error"}.get(v, v)
    if v not in ("debug", "info", "warning", "error"):
        raise argparse.ArgumentTypeError(f"invalid log level {value!r} (debug, info, warning, error or a number)")
    return v


def _verbosity(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--v takes a number, got {text!r}") from None


def _metric_spec(text: str) -> str:
    """A reference metric spec `name` or `name{label=value,...}`, validated, kept as text ('' = off)."""
    from epp.metrics.engines import parse_spec

    if text.strip():
        try:
            parse_spec(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


_DEPLOYMENT = re.compile(r"^(.+)-[a-z0-9]+-[a-z0-9]+$")


def standalone_pool_name(pod_name: str) -> str:
    """The pool name the reference derives in standalone mode: the Deployment of this pod
    (`POD_NAME` minus its ReplicaSet and pod suffixes); the whole name when it has no such suffix."""
    m = _DEPLOYMENT.match(pod_name)
    return m.group(1) if m else pod_name


RECV_MARGIN = 1 << 20  # bytes of ext_proc message beyond the body cap: headers, trailers, framing

METRIC_FLAGS = ("total-queued-requests-metric", "total-running-requests-metric", "kv-cache-usage-percentage-metric",
                "lora-info-metric", "cache-info-metric")

# flags of the reference accepted for compatibility that change nothing here, and why
NO_EFFECT = {
    "health-checking": "gRPC health is always served, on the health port and on the ext_proc port",
    "emit-endpoint-scores": "endpoint scores are not sent in dynamic metadata (they are on the tracing span)",
    "tls-min-version": "gRPC's TLS defaults apply (TLS 1.2 and 1.3)",
    "tls-cipher-suites": "gRPC's TLS cipher suites apply",
    "metrics-cert-dir": "/metrics is served over plain HTTP (use --metrics-endpoint-auth)",
    "metrics-client-ca-file": "/metrics is served over plain HTTP (use --metrics-endpoint-auth)",
    "enable-grpc-stream-metrics": "the ext_proc stream metrics are not implemented",
    "allow-experimental-plugins": "every built-in plugin is available",
}


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
    client_ca_file: str = ""  # set: ext_proc clients must present a certificate this CA signed (mTLS)
    session_key_file: str = ""  # session-token HMAC keys (signing key first); "": a random key per process
    config_file: str = ""
    config_text: str = ""
    refresh_metrics_interval: float = 0.05
    refresh_metrics_idle_interval: float = 0.5  # 0: every endpoint at --refresh-metrics-interval always
    refresh_metrics_quiet_interval: float = 0.2  # 0: a busy endpoint at --refresh-metrics-interval always
    refresh_prometheus_metrics_interval: float = 5.0
    metrics_staleness_threshold: float = 2.0
    ha_enable_leader_election: bool = False
    ha_mode: str = "leader"  # leader: readiness follows the Lease (the reference); active-active: every replica ready
    ha_peers: str = ""  # active-active: the other replicas (host:port, a name may resolve to all), "" = none
    ha_peer_port: int = 0  # where this replica publishes its routes for its peers (0: the default port)
    endpoint_selector: dict[str, str] = field(default_factory=dict)
    endpoint_target_ports: list[int] = field(default_factory=list)
    kubeconfig: str = ""
    manifests: list[str] = field(default_factory=list)
    endpoints: list[str] = field(default_factory=list)
    max_request_body_bytes: int = 16 * 1024 * 1024
    default_body_mode: str = "duplex"
    workers: int = 1  # picker processes serving the ext_proc port together (SO_REUSEPORT)
    workers_why: str = ""  # --workers not given: how the default was chosen (logged at start)
    worker_index: int = -1  # set by the supervisor in each worker process; -1: not a worker
    worker_share: str = ""  # set by the supervisor: the workers' shared-memory file (epp.workershare)
    worker_connections: str = "balanced"  # --workers: who spreads connections ("balanced": the supervisor)
    worker_handoff_fd: int = -1  # set by the supervisor: the control stream it hands connections on
    gc_tuning: bool = True  # gc.freeze() after start and higher collector thresholds (epp.__main__)
    gil_switch_interval: float = 0.001  # sys.setswitchinterval (epp.__main__); 0: Python's default
    worker_prefix_notes: bool = True  # --workers: tell the other workers each routed prefix placement
    # share of requests whose response body crosses the picker when not needed: a sampled stream costs
    # two messages per SSE chunk (~260 for 128 tokens), so 2% of requests doubled the picker's messages
    response_body_sample: float = 0.005
    # share of the other requests (BUFFERED request body) whose response headers still cross: the
    # rest skip the whole response side, 2 messages a request instead of 3
    response_headers_sample: float = 0.05
    shutdown_grace: float = 30.0
    log_level: str = "info"
    log_format: str = "json"
    bind_address: str = "0.0.0.0"
    grpc_bind_address: str = ""  # the ext_proc listener's own address ("" = bind_address)
    mode: str = "epp"
    event_loop: str = "auto"
    base_models: dict[str, str] = field(default_factory=dict)
    # the reference's process flags (GIE v1.5, llm-d router v0.10)
    standalone: bool = False  # --endpoint-selector without --pool-name: pool name from POD_NAME
    tracing: bool = False
    enable_pprof: bool = True
    metrics_endpoint_auth: bool = True
    disable_endpoint_subset_filter: bool = False
    drain_timeout: float = 30.0
    grpc_max_recv_msg_size: int = 0  # 0: max_request_body_bytes + RECV_MARGIN
    grpc_max_send_msg_size: int = 0  # 0: gRPC's default
    grpc_server: str = "native"  # "native" (epp.h2server on the serving loop) or "grpcio" (grpc.aio)
    # --model-server-metrics-* (None: not given; the engine map's setting applies)
    model_server_metrics_scheme: str | None = None
    model_server_metrics_path: str | None = None
    model_server_metrics_port: int | None = None
    model_server_metrics_insecure: bool | None = None
    metric_flags: dict[str, str] = field(default_factory=dict)  # metric-name flags given: flag -> spec
    log_stacktrace_level: str = ""  # "": no stacks added (exceptions still carry theirs)
    log_time_encoding: str = ""  # "": ISO-8601 with milliseconds
    notices: list[str] = field(default_factory=list)  # flags accepted without effect, logged at start

    @property
    def grpc_recv_limit(self) -> int:
        """The ext_proc server's receive limit: a message larger than the body cap is refused
        before it is read whole (the margin covers headers and framing)."""
        if self.grpc_max_recv_msg_size > 0:
            return self.grpc_max_recv_msg_size
        return min(self.max_request_body_bytes + RECV_MARGIN, _MAX_MSG)



def config_text(opts: Options) -> str | None:
    """The EndpointPickerConfig YAML from --config-text or --config-file (None: the defaults)."""
    if opts.config_text:
        return opts.config_text
    if opts.config_file:
        with open(opts.config_file, encoding="utf-8") as f:
            return f.read()
    return None


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
    pool.add_argument("--pool-name", default="",
                      help="name of the InferencePool this picker serves (required, unless --endpoint-selector "
                           "is given: then the pool is named after this pod's Deployment, from env POD_NAME)")
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
    srv.add_argument("--grpc-bind-address", default="",
                     help="the ext_proc listener alone on this address, e.g. 127.0.0.1 when Envoy runs in the "
                          "same pod, while health and metrics stay on --bind-address (default: --bind-address)")
    srv.add_argument("--secure-serving", default=True, **B,
                     help="serve ext_proc over TLS (default true; self-signed unless --cert-path has a pair)")
    srv.add_argument("--cert-path", default="", help="directory holding tls.crt and tls.key")
    srv.add_argument("--enable-cert-reload", default=False, **B, help="reload the certificate when the files change")
    srv.add_argument("--client-ca-file", default="", metavar="PATH",
                     help="mutual TLS on the ext_proc port: require a client certificate signed by a CA in this "
                          "PEM file and refuse the handshake without one (needs --secure-serving; re-read with "
                          "--enable-cert-reload)")
    srv.add_argument("--session-key-file", default=os.environ.get(SESSION_KEY_ENV, ""), metavar="PATH",
                     help="keys that sign session-affinity tokens, one a line: the signing key first, then older "
                          "keys still accepted (rotation); replicas behind one gateway share it (env "
                          "EPP_SESSION_KEY_FILE; default: a random key per process)")
    srv.add_argument("--ha-enable-leader-election", default=False, **B,
                     help="run several replicas; readiness is SERVING only on the leader")
    srv.add_argument("--ha-mode", choices=["leader", "active-active"], default="leader",
                     help="with several replicas: `leader` (the reference: readiness only on the Lease holder) or "
                          "`active-active` (every replica ready and serving; prefix state from engine KV events, "
                          "in-flight counts per replica unless --ha-peers shares them; a Lease, when enabled, only "
                          "picks the status writer)")
    srv.add_argument("--ha-peers", default="", metavar="HOST:PORT,...",
                     help="active-active (ours): the replicas that tell each other every request they route and "
                          "finish, so each counts the pool's in-flight requests and learns the others' prefix "
                          "placements within milliseconds (a name resolving to every replica, e.g. a headless "
                          "Service, is re-resolved every 10 s); needs --ha-mode active-active and "
                          "--session-key-file (messages are signed with its key); default: none")
    srv.add_argument("--ha-peer-port", type=int, default=0, metavar="PORT",
                     help="with --ha-peers: the port this replica publishes on (default 9005)")
    srv.add_argument("--max-request-body-bytes", type=_positive_int, default=16 * 1024 * 1024,
                     help="larger request bodies are answered with 413 (default %(default)s)")
    srv.add_argument("--default-body-mode", choices=["duplex", "buffered"], default="duplex",
                     help="request body mode assumed when Envoy does not send protocol_config (default %(default)s)")
    srv.add_argument("--response-body-sample", type=_share, default=0.005, metavar="SHARE",
                     help="share (0..1) of requests whose response body still crosses the picker when nothing "
                          "else needs it (a rewritten model name or a response plugin always does): token metrics "
                          "are read from these; the others are told to skip it (mode_override, honoured when "
                          "Envoy's filter sets allow_mode_override, as the generated configs do). A sampled stream "
                          "costs two messages per SSE chunk. 1: every body, as the reference (default %(default)s)")
    srv.add_argument("--response-headers-sample", type=_share, default=0.05, metavar="SHARE",
                     help="with a BUFFERED request body (the buffered profile), share (0..1) of the requests "
                          "outside the body sample whose response headers still cross the picker when nothing "
                          "else needs them (a possible model rewrite, a session header, a response plugin, "
                          "fallbacks): time to first byte, TTFT and upstream status metrics are read from these; "
                          "the others skip the whole response side (mode_override on the request-headers reply: "
                          "2 messages a request, in-flight still counted to the end of the exchange). "
                          "1: every request's headers (default %(default)s)")
    srv.add_argument("--workers", type=_workers, default=None, metavar="N|auto",
                     help="picker processes serving one ext_proc port (--worker-connections says how "
                          "connections are spread over them). Default: the container's CPU limit (limits.cpu) "
                          f"rounded up, at most {DEFAULT_WORKERS_CAP}; 1 when no limit is set, with --grpc-port 0, "
                          "leader election, --ha-peers, --mode bbr or flow control on (their state is one process's). "
                          "auto: the CPU limit, else every CPU of the affinity mask. "
                          "The first worker scrapes the pool and shares each page with the others through shared "
                          "memory (the model servers are polled once, not once per worker); every worker's "
                          "in-flight counts (and prefill-backlog clocks) are summed into each decision; what a "
                          "worker's prefix index learns from a routed request reaches the others within "
                          "milliseconds (signed messages on ipc:// sockets next to the share), so they place a "
                          "prefix as one picker would; only "
                          "the first serves --metrics-port; flow-control queues stay each worker's own")
    srv.add_argument("--worker-prefix-notes", default=True, **B,
                     help="with --workers above 1: each worker tells the others where it routed a prompt, so "
                          "the prefix indexes agree (at saturation ~1%% of a worker's CPU when prompts repeat, up "
                          "to ~15%% of the throughput when every prompt is new; docs/benchmarks.md \"Every "
                          "core\"); false: each worker's index is its own and N workers "
                          "place prefixes like N replicas without --ha-peers (default true)")
    srv.add_argument("--worker-connections", choices=("balanced", "kernel"), default="balanced",
                     help="with --workers above 1: balanced (default) = this process accepts every ext_proc "
                          "connection and hands it to the worker holding the fewest (Envoy opens one per "
                          "worker thread, so a gateway of 2 threads gets one per picker worker); kernel = "
                          "every worker listens with SO_REUSEPORT and the kernel picks one by a hash of the "
                          "addresses (two connections land on one worker half the time). --grpc-server "
                          "grpcio is always kernel. The health port is always SO_REUSEPORT (short probes)")
    srv.add_argument("--worker-index", type=int, default=-1, help=argparse.SUPPRESS)
    srv.add_argument("--worker-handoff-fd", type=int, default=-1, help=argparse.SUPPRESS)
    srv.add_argument("--worker-share", default="", help=argparse.SUPPRESS)
    srv.add_argument("--gc-tuning", default=True, **B,
                     help="after start, freeze the heap out of the cyclic collector and raise its thresholds "
                          "(fewer, shorter pauses while serving; default true)")
    srv.add_argument("--gil-switch-interval", type=parse_duration, default=0.001,
                     help="how long one thread may hold Python's interpreter lock while another waits for it "
                          "(default 1ms; Python's own is 5ms). The scraper and /metrics threads share the lock "
                          "with the serving loop: at 5ms a saturated loop let the scraper make a third of its "
                          "polls (the pages went stale), and a /metrics render could hold a request up to 5ms. "
                          "0: keep Python's")
    srv.add_argument("--event-loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                     help="auto: uvloop when installed (about 8%% less CPU per request), else asyncio")
    srv.add_argument("--shutdown-grace", type=parse_duration, default=30.0,
                     help="on SIGTERM, after --drain-timeout, how long open streams may finish (default 30s)")

    sch = p.add_argument_group("scheduling and metrics")
    sch.add_argument("--config-file", default="", help="EndpointPickerConfig YAML file")
    sch.add_argument("--config-text", default="", help="EndpointPickerConfig YAML given inline")
    sch.add_argument("--refresh-metrics-interval", type=parse_duration, default=0.05,
                     help="how often each model server is scraped (default 50ms)")
    sch.add_argument("--refresh-metrics-idle-interval", type=parse_duration, default=0.5,
                     help="a model server with no request in flight whose metrics stopped changing is scraped "
                          "ever slower, up to this interval; a request routed to it or a change brings it back "
                          "to --refresh-metrics-interval at once (0: off; default 500ms). Such a page is not taken "
                          "for stale while the next scrape is due: the scraper vouches for it, so this is not capped "
                          "by the scheduler's metrics staleness threshold")
    sch.add_argument("--refresh-metrics-quiet-interval", type=parse_duration, default=0.2,
                     help="(ours) a model server with requests in flight but none routed there or ended there "
                          "since its last scrape is scraped ever slower, up to this interval; the next dispatch "
                          "or completion brings it back to --refresh-metrics-interval (0: off; default 200ms; capped "
                          "at half the scheduler's metrics staleness threshold, so 100ms with its 200ms default)")
    sch.add_argument("--refresh-prometheus-metrics-interval", type=parse_duration, default=5.0,
                     help="how often pool-average gauges are recomputed (default 5s)")
    sch.add_argument("--metrics-staleness-threshold", type=parse_duration, default=2.0,
                     help="scrapes older than this are left out of pool averages (default 2s)")

    srv.add_argument("--drain-timeout", type=parse_duration, default=30.0,
                     help="on SIGTERM: readiness turns NOT_SERVING at once and new streams are still "
                          "served this long, so the proxy's endpoint list catches up; then open streams get "
                          "--shutdown-grace to finish (default 30s, llm-d's)")
    srv.add_argument("--grpc-max-recv-msg-size", type=parse_size, default=0, metavar="SIZE",
                     help="largest ext_proc message read (e.g. 20Mi); default --max-request-body-bytes + 1 MiB, "
                          "so an oversized buffered body is refused before it is read whole")
    srv.add_argument("--grpc-max-send-msg-size", type=parse_size, default=0, metavar="SIZE",
                     help="largest ext_proc message sent (default gRPC's)")
    srv.add_argument("--grpc-server", choices=("native", "grpcio"), default="native",
                     help="what serves the gRPC ports: native (default; HTTP/2 parsed on the serving loop "
                          "itself, no thread hop a message: docs/benchmarks.md, 'Picker cost') or grpcio "
                          "(grpc.aio, as before)")
    srv.add_argument("--metrics-endpoint-auth", default=True, **B,
                     help="/metrics (and the debug routes) need a bearer token that a Kubernetes TokenReview "
                          "accepts and a SubjectAccessReview allows `get` on the /metrics URL (default true; "
                          "off, with a log line, when there is no cluster)")
    srv.add_argument("--enable-pprof", default=True, **B,
                     help="debug routes on the metrics port: /debug/pprof/ (asyncio tasks, tracemalloc heap "
                          "top, a cProfile CPU profile for ?seconds=N) (default true)")
    srv.add_argument("--tracing", default=False, **B,
                     help="OpenTelemetry spans, one per decision, exported by OTLP as the OTEL_* environment "
                          "variables say; the W3C traceparent goes to the model server (default false)")
    srv.add_argument("--disable-endpoint-subset-filter", default=False, **B,
                     help="ignore the proxy's x-gateway-destination-endpoint-subset hint")

    ms = p.add_argument_group("model-server metrics (the reference's flags; the config file's engineMetrics "
                              "is the newer way)")
    ms.add_argument("--model-server-metrics-scheme", choices=["http", "https"], default=None,
                    help="scheme of the model servers' metrics URL (default http)")
    ms.add_argument("--model-server-metrics-path", default=None, help="(default /metrics)")
    ms.add_argument("--model-server-metrics-port", type=_port, default=None,
                    help="port of the model servers' metrics (default: each endpoint's own port)")
    ms.add_argument("--model-server-metrics-https-insecure-skip-verify", default=None, **B,
                    help="with https, do not verify the model servers' certificates (default true)")
    for name in METRIC_FLAGS:
        ms.add_argument(f"--{name}", type=_metric_spec, default=None, metavar="NAME{LABEL=V,...}",
                        help="metric read from pods without an engine-type label (vLLM's map)"
                             + (" (empty: off)" if name in ("lora-info-metric", "cache-info-metric") else ""))

    lg = p.add_argument_group("logging (the reference's zap/klog flags map onto these)")
    lg.add_argument("--log-level", default=None, help="debug, info, warning or error (default info)")
    lg.add_argument("--log-format", choices=["json", "text"], default=None, help="(default json)")
    lg.add_argument("--v", "-v", dest="v", type=_verbosity, default=None, metavar="N",
                    help="klog verbosity: 4 or more is debug, less is info")
    lg.add_argument("--zap-log-level", default=None, metavar="LEVEL",
                    help="debug, info, error, panic or a verbosity number (wins over --v)")
    lg.add_argument("--zap-encoder", choices=["json", "console"], default=None,
                    help="json, or console (= --log-format text)")
    lg.add_argument("--zap-devel", default=None, **B, help="text format unless an encoder is given")
    lg.add_argument("--zap-stacktrace-level", choices=["info", "error", "panic"], default=None,
                    help="add the call stack to records at this level and above")
    lg.add_argument("--zap-time-encoding", default=None,
                    choices=["epoch", "millis", "nano", "iso8601", "rfc3339", "rfc3339nano"],
                    help="format of the ts field (default ISO-8601 with milliseconds)")

    ref = p.add_argument_group("accepted for compatibility, no effect here (logged once at start)")
    for name, why in NO_EFFECT.items():
        if name in ("tls-cipher-suites", "tls-min-version", "metrics-cert-dir", "metrics-client-ca-file"):
            ref.add_argument(f"--{name}", default=None, help=why)
        else:
            ref.add_argument(f"--{name}", default=None, **B, help=why)
    md = p.add_argument_group("mode")
    md.add_argument("--mode", choices=["epp", "bbr"], default="epp",
                    help="epp: pick endpoints for one pool (default). bbr: body-based routing, the first of two "
                         "callouts: copy the body's model into x-gateway-model-name (and its base model into "
                         "x-gateway-base-model-name) so HTTPRoute header matches choose the pool; needs no pool")
    md.add_argument("--base-model", type=_base_models, default={}, metavar="ADAPTER=BASE,...",
                    help="bbr mode: base model of each LoRA adapter (default: the model itself)")
    p.add_argument("--version", action="version", version=f"epp {__version__}")
    return p


def _logging(a: argparse.Namespace) -> tuple[str, str]:
    """(level, format): --zap-log-level, then --log-level, then --v; --zap-encoder, then --log-format,
    then --zap-devel (the reference's development mode writes console text)."""
    if a.zap_log_level is not None:
        level = parse_level(a.zap_log_level)
    elif a.log_level is not None:
        level = parse_level(a.log_level)
    elif a.v is not None:
        level = parse_level(str(a.v))
    else:
        level = "info"
    if a.zap_encoder is not None:
        fmt = "text" if a.zap_encoder == "console" else "json"
    elif a.log_format is not None:
        fmt = a.log_format
    else:
        fmt = "text" if a.zap_devel else "json"
    return level, fmt


def parse_args(argv: list[str]) -> Options:
    """Parse and cross-check flags; exits with status 2 and a clear message on bad input."""
    p = build_parser()
    a = p.parse_args(argv)
    standalone = False
    if not a.pool_name and a.mode == "epp":
        if not a.endpoint_selector:
            p.error("--pool-name is required (or --endpoint-selector with --endpoint-target-ports)")
        # the reference's standalone mode: the pool is named after this picker's Deployment
        a.pool_name = standalone_pool_name(os.environ.get("POD_NAME") or socket.gethostname() or "epp")
        standalone = True
    if bool(a.endpoint_selector) != bool(a.endpoint_target_ports):
        p.error("--endpoint-selector and --endpoint-target-ports must be given together")
    if len(a.endpoint_target_ports) > 8:
        p.error("--endpoint-target-ports takes 1 to 8 ports")
    a.endpoint_target_ports = list(dict.fromkeys(a.endpoint_target_ports))
    if a.config_file and a.config_text:
        p.error("give --config-file or --config-text, not both")
    if a.config_file and not os.path.isfile(a.config_file):
        p.error(f"--config-file {a.config_file!r} does not exist")
    for m in a.manifests:
        if not os.path.exists(m):
            p.error(f"--manifests {m!r} does not exist")
    if a.cert_path and not os.path.isdir(a.cert_path):
        p.error(f"--cert-path {a.cert_path!r} is not a directory")
    if a.client_ca_file:
        if not a.secure_serving:
            p.error("--client-ca-file needs --secure-serving (client certificates are part of TLS)")
        try:
            tls.read_ca(a.client_ca_file)
        except (OSError, ValueError) as e:
            p.error(f"--client-ca-file: {e}")
    if a.session_key_file:
        try:
            read_session_keys(a.session_key_file)
        except (OSError, ValueError) as e:
            p.error(f"--session-key-file: {e}")
    try:
        level, fmt = _logging(a)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    workers_why = ""
    if a.workers is None:
        a.workers, workers_why = _default_workers(a)
    if a.workers > 1 and a.grpc_port == 0:
        p.error("--workers above 1 needs a fixed --grpc-port (the workers share it)")
    if a.ha_peers:
        from epp.peers import parse_peers

        try:
            parse_peers(a.ha_peers)
        except ValueError as e:
            p.error(f"--ha-peers: {e}")
        if a.ha_mode != "active-active":
            p.error("--ha-peers needs --ha-mode active-active")
        if not a.session_key_file:
            p.error("--ha-peers needs --session-key-file (the replicas' shared key signs their messages)")
        if a.workers > 1:
            p.error("--ha-peers and --workers above 1 do not go together yet (one publisher per replica)")
    if not 0 <= a.ha_peer_port < 65536:
        p.error("--ha-peer-port: 0-65535")
    if a.workers > 1 and a.ha_enable_leader_election:
        p.error("--workers above 1 and --ha-enable-leader-election do not go together (one Lease per process)")
    if a.refresh_metrics_interval <= 0:
        p.error("--refresh-metrics-interval must be positive")
    if a.gil_switch_interval > 0.1:  # longer would let one thread hold every other off for that long
        p.error("--gil-switch-interval: at most 100ms (0 keeps Python's 5ms)")
    notices = [f"--{name} has no effect here: {why}" for name, why in NO_EFFECT.items()
               if getattr(a, name.replace("-", "_")) is not None]
    if a.zap_devel is not None and (a.zap_encoder is not None or a.log_format is not None):
        notices.append("--zap-devel has no effect here: the encoder given wins, and levels come from "
                       "--zap-log-level/--v")
    metric_flags = {name: getattr(a, name.replace("-", "_")) for name in METRIC_FLAGS
                    if getattr(a, name.replace("-", "_")) is not None}
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
        client_ca_file=a.client_ca_file,
        session_key_file=a.session_key_file,
        config_file=a.config_file,
        config_text=a.config_text,
        refresh_metrics_interval=a.refresh_metrics_interval,
        refresh_metrics_idle_interval=a.refresh_metrics_idle_interval,
        refresh_metrics_quiet_interval=a.refresh_metrics_quiet_interval,
        refresh_prometheus_metrics_interval=a.refresh_prometheus_metrics_interval,
        metrics_staleness_threshold=a.metrics_staleness_threshold,
        ha_enable_leader_election=a.ha_enable_leader_election,
        ha_mode=a.ha_mode,
        ha_peers=a.ha_peers,
        ha_peer_port=a.ha_peer_port,
        endpoint_selector=a.endpoint_selector,
        endpoint_target_ports=a.endpoint_target_ports,
        kubeconfig=a.kubeconfig,
        manifests=a.manifests,
        endpoints=a.endpoints,
        max_request_body_bytes=a.max_request_body_bytes,
        default_body_mode=a.default_body_mode,
        gc_tuning=a.gc_tuning,
        gil_switch_interval=a.gil_switch_interval,
        worker_prefix_notes=a.worker_prefix_notes,
        workers=a.workers,
        workers_why=workers_why,
        worker_index=a.worker_index,
        worker_share=a.worker_share,
        worker_connections=a.worker_connections,
        worker_handoff_fd=a.worker_handoff_fd,
        response_body_sample=a.response_body_sample,
        response_headers_sample=a.response_headers_sample,
        shutdown_grace=a.shutdown_grace,
        log_level=level,
        log_format=fmt,
        bind_address=a.bind_address,
        grpc_bind_address=a.grpc_bind_address,
        mode=a.mode,
        event_loop=a.event_loop,
        base_models=a.base_model,
        standalone=standalone,
        tracing=a.tracing,
        enable_pprof=a.enable_pprof,
        metrics_endpoint_auth=a.metrics_endpoint_auth,
        disable_endpoint_subset_filter=a.disable_endpoint_subset_filter,
        drain_timeout=a.drain_timeout,
        grpc_max_recv_msg_size=a.grpc_max_recv_msg_size,
        grpc_max_send_msg_size=a.grpc_max_send_msg_size,
        grpc_server=a.grpc_server,
        model_server_metrics_scheme=a.model_server_metrics_scheme,
        model_server_metrics_path=a.model_server_metrics_path,
        model_server_metrics_port=a.model_server_metrics_port or None,  # 0: the reference's "unset"
        model_server_metrics_insecure=a.model_server_metrics_https_insecure_skip_verify,
        metric_flags=metric_flags,
        log_stacktrace_level=a.zap_stacktrace_level or "",
        log_time_encoding=a.zap_time_encoding or "",
        notices=notices,
    )

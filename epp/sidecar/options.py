"""The sidecar's flags, named as llm-d's pd-sidecar (v0.10.0) names them, and their checks.

Go flag syntax is accepted: `--flag value`, `--flag=value`, booleans as `--flag`, `--flag=true` or
`--flag=false`. `--configuration` (YAML text) / `--configuration-file` give the same keys in a file;
flags on the command line win. Features of the reference this sidecar does not build are refused
at start with "not supported" (other KV connectors, EC connectors, chunked decode).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from epp.scheduling.registry import ConfigError, parse_duration

KV_CONNECTORS = ("nixlv2", "shared-storage", "sglang", "mooncake", "offloading")
SUPPORTED_KV = ("nixlv2",)
TLS_STAGES = ("prefiller", "decoder", "encoder")
POOL_GROUPS = {"inference.networking.k8s.io": "v1", "inference.networking.x-k8s.io": "v1alpha2"}


class OptionError(ValueError):
    """A flag value the sidecar cannot run with."""


@dataclass(slots=True)
class SidecarOptions:
    """Validated sidecar settings."""

    port: int = 8000
    model_server_port: int = 8200
    data_parallel_size: int = 1
    kv_connector: str = "nixlv2"
    ec_connector: str = ""
    secure_proxy: bool = True
    cert_path: str = ""
    enable_ssrf_protection: bool = False
    enable_prefiller_sampling: bool = False
    inference_pool: str = ""  # "namespace/name" or "name" (INFERENCE_POOL)
    pool_group: str = "inference.networking.k8s.io"
    enable_tls: tuple[str, ...] = ()
    tls_insecure_skip_verify: tuple[str, ...] = ()
    max_idle_conns_per_host: int = 100
    prefill_max_retries: int = 0
    prefill_retry_backoff: float = 0.2  # seconds
    decode_chunk_size: int = 0
    tracing: bool = False
    metrics_port: int = 0
    # ours
    host: str = "0.0.0.0"
    engine_host: str = "localhost"
    max_request_bytes: int = 64 * 1024 * 1024
    prefill_timeout: float = 300.0
    allowlist_refresh: float = 5.0
    kubeconfig: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def engine_url(self) -> str:
        scheme = "https" if "decoder" in self.enable_tls else "http"
        return f"{scheme}://{self.engine_host}:{self.model_server_port}"

    @property
    def prefill_scheme(self) -> str:
        return "https" if "prefiller" in self.enable_tls else "http"

    @property
    def pool_namespace_name(self) -> tuple[str, str]:
        ns, _, name = self.inference_pool.rpartition("/")
        return ns or os.environ.get("POD_NAMESPACE", "") or _sa_namespace() or "default", name


def _sa_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip()
    except OSError:
        return ""


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool."""
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epp sidecar", description="P/D disaggregation sidecar for a decode pod")
    b = {"nargs": "?", "const": True, "type": parse_bool, "default": None}
    p.add_argument("--port", default=None, help="the port the sidecar is listening on (default 8000)")
    p.add_argument("--model-server-port", default=None, help="the port the model server listens on (default 8200)")
    p.add_argument("--vllm-port", default=None, help="deprecated: use --model-server-port")
    p.add_argument("--data-parallel-size", type=int, default=None, help="the model server's data-parallel size")
    p.add_argument("--kv-connector", default=None, help="KV protocol between prefiller and decoder: "
                   + ", ".join(KV_CONNECTORS) + " (only nixlv2 is built here)")
    p.add_argument("--ec-connector", default=None, help="EC protocol for encode disaggregation (not built)")
    p.add_argument("--secure-proxy", **b, help="serve TLS (default true)")  # type: ignore[arg-type]
    p.add_argument("--cert-path", default=None, help="directory with tls.crt and tls.key (else self-signed)")
    p.add_argument("--enable-ssrf-protection", **b, help="only prefill targets that are pods of the "  # type: ignore[arg-type]
                   "InferencePool (default false)")
    p.add_argument("--enable-prefiller-sampling", **b,  # type: ignore[arg-type]
                   help="pick the prefill host at random among several in the header")
    p.add_argument("--inference-pool", default=None, help="namespace/name of the InferencePool (INFERENCE_POOL)")
    p.add_argument("--pool-group", default=None, help="API group of the InferencePool")
    p.add_argument("--enable-tls", action="append", default=None, help="stages reached over TLS: "
                   + ", ".join(TLS_STAGES))
    p.add_argument("--tls-insecure-skip-verify", action="append", default=None,
                   help="stages whose certificate is not verified")
    p.add_argument("--max-idle-conns-per-host", type=int, default=None)
    p.add_argument("--prefill-max-retries", type=int, default=None,
                   help="retries of a prefill answered 502/503/504, after the first try, same host (default 0)")
    p.add_argument("--prefill-retry-backoff", default=None, help="wait between prefill retries (default 200ms)")
    p.add_argument("--decode-chunk-size", type=int, default=None, help="chunked decode (not built; 0 only)")
    p.add_argument("--tracing", **b)  # type: ignore[arg-type]
    p.add_argument("--metrics-port", type=int, default=None)
    p.add_argument("--configuration", default=None, help="YAML with the same keys as the flags")
    p.add_argument("--configuration-file", default=None, help="a file of that YAML")
    # ours
    p.add_argument("--host", default=None, help="listen address (default 0.0.0.0)")
    p.add_argument("--engine-host", default=None, help="the local engine's host (default localhost)")
    p.add_argument("--max-request-bytes", type=int, default=None, help="largest request body read (64 MiB)")
    p.add_argument("--prefill-timeout", default=None, help="bound on one prefill call (default 300s)")
    p.add_argument("--allowlist-refresh", default=None, help="SSRF allow-list re-read interval (default 5s)")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig for the allow-list (else in-cluster/KUBECONFIG)")
    return p


def _split(values: Sequence[str] | str | None) -> tuple[str, ...]:
    if values is None:
        return ()
    items = [values] if isinstance(values, str) else list(values)
    return tuple(s.strip() for v in items for s in str(v).split(",") if s.strip())


def _port(value: Any, name: str, *, zero: bool = False) -> int:
    """A port number; 0 (a free port from the OS) only where `zero` allows it."""
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise OptionError(f"--{name}: expected a port number, got {value!r}") from None
    if not (0 if zero else 1) <= port < 65536:
        raise OptionError(f"--{name}: expected a port number 1..65535, got {port}")
    return port


def parse_options(argv: Sequence[str], env: Mapping[str, str] | None = None) -> SidecarOptions:
    """Flags (then the configuration YAML, then the environment) into SidecarOptions; OptionError
    on a bad value or a feature this sidecar does not build."""
    env = os.environ if env is None else env
    ns = vars(_parser().parse_args(list(argv)))
    conf: dict[str, Any] = {}
    text = ns.pop("configuration")
    path = ns.pop("configuration_file")
    if path:
        with open(path) as f:
            text = f.read()
    if text:
        loaded = yaml.safe_load(text)
        if not isinstance(loaded, Mapping):
            raise OptionError("--configuration: expected a YAML mapping of flag names to values")
        conf = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(k for k in conf if k not in ns)
        if unknown:
            raise OptionError(f"--configuration: unknown key {unknown[0].replace('_', '-')!r}")

    def get(key: str, default: Any) -> Any:
        v = ns.get(key)
        if v is None:
            v = conf.get(key)
        return default if v is None else v

    o = SidecarOptions()
    o.port = _port(get("port", 8000), "port", zero=True)
    msp, vllm = ns.get("model_server_port") or conf.get("model_server_port"), get("vllm_port", None)
    if vllm is not None:
        o.warnings.append("--vllm-port is deprecated: use --model-server-port")
    o.model_server_port = _port(msp if msp is not None else (vllm if vllm is not None else 8200), "model-server-port")
    o.data_parallel_size = int(get("data_parallel_size", 1))
    if o.data_parallel_size < 1:
        raise OptionError("--data-parallel-size: must be at least 1")
    o.kv_connector = str(get("kv_connector", "nixlv2"))
    if o.kv_connector not in KV_CONNECTORS:
        raise OptionError(f"--kv-connector: unknown {o.kv_connector!r}; supported: {', '.join(KV_CONNECTORS)}")
    if o.kv_connector not in SUPPORTED_KV:
        raise OptionError(f"--kv-connector {o.kv_connector}: not supported by this sidecar (only nixlv2)")
    o.ec_connector = str(get("ec_connector", ""))
    if o.ec_connector:
        raise OptionError(f"--ec-connector {o.ec_connector}: encode disaggregation is not supported by this sidecar")
    o.secure_proxy = bool(get("secure_proxy", True))
    o.cert_path = str(get("cert_path", ""))
    o.enable_ssrf_protection = bool(get("enable_ssrf_protection", False))
    sampling_env = env.get("ENABLE_PREFILLER_SAMPLING", "")
    default_sampling = False
    if sampling_env:
        try:
            default_sampling = parse_bool(sampling_env)
        except argparse.ArgumentTypeError:
            default_sampling = False
    o.enable_prefiller_sampling = bool(get("enable_prefiller_sampling", default_sampling))
    o.inference_pool = str(get("inference_pool", env.get("INFERENCE_POOL", "")))
    o.pool_group = str(get("pool_group", "inference.networking.k8s.io"))
    if o.pool_group not in POOL_GROUPS:
        raise OptionError(f"--pool-group: unsupported {o.pool_group!r}; must be one of {', '.join(POOL_GROUPS)}")
    if o.enable_ssrf_protection and not o.pool_namespace_name[1]:
        raise OptionError("--enable-ssrf-protection needs the InferencePool: --inference-pool or INFERENCE_POOL")
    o.enable_tls = _split(get("enable_tls", None))
    o.tls_insecure_skip_verify = _split(get("tls_insecure_skip_verify", None))
    for flag, stages in (("enable-tls", o.enable_tls), ("tls-insecure-skip-verify", o.tls_insecure_skip_verify)):
        bad = [s for s in stages if s not in TLS_STAGES]
        if bad:
            raise OptionError(f"--{flag}: unknown stage {bad[0]!r}; supported: {', '.join(TLS_STAGES)}")
    o.max_idle_conns_per_host = int(get("max_idle_conns_per_host", 100))
    o.prefill_max_retries = int(get("prefill_max_retries", 0))
    if o.prefill_max_retries < 0:
        raise OptionError("--prefill-max-retries: must be at least 0")
    try:
        backoff = get("prefill_retry_backoff", "200ms")
        o.prefill_retry_backoff = parse_duration(backoff, "--prefill-retry-backoff") if backoff not in (0, "0") else 0.0
        o.prefill_timeout = parse_duration(get("prefill_timeout", "300s"), "--prefill-timeout")
        o.allowlist_refresh = parse_duration(get("allowlist_refresh", "5s"), "--allowlist-refresh")
    except ConfigError as e:
        raise OptionError(str(e)) from None
    o.decode_chunk_size = int(get("decode_chunk_size", 0))
    if o.decode_chunk_size:
        raise OptionError("--decode-chunk-size: chunked decode is not supported by this sidecar (0 only)")
    o.tracing = bool(get("tracing", False))
    if o.tracing:
        o.warnings.append("--tracing: this sidecar does not emit traces; ignored")
    o.metrics_port = int(get("metrics_port", 0))
    if o.metrics_port:
        o.warnings.append("--metrics-port: this sidecar serves no metrics; ignored")
    o.host = str(get("host", "0.0.0.0"))
    o.engine_host = str(get("engine_host", "localhost"))
    o.max_request_bytes = int(get("max_request_bytes", 64 * 1024 * 1024))
    o.kubeconfig = str(get("kubeconfig", ""))
    return o

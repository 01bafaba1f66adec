"""The picker's /metrics port: plain, gzip, and --metrics-endpoint-auth with TokenReview +
SubjectAccessReview against the API-server emulator through the real kubernetes client."""

from __future__ import annotations

import gzip
import http.client
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from epp.metrics_http import KubeAuthorizer, KubeReviews, MetricsServer
from epp.sources.kube_client import make_api_client
from tests.sources.apiserver import ApiServer


def get(port: int, path: str = "/metrics", token: str | None = None, method: str = "GET",
        headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        conn.request(method, path, headers=h)
        r = conn.getresponse()
        return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


@pytest.fixture
def registry() -> CollectorRegistry:
    r = CollectorRegistry()
    Counter("epp_test_total", "A test counter.", registry=r).inc(3)
    return r


@pytest.fixture
def serve(registry: CollectorRegistry) -> Iterator[object]:
    servers: list[MetricsServer] = []

    def start(**kw: object) -> int:
        s = MetricsServer(registry, **kw)  # type: ignore[arg-type]
        servers.append(s)
        return s.start(0, "127.0.0.1")

    yield start
    for s in servers:
        s.close()


def test_plain_metrics_gzip_and_other_paths(serve):
    port = serve()
    status, body, _ = get(port)
    assert status == 200 and b"epp_test_total 3.0" in body
    status, body, h = get(port, headers={"Accept-Encoding": "gzip"})
    assert status == 200 and h.get("content-encoding") == "gzip" and b"epp_test_total 3.0" in gzip.decompress(body)
    assert get(port, "/nope")[0] == 404
    assert get(port, "/debug/pprof/")[0] == 404  # no debug routes unless --enable-pprof
    assert get(port, method="POST")[0] == 405


@pytest.fixture
def api() -> Iterator[ApiServer]:
    with ApiServer() as server:
        server.review_tokens["prom-token"] = {"username": "system:serviceaccount:monitoring:prometheus",
                                              "groups": ["system:serviceaccounts"], "uid": "u1"}
        server.review_tokens["other-token"] = {"username": "system:serviceaccount:default:other"}
        server.review_allowed.add(("system:serviceaccount:monitoring:prometheus", "/metrics", "get"))
        yield server


@pytest.fixture
def authorizer(api: ApiServer, tmp_path: Path) -> KubeAuthorizer:
    kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
    return KubeAuthorizer(KubeReviews(make_api_client(kubeconfig)))


def test_token_review_and_access_review_decide(serve, authorizer, api):
    port = serve(authorizer=authorizer)
    status, body, h = get(port)
    assert status == 401 and b"bearer token is required" in body and "www-authenticate" in h
    status, body, _ = get(port, token="wrong")
    assert status == 401 and b"invalid bearer token" in body
    status, body, _ = get(port, token="other-token")
    assert status == 403 and b"system:serviceaccount:default:other" in body and b"/metrics" in body
    status, body, _ = get(port, token="prom-token")
    assert status == 200 and b"epp_test_total 3.0" in body
    # what the picker asked: the token, then the user, groups and uid for a get on the path
    sars = [r for r in api.requests if r[1].endswith("subjectaccessreviews")]
    assert sars


def test_answers_are_cached_per_token(serve, authorizer, api):
    port = serve(authorizer=authorizer)
    for _ in range(5):
        assert get(port, token="prom-token")[0] == 200
        assert get(port, token="wrong")[0] == 401
    reviews = [r for r in api.requests if r[1].endswith("tokenreviews")]
    assert len(reviews) == 2  # one per token, then the cache answers


def test_api_server_down_is_a_clear_500_not_an_open_door(serve, authorizer, api):
    port = serve(authorizer=authorizer)
    assert get(port, token="prom-token")[0] == 200
    api.inject("POST", "tokenreviews", 503, times=2)
    status, body, _ = get(port, token="new-token")
    assert status == 500 and b"could not be checked" in body
    assert get(port, token="prom-token")[0] == 200  # still cached within its TTL
    status, _, _ = get(port, token="new-token")  # a failure is not cached: asked again
    assert status == 500 and len([r for r in api.requests if r[1].endswith("tokenreviews")]) == 3


def test_debug_routes_are_behind_the_same_auth(serve, api, tmp_path):
    import asyncio

    from epp.debug import DebugRoutes

    kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
    authorizer = KubeAuthorizer(KubeReviews(make_api_client(kubeconfig)), deny_ttl=0)  # denials not cached
    loop = asyncio.new_event_loop()
    try:
        port = serve(authorizer=authorizer, debug=DebugRoutes(loop))
        assert get(port, "/debug/pprof/")[0] == 401
        assert get(port, "/debug/pprof/", token="prom-token")[0] == 403  # RBAC grants /metrics only
        api.review_allowed.add(("system:serviceaccount:monitoring:prometheus", "/debug/pprof/", "get"))
        status, body, _ = get(port, "/debug/pprof/", token="prom-token")
        assert status == 200 and b"/debug/pprof/heap" in body
    finally:
        loop.close()


async def test_no_cluster_mode_says_once_that_auth_is_off(start_picker, caplog):
    caplog.set_level(logging.INFO)
    app, _ = await start_picker(endpoints=["127.0.0.1:9"])
    assert app.opts.metrics_endpoint_auth  # the reference's default
    assert get(app.metrics_port)[0] == 200
    off = [r for r in caplog.records if "metrics endpoint auth is off" in r.getMessage()]
    assert len(off) == 1 and "no-cluster" in off[0].getMessage()


async def test_app_with_a_kubeconfig_checks_tokens(start_picker, api, tmp_path):
    kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
    app, _ = await start_picker(endpoints=["127.0.0.1:9"], kubeconfig=kubeconfig)
    assert get(app.metrics_port)[0] == 401
    status, body, _ = get(app.metrics_port, token="prom-token")
    assert status == 200 and b"inference_extension_info" in body
    app2, _ = await start_picker(endpoints=["127.0.0.1:9"], kubeconfig=kubeconfig, metrics_endpoint_auth=False)
    assert get(app2.metrics_port)[0] == 200


def test_idle_connections_are_bounded(serve):
    import socket
    import threading

    from epp import metrics_http

    port = serve()
    before = threading.active_count()
    socks = []
    try:
        for _ in range(metrics_http.MAX_CONNECTIONS + 40):  # clients that connect and send nothing
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(s)
        # the extra connections are closed by the server: reading them ends at once
        closed = 0
        for s in socks[metrics_http.MAX_CONNECTIONS:]:
            s.settimeout(5)
            if s.recv(1) == b"":
                closed += 1
        assert closed == 40
        assert threading.active_count() <= before + metrics_http.MAX_CONNECTIONS
    finally:
        for s in socks:
            s.close()
    for _ in range(100):  # bounded: the server notices the closed sockets and frees their threads
        status = get(port)[0]
        if status == 200:
            break
    assert status == 200

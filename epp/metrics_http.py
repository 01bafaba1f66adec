"""The picker's own HTTP port: `/metrics`, and the debug routes with `--enable-pprof`.

Served on a thread pool of its own, so a scrape never waits on the event loop. With
`--metrics-endpoint-auth` (the reference's default) every request needs
`Authorization: Bearer <token>`: the token is checked with a Kubernetes TokenReview and the
user it names must be allowed `get` on the request path (a non-resource URL such as `/metrics`)
by a SubjectAccessReview, as the reference's controller-runtime filter does. Answers are cached
per token and path for a short time (allowed 60 s, denied 10 s) so Prometheus scraping every few
seconds costs the API server about one review pair a minute. 401: no or rejected token; 403: not
allowed; 500: the API server could not be asked (not cached).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from epp.debug import PREFIX as DEBUG_PREFIX
from epp.debug import DebugRoutes

log = logging.getLogger("epp.metrics_http")

ALLOW_TTL = 60.0
DENY_TTL = 10.0
CACHE_SIZE = 1024
MAX_CONCURRENT = 8  # requests served at once; more get 503 (a scrape takes milliseconds)
MAX_CONNECTIONS = 64  # open connections (one thread each); more are closed at once
_TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Verdict:
    """An auth answer: HTTP status (200 = go on) and the reason shown otherwise."""

    status: int
    reason: str = ""


class Authorizer(Protocol):
    """Decides whether a bearer token may `verb` the URL `path`."""

    def check(self, token: str, path: str, verb: str) -> Verdict: ...


class ReviewClient(Protocol):
    """The two API calls the Kubernetes authorizer makes (bodies and answers as plain dicts)."""

    def token_review(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def access_review(self, body: dict[str, Any]) -> dict[str, Any]: ...


class KubeReviews:
    """ReviewClient over a `kubernetes` ApiClient: the typed authentication/authorization v1 calls
    with plain-dict bodies, answers read raw (JSON) so client versions do not matter."""

    def __init__(self, api: Any, timeout: float = 5.0) -> None:
        from kubernetes import client

        self.authn = client.AuthenticationV1Api(api)
        self.authz = client.AuthorizationV1Api(api)
        self.timeout = timeout

    @staticmethod
    def _json(resp: Any) -> dict[str, Any]:
        try:
            data = json.loads(resp.data or b"{}")
        finally:
            resp.release_conn()
        return data if isinstance(data, dict) else {}

    def token_review(self, body: dict[str, Any]) -> dict[str, Any]:
        raw: Any = body  # the client serializes a plain dict as it is
        return self._json(self.authn.create_token_review(raw, _preload_content=False, _request_timeout=self.timeout))

    def access_review(self, body: dict[str, Any]) -> dict[str, Any]:
        raw: Any = body
        return self._json(self.authz.create_subject_access_review(raw, _preload_content=False,
                                                                  _request_timeout=self.timeout))


class KubeAuthorizer:
    """TokenReview, then SubjectAccessReview for the non-resource URL; answers cached per token+path."""

    def __init__(self, reviews: ReviewClient, *, allow_ttl: float = ALLOW_TTL, deny_ttl: float = DENY_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.reviews = reviews
        self.allow_ttl = allow_ttl
        self.deny_ttl = deny_ttl
        self.clock = clock
        self._cache: OrderedDict[tuple[str, str, str], tuple[float, Verdict]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, token: str, path: str, verb: str) -> Verdict:
        if not token:
            return Verdict(401, "Unauthorized: a bearer token is required")
        key = (hashlib.sha256(token.encode()).hexdigest(), path, verb)
        now = self.clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        try:
            verdict = self._review(token, path, verb)
        except Exception as e:  # the API server is down or refused us: say so, do not cache
            log.warning("metrics auth: review failed", extra={"error": str(e)})
            return Verdict(500, f"authentication/authorization could not be checked: {type(e).__name__}")
        with self._lock:
            self._cache[key] = (now + (self.allow_ttl if verdict.status == 200 else self.deny_ttl), verdict)
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return verdict

    def _review(self, token: str, path: str, verb: str) -> Verdict:
        tr = self.reviews.token_review({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                        "spec": {"token": token}})
        st = tr.get("status") or {}
        if not st.get("authenticated"):
            return Verdict(401, "Unauthorized: " + (st.get("error") or "the token was not accepted"))
        user = st.get("user") or {}
        spec: dict[str, Any] = {"user": user.get("username", ""), "groups": user.get("groups") or [],
                                "nonResourceAttributes": {"path": path, "verb": verb}}
        if user.get("uid"):
            spec["uid"] = user["uid"]
        if user.get("extra"):
            spec["extra"] = user["extra"]
        sar = self.reviews.access_review({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                                          "spec": spec})
        sst = sar.get("status") or {}
        if not sst.get("allowed"):
            why = sst.get("reason") or "no RBAC rule allows it"
            return Verdict(403, f'Forbidden: user "{spec["user"]}" may not {verb} {path}: {why}')
        return Verdict(200)


class MetricsServer:
    """`/metrics` from `registry` (gzip when asked), debug routes when given, auth when given."""

    def __init__(self, registry: CollectorRegistry, *, authorizer: Authorizer | None = None,
                 debug: DebugRoutes | None = None, max_concurrent: int = MAX_CONCURRENT,
                 peers: Callable[[], list[str]] | None = None) -> None:
        """`peers` (--workers, worker 0): the other workers' pages, merged into this one's."""
        self.registry = registry
        self.peers = peers
        self.authorizer = authorizer
        self.debug = debug
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, port: int, addr: str = "0.0.0.0") -> int:
        """Listen and serve on a daemon thread; returns the bound port."""
        server = _Server((addr, port), _handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    # ---- one request (on a server thread) ---------------------------------------------------
    def respond(self, method: str, target: str, headers: Any) -> tuple[int, str, bytes, dict[str, str]]:
        """(status, content type, body, extra headers) for one request."""
        parts = urlsplit(target)
        path = parts.path or "/"
        if path == "/metrics":
            route = "metrics"
        elif self.debug is not None and (path == DEBUG_PREFIX or path.startswith(DEBUG_PREFIX + "/")):
            route = "debug"
        else:
            return 404, _TEXT, b"not found; try /metrics\n", {}
        if method != "GET":
            return 405, _TEXT, b"only GET\n", {"Allow": "GET"}
        if self.authorizer is not None:
            auth = headers.get("Authorization") or ""
            scheme, _, token = auth.partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else ""
            verdict = self.authorizer.check(token, path, "get")
            if verdict.status != 200:
                extra = {"WWW-Authenticate": 'Bearer realm="epp"'} if verdict.status == 401 else {}
                return verdict.status, _TEXT, (verdict.reason + "\n").encode(), extra
        if route == "debug":
            assert self.debug is not None
            status, text = self.debug.handle(path, parts.query)
            return status, _TEXT, text.encode(), {}
        body = generate_latest(self.registry)
        pages = self.peers() if self.peers is not None else []
        if pages:
            from epp.metrics_merge import merge

            body = merge([body.decode("utf-8"), *pages])
        if "gzip" in (headers.get("Accept-Encoding") or ""):
            return 200, CONTENT_TYPE_LATEST, gzip.compress(body, compresslevel=1), {"Content-Encoding": "gzip"}
        return 200, CONTENT_TYPE_LATEST, body, {}


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most MAX_CONNECTIONS of them: idle or slow clients cannot make
    the process start threads without bound."""

    allow_reuse_address = True
    request_queue_size = 128  # listen backlog: a burst of scrapes is queued, not dropped (SYN retries take 1 s)
    max_connections = MAX_CONNECTIONS

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._active = 0
        self._active_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            full = self._active >= self.max_connections
            if not full:
                self._active += 1
        if full:
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:  # a client that went away
        log.debug("metrics request failed", exc_info=True)


def _handler(owner: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30  # a client that sends nothing does not hold a thread forever

        def log_message(self, format: str, *args: Any) -> None:  # per-request logs stay out of INFO
            pass

        def _serve(self, method: str) -> None:
            if method != "GET":
                self.close_connection = True  # a body we do not read must not be taken for the next request
            if not owner._slots.acquire(blocking=False):
                self._send(503, _TEXT, b"too many concurrent requests\n", {"Retry-After": "1"})
                return
            try:
                try:
                    reply = owner.respond(method, self.path, self.headers)
                except Exception:
                    log.exception("metrics request failed")
                    reply = (500, _TEXT, b"internal error\n", {})
                self._send(*reply)
            finally:
                owner._slots.release()

        def _send(self, status: int, ctype: str, body: bytes, extra: dict[str, str]) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_HEAD(self) -> None:
            self._serve("GET")  # _send leaves the body out

        def do_POST(self) -> None:
            self._serve("POST")

    return Handler

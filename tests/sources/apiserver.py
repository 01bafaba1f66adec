"""A small Kubernetes API-server emulator over real HTTP, for driving the official client in tests.

It behaves like kube-apiserver where the picker's watches and leader election depend on it:
- one global resourceVersion counter; every write bumps it and stamps metadata.resourceVersion,
  uid, creationTimestamp and (for spec changes) metadata.generation;
- list (with label/field selectors, limit/continue paging) returns the collection's resourceVersion;
- watch (`watch=true`, also `True`/`1`/`t` as Go's ParseBool accepts) streams JSON lines in HTTP/1.1
  chunks, replays history after the given resourceVersion, translates label-selector moves into
  ADDED/DELETED (like the watch cache), sends BOOKMARKs when asked for them, honours timeoutSeconds,
  and answers a compacted resourceVersion with an ERROR event carrying a 410 Status (or, optionally,
  an HTTP 410 before the stream starts);
- custom resources under /apis/<group>/<version>/namespaces/<ns>/<plural>, pods under
  /api/v1/namespaces/<ns>/pods; a CRD served in several versions shares one storage (the served
  apiVersion is rewritten, as with conversion strategy None); unknown group/version/plural → 404;
- the status subresource (PATCH merge-patch / PUT) changes only .status; the main resource ignores
  .status on update; leases support create (409 AlreadyExists) and PUT with resourceVersion (409 Conflict).

Test controls: create/update/patch/delete objects directly, `compact()` (older resourceVersions
expire), `drop_watches()` (close streams mid-way without the terminating chunk), `expire_watches()`
(ERROR 410 on open streams), `bookmark()`, `hold_watches()` / `release_watches()` (new watch requests
wait, so changes can be made while a client is disconnected), `inject()` error responses.
"""

from __future__ import annotations

import base64
import copy
import json
import queue
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

GROUP_V1 = "inference.networking.k8s.io"
GROUP_X = "inference.networking.x-k8s.io"

_TRUE = {"true", "True", "TRUE", "1", "t", "T"}  # strconv.ParseBool
_DROP = object()  # watch queue sentinel: close the connection abruptly
_END = object()  # watch queue sentinel: end the stream cleanly


@dataclass(frozen=True, slots=True)
class ResourceType:
    """One served resource: (group, plural) with its kind and served versions."""

    group: str
    plural: str
    kind: str
    versions: tuple[str, ...]
    status: bool = False  # has a status subresource

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version


DEFAULT_TYPES = (
    ResourceType("", "pods", "Pod", ("v1",), status=True),
    ResourceType("coordination.k8s.io", "leases", "Lease", ("v1",)),
    ResourceType(GROUP_V1, "inferencepools", "InferencePool", ("v1",), status=True),
    ResourceType(GROUP_X, "inferencepools", "InferencePool", ("v1alpha2",), status=True),
    ResourceType(GROUP_X, "inferencemodels", "InferenceModel", ("v1alpha1", "v1alpha2"), status=True),
    ResourceType(GROUP_X, "inferencemodelrewrites", "InferenceModelRewrite", ("v1alpha2",)),
    ResourceType(GROUP_V1, "inferencemodelrewrites", "InferenceModelRewrite", ("v1alpha2",)),
    ResourceType(GROUP_X, "inferenceobjectives", "InferenceObjective", ("v1alpha2",)),
    ResourceType(GROUP_V1, "inferenceobjectives", "InferenceObjective", ("v1alpha2",)),
)

POD_FIELDS = {
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
}


# ---- selectors ---------------------------------------------------------------------------------
def _split_terms(text: str) -> list[str]:
    """Split a selector on commas that are not inside `in (...)` sets."""
    terms, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    terms.append("".join(cur).strip())
    return [t for t in terms if t]


_SET_TERM = re.compile(r"^([^\s!=()]+)\s+(in|notin)\s+\(([^)]*)\)$")


def label_matcher(text: str) -> Callable[[dict[str, str]], bool]:
    """Compile a label selector (=, ==, !=, in, notin, exists, !exists); ValueError on bad syntax."""
    checks: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_terms(text or ""):
        m = _SET_TERM.match(term)
        if m:
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in":
                checks.append(lambda lb, k=key, vs=vals: lb.get(k) in vs)
            else:
                checks.append(lambda lb, k=key, vs=vals: lb.get(k) not in vs)
            continue
        for op in ("!=", "==", "="):
            if op in term:
                key, _, val = term.partition(op)
                key, val = key.strip(), val.strip()
                if not key:
                    raise ValueError(f"bad label selector term {term!r}")
                if op == "!=":
                    checks.append(lambda lb, k=key, v=val: lb.get(k) != v)
                else:
                    checks.append(lambda lb, k=key, v=val: lb.get(k) == v)
                break
        else:
            if term.startswith("!"):
                checks.append(lambda lb, k=term[1:].strip(): k not in lb)
            elif re.fullmatch(r"[A-Za-z0-9./_-]+", term):
                checks.append(lambda lb, k=term: k in lb)
            else:
                raise ValueError(f"bad label selector term {term!r}")
    return lambda labels: all(c(labels) for c in checks)


def _dig(obj: dict[str, Any], dotted: str) -> str:
    cur: Any = obj
    for part in dotted.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return "" if cur is None else str(cur)


def field_matcher(text: str, allowed: set[str]) -> Callable[[dict[str, Any]], bool]:
    """Compile a field selector; only `allowed` fields (plus metadata.name/namespace) are accepted."""
    checks: list[Callable[[dict[str, Any]], bool]] = []
    for term in _split_terms(text or ""):
        for op in ("!=", "==", "="):
            if op in term:
                key, _, val = term.partition(op)
                key, val = key.strip(), val.strip()
                break
        else:
            raise ValueError(f"invalid field selector term {term!r}")
        if key not in allowed and key not in ("metadata.name", "metadata.namespace"):
            raise ValueError(f'field label not supported: "{key}"')
        if op == "!=":
            checks.append(lambda o, k=key, v=val: _dig(o, k) != v)
        else:
            checks.append(lambda o, k=key, v=val: _dig(o, k) == v)
    return lambda obj: all(c(obj) for c in checks)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def strategic_merge(target: Any, patch: Any) -> Any:
    """Merge patch where `conditions` lists merge by `type`, as strategic merge does for them."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif k == "conditions" and isinstance(v, list) and isinstance(out.get(k), list):
            merged = {c.get("type"): dict(c) for c in out[k] if isinstance(c, dict)}
            for c in v:
                merged[c.get("type")] = {**merged.get(c.get("type"), {}), **c}
            out[k] = list(merged.values())
        else:
            out[k] = strategic_merge(out.get(k), v)
    return out


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


# ---- watchers ----------------------------------------------------------------------------------
@dataclass(eq=False)
class _Watcher:
    rtype: ResourceType
    version: str
    namespace: str | None
    labels: Callable[[dict[str, str]], bool]
    fields: Callable[[dict[str, Any]], bool]
    bookmarks: bool
    path: str
    q: queue.Queue[Any] = field(default_factory=queue.Queue)

    def matches(self, obj: dict[str, Any] | None) -> bool:
        if obj is None:
            return False
        md = obj.get("metadata", {})
        if self.namespace is not None and md.get("namespace") != self.namespace:
            return False
        return self.labels(md.get("labels") or {}) and self.fields(obj)


@dataclass(frozen=True, slots=True)
class _Change:
    rv: int
    rtype: ResourceType
    type: str  # ADDED | MODIFIED | DELETED
    old: dict[str, Any] | None
    new: dict[str, Any]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up (watch stopped, socket shut down) are normal here


class ApiServer:
    """The emulator. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        types: tuple[ResourceType, ...] = DEFAULT_TYPES,
        token: str = "test-token",
        watch_410_as_http: bool = False,
        bookmark_interval: float | None = None,
        kubelet: bool = False,
    ) -> None:
        self.types = {(t.group, t.plural): t for t in types}
        self.token = token
        self.watch_410_as_http = watch_410_as_http  # answer a too-old watch RV with HTTP 410 instead of an event
        self.bookmark_interval = bookmark_interval
        self.chunked_watch = True  # False: watch bodies end by closing the connection (no chunking)
        self.kubelet = kubelet  # pods created over HTTP get an IP; Ready follows their readiness gates
        self._next_ip = 0
        self.namespaces: set[str] = {"default"}
        self.lock = threading.RLock()
        self.rv = 1
        self.compacted_rv = 0
        self.objects: dict[tuple[str, str], dict[tuple[str, str], dict[str, Any]]] = {}
        self.history: list[_Change] = []
        self.watchers: set[_Watcher] = set()
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self._injected: list[list[Any]] = []  # [method, regex, status, remaining]
        self._watch_gate = threading.Event()
        self._watch_gate.set()
        self.on_sent: Callable[[str, dict[str, Any], float], None] | None = None  # (event type, object, t)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # TokenReview / SubjectAccessReview: token -> user info ({"username", "groups", "uid"}), and
        # the (username, non-resource path, verb) triples RBAC allows
        self.review_tokens: dict[str, dict[str, Any]] = {}
        self.review_allowed: set[tuple[str, str, str]] = set()

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> str:
        server = _QuietServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="apiserver-emulator",
            daemon=True,
        )
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._watch_gate.set()
        with self.lock:
            for w in list(self.watchers):
                w.q.put(_DROP)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "tester", "namespace": namespace},
                }
            ],
        }
        path.write_text(yaml.safe_dump(cfg))
        return path

    # ---- storage -----------------------------------------------------------------------------
    def _type_for(self, obj: dict[str, Any]) -> ResourceType:
        api_version, kind = obj["apiVersion"], obj["kind"]
        group = api_version.rpartition("/")[0]
        for t in self.types.values():
            if t.group == group and t.kind == kind:
                return t
        raise KeyError(f"no served resource for {api_version} {kind}")

    def _commit(self, rtype: ResourceType, type_: str, old: dict[str, Any] | None, new: dict[str, Any]) -> int:
        """Record a change (lock held) and fan it out to watchers."""
        self.rv += 1
        new["metadata"]["resourceVersion"] = str(self.rv)
        store = self.objects.setdefault((rtype.group, rtype.plural), {})
        key = (new["metadata"].get("namespace", ""), new["metadata"]["name"])
        if type_ == "DELETED":
            store.pop(key, None)
        else:
            store[key] = new
        change = _Change(self.rv, rtype, type_, copy.deepcopy(old), copy.deepcopy(new))
        self.history.append(change)
        for w in self.watchers:
            if w.rtype is rtype:
                ev = _translate(w, change)
                if ev is not None:
                    w.q.put(ev)
        return self.rv

    def create(self, obj: dict[str, Any], *, exist_ok: bool = False) -> dict[str, Any]:
        """Create an object (test control and POST). Raises KeyError if it exists."""
        with self.lock:
            rtype = self._type_for(obj)
            obj = copy.deepcopy(obj)
            md = obj.setdefault("metadata", {})
            md.setdefault("namespace", "default")
            key = (md["namespace"], md["name"])
            if key in self.objects.get((rtype.group, rtype.plural), {}):
                if exist_ok:
                    return self.update(obj)
                raise KeyError(f"{rtype.plural} {md['name']!r} already exists")
            md["uid"] = str(uuid.uuid4())
            md.setdefault("creationTimestamp", _now())
            md["generation"] = 1
            md.pop("resourceVersion", None)
            self._commit(rtype, "ADDED", None, obj)
            return copy.deepcopy(obj)

    def get(self, api_version: str, kind: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        with self.lock:
            rtype = self._type_for({"apiVersion": api_version, "kind": kind})
            obj = self.objects.get((rtype.group, rtype.plural), {}).get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def update(self, obj: dict[str, Any], *, status: bool = False, raw: bool = False) -> dict[str, Any]:
        """Replace an object like PUT does (status=True: only .status, like PUT .../status).

        A main-resource update keeps the stored status when the resource has a status subresource,
        and keeps the system metadata. `raw=True` (test control) also takes status and
        deletionTimestamp from `obj`. Raises KeyError when the object is missing.
        """
        with self.lock:
            rtype = self._type_for(obj)
            md = obj.get("metadata", {})
            ns = md.get("namespace", "default")
            cur = self.objects.get((rtype.group, rtype.plural), {}).get((ns, md["name"]))
            if cur is None:
                raise KeyError(f"{rtype.plural} {md['name']!r} not found")
            if status:
                new = copy.deepcopy(cur)
                new["status"] = copy.deepcopy(obj.get("status"))
            else:
                new = copy.deepcopy(obj)
                if rtype.status and not raw:
                    new.pop("status", None)
                    if cur.get("status") is not None:
                        new["status"] = copy.deepcopy(cur["status"])
                nmd = new.setdefault("metadata", {})
                for k in ("name", "namespace", "uid", "creationTimestamp", "generation"):
                    if k in cur["metadata"]:
                        nmd[k] = cur["metadata"][k]
                if not raw:
                    nmd.pop("deletionTimestamp", None)
                    if "deletionTimestamp" in cur["metadata"]:
                        nmd["deletionTimestamp"] = cur["metadata"]["deletionTimestamp"]
                if new.get("spec") != cur.get("spec"):
                    nmd["generation"] = cur["metadata"].get("generation", 1) + 1
            new["apiVersion"], new["kind"] = cur["apiVersion"], cur["kind"]
            self._commit(rtype, "MODIFIED", cur, new)
            return copy.deepcopy(new)

    def patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        patch: dict[str, Any],
        namespace: str = "default",
        *,
        status: bool = False,
        raw: bool = False,
    ) -> dict[str, Any]:
        """Merge-patch an object (test control); `raw` lets the patch touch status and deletionTimestamp."""
        with self.lock:
            rtype = self._type_for({"apiVersion": api_version, "kind": kind})
            cur = self.objects.get((rtype.group, rtype.plural), {}).get((namespace, name))
            if cur is None:
                raise KeyError(f"{rtype.plural} {name!r} not found")
            merged = merge_patch(cur, patch)
            return self.update(merged, status=status, raw=raw)

    def set_pod_ready(self, name: str, ready: bool, namespace: str = "default") -> dict[str, Any]:
        """What the kubelet does: flip the Ready condition through the status subresource."""
        return self.patch(
            "v1",
            "Pod",
            name,
            {"status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}},
            namespace,
            status=True,
        )

    def delete(self, api_version: str, kind: str, name: str, namespace: str = "default") -> bool:
        with self.lock:
            rtype = self._type_for({"apiVersion": api_version, "kind": kind})
            cur = self.objects.get((rtype.group, rtype.plural), {}).get((namespace, name))
            if cur is None:
                return False
            self._commit(rtype, "DELETED", cur, copy.deepcopy(cur))
            return True

    # ---- controls ----------------------------------------------------------------------------
    def compact(self) -> None:
        """Forget history: watches from any resourceVersion before now get 410 Gone."""
        with self.lock:
            self.compacted_rv = self.rv
            self.history.clear()

    def drop_watches(self) -> int:
        """Close every open watch stream abruptly (no terminating chunk). Returns how many."""
        with self.lock:
            for w in self.watchers:
                w.q.put(_DROP)
            return len(self.watchers)

    def end_watches(self) -> int:
        """End every open watch stream cleanly, as when timeoutSeconds expires."""
        with self.lock:
            for w in self.watchers:
                w.q.put(_END)
            return len(self.watchers)

    def expire_watches(self) -> int:
        """Compact and send ERROR 410 on every open stream (etcd compaction under a watcher)."""
        with self.lock:
            self.compact()
            err = {"type": "ERROR", "object": status_body(410, "Expired", "too old resource version")}
            for w in self.watchers:
                w.q.put(err)
                w.q.put(_END)
            return len(self.watchers)

    def bookmark(self) -> None:
        """Send a BOOKMARK with the current resourceVersion to watchers that asked for bookmarks."""
        with self.lock:
            for w in self.watchers:
                if w.bookmarks:
                    w.q.put(_bookmark(w, self.rv))

    def hold_watches(self) -> None:
        """New watch requests wait (connection open, no answer) until release_watches()."""
        self._watch_gate.clear()

    def release_watches(self) -> None:
        self._watch_gate.set()

    def inject(self, method: str, path_regex: str, status: int, times: int = 1, reason: str = "InternalError") -> None:
        """Answer the next `times` matching requests with an error Status."""
        with self.lock:
            self._injected.append([method.upper(), re.compile(path_regex), status, times, reason])

    def clear_injected(self) -> None:
        with self.lock:
            self._injected.clear()

    def watch_count(self, path_contains: str = "") -> int:
        with self.lock:
            return sum(1 for w in self.watchers if path_contains in w.path)

    def requests_to(self, path_contains: str, *, watch: bool | None = None) -> list[dict[str, list[str]]]:
        """Query strings of requests whose path contains `path_contains` (optionally only watches)."""
        with self.lock:
            out = []
            for _m, p, q in self.requests:
                is_watch = q.get("watch", ["false"])[0] in _TRUE
                if path_contains in p and (watch is None or watch == is_watch):
                    out.append(q)
            return out

    def _take_injected(self, method: str, path: str) -> tuple[int, str] | None:
        with self.lock:
            for inj in self._injected:
                if inj[0] in (method, "*") and inj[1].search(path) and inj[3] > 0:
                    inj[3] -= 1
                    return inj[2], inj[4]
            return None


def _kubelet_ready(pod: dict[str, Any]) -> None:
    """Ready = every readiness gate's condition is True (the containers are taken to be ready)."""
    status = pod.setdefault("status", {}) or {}
    pod["status"] = status
    conds = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"]
    by_type = {c.get("type"): c.get("status") for c in conds}
    gates = [g.get("conditionType") for g in (pod.get("spec") or {}).get("readinessGates") or []]
    ready = all(by_type.get(g) == "True" for g in gates)
    conds.append({"type": "Ready", "status": "True" if ready else "False"})
    status["conditions"] = conds


def _bookmark(w: _Watcher, rv: int) -> dict[str, Any]:
    return {
        "type": "BOOKMARK",
        "object": {
            "kind": w.rtype.kind,
            "apiVersion": w.rtype.api_version(w.version),
            "metadata": {"resourceVersion": str(rv)},
        },
    }


def _served(obj: dict[str, Any], rtype: ResourceType, version: str) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["apiVersion"] = rtype.api_version(version)
    out["kind"] = rtype.kind
    return out


def _translate(w: _Watcher, ch: _Change) -> dict[str, Any] | None:
    """A change as this watcher sees it: selector moves become ADDED / DELETED (watch-cache rules)."""
    if w.rtype is not ch.rtype:
        return None
    old_in = w.matches(ch.old) if ch.old is not None else False
    new_in = w.matches(ch.new)
    if ch.type == "DELETED":
        typ = "DELETED" if new_in or old_in else None
    elif ch.type == "ADDED":
        typ = "ADDED" if new_in else None
    elif old_in and new_in:
        typ = "MODIFIED"
    elif new_in:
        typ = "ADDED"
    elif old_in:
        typ = "DELETED"
    else:
        typ = None
    if typ is None:
        return None
    return {"type": typ, "object": _served(ch.new, w.rtype, w.version)}


_NAMESPACES = re.compile(r"^/api/v1/namespaces(?:/([^/]+))?$")
_REVIEW_PATHS = ("/apis/authentication.k8s.io/v1/tokenreviews", "/apis/authorization.k8s.io/v1/subjectaccessreviews")
_CORE = re.compile(r"^/api/v1/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?(?:/([^/]+))?$")
_GROUP = re.compile(r"^/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?(?:/([^/]+))?$")


def _make_handler(api: ApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # Headers and body go out in separate writes; without this Nagle + delayed ACK add 40 ms.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        # ---- plumbing ----------------------------------------------------------------------
        def _send_json(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, reason: str, message: str) -> None:
            self._send_json(code, status_body(code, reason, message))

        def _read_body(self) -> Any:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            return json.loads(raw) if raw else None

        def _body(self) -> Any:
            return self._req_body

        def _namespaces(self, method: str, name: str | None) -> None:
            """Namespaces, enough for a test to make and remove its own (deleting removes its objects)."""
            if method == "POST" and name is None:
                ns = (self._body() or {}).get("metadata", {}).get("name")
                if not ns:
                    self._error(422, "Invalid", "metadata.name: Required value")
                    return
                with api.lock:
                    if ns in api.namespaces:
                        self._error(409, "AlreadyExists", f'namespaces "{ns}" already exists')
                        return
                    api.namespaces.add(ns)
                body = {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": ns},
                    "status": {"phase": "Active"},
                }
                self._send_json(201, body)
            elif method == "DELETE" and name is not None:
                with api.lock:
                    api.namespaces.discard(name)
                    for (group, plural), store in api.objects.items():
                        rtype = api.types[(group, plural)]
                        for key, obj in list(store.items()):
                            if key[0] == name:
                                api._commit(rtype, "DELETED", obj, copy.deepcopy(obj))
                body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
                self._send_json(200, body)
            else:
                self._error(405, "MethodNotAllowed", f"{method} is not supported here")

        def _route(self) -> tuple[ResourceType, str, str, str | None, str | None] | None:
            path = urlsplit(self.path).path
            m = _CORE.match(path)
            if m:
                group, version, ns, plural, name, sub = (
                    "",
                    "v1",
                    m.group(1),
                    m.group(2),
                    m.group(3),
                    m.group(4),
                )
            else:
                m = _GROUP.match(path)
                if not m:
                    return None
                group, version, ns, plural, name, sub = m.groups()
            rtype = api.types.get((group, plural))
            if rtype is None or version not in rtype.versions:
                return None
            return rtype, version, ns, name, sub

        def _handle(self, method: str) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            with api.lock:
                api.requests.append((method, parts.path, query))
            try:  # read any body first (DELETE carries DeleteOptions): keep-alive needs it consumed
                self._req_body = self._read_body()
            except ValueError:
                self._error(400, "BadRequest", "request body is not JSON")
                return
            if self.headers.get("Authorization") != f"Bearer {api.token}":
                self._error(401, "Unauthorized", "Unauthorized")
                return
            inj = api._take_injected(method, parts.path)
            if inj is not None:
                self._error(inj[0], inj[1], f"injected {inj[0]}")
                return
            if method == "POST" and parts.path in _REVIEW_PATHS:
                self._review(parts.path, self._body())
                return
            if _NAMESPACES.match(parts.path):
                self._namespaces(method, _NAMESPACES.match(parts.path).group(1))  # type: ignore[union-attr]
                return
            route = self._route()
            if route is None:
                self._error(404, "NotFound", "the server could not find the requested resource")
                return
            rtype, version, ns, name, sub = route
            if sub is not None and (sub != "status" or not rtype.status):
                self._error(404, "NotFound", "the server could not find the requested resource")
                return
            q1 = {k: v[0] for k, v in query.items()}
            if method == "GET" and name is None:
                if q1.get("watch", "false") in _TRUE:
                    self._watch(rtype, version, ns, q1)
                else:
                    self._list(rtype, version, ns, q1)
            elif method == "GET":
                obj = api.objects.get((rtype.group, rtype.plural), {}).get((ns, name))
                if obj is None:
                    self._error(404, "NotFound", f'{rtype.plural} "{name}" not found')
                else:
                    self._send_json(200, _served(obj, rtype, version))
            elif method == "POST" and name is None:
                self._create(rtype, version, ns, self._body())
            elif method in ("PUT", "PATCH") and name is not None:
                self._write(method, rtype, version, ns, name, sub == "status", self._body())
            elif method == "DELETE" and name is not None:
                with api.lock:
                    cur = api.objects.get((rtype.group, rtype.plural), {}).get((ns, name))
                    if cur is None:
                        self._error(404, "NotFound", f'{rtype.plural} "{name}" not found')
                        return
                    api._commit(rtype, "DELETED", cur, copy.deepcopy(cur))
                self._send_json(200, _served(cur, rtype, version))
            else:
                self._error(405, "MethodNotAllowed", f"{method} is not supported here")

        do_GET = lambda self: self._handle("GET")  # noqa: E731
        do_POST = lambda self: self._handle("POST")  # noqa: E731
        do_PUT = lambda self: self._handle("PUT")  # noqa: E731
        do_PATCH = lambda self: self._handle("PATCH")  # noqa: E731
        do_DELETE = lambda self: self._handle("DELETE")  # noqa: E731

        def _review(self, path: str, body: Any) -> None:
            spec = body.get("spec") if isinstance(body, dict) else None
            if not isinstance(spec, dict):
                self._error(400, "BadRequest", "spec is required")
                return
            out = copy.deepcopy(body)
            if path.endswith("tokenreviews"):
                user = api.review_tokens.get(str(spec.get("token", "")))
                out["status"] = ({"authenticated": True, "user": user} if user is not None
                                 else {"authenticated": False, "error": "invalid bearer token"})
            else:
                nra = spec.get("nonResourceAttributes") or {}
                allowed = (spec.get("user"), nra.get("path"), nra.get("verb")) in api.review_allowed
                out["status"] = {"allowed": allowed, **({} if allowed else {"reason": "no matching rule"})}
            self._send_json(201, out)

        # ---- verbs -------------------------------------------------------------------------
        def _selectors(self, rtype: ResourceType, q: dict[str, str]) -> tuple[Any, Any] | None:
            try:
                lab = label_matcher(q.get("labelSelector", ""))
                fld = field_matcher(q.get("fieldSelector", ""), POD_FIELDS if rtype.plural == "pods" else set())
            except ValueError as e:
                self._error(400, "BadRequest", str(e))
                return None
            return lab, fld

        def _list(self, rtype: ResourceType, version: str, ns: str, q: dict[str, str]) -> None:
            sel = self._selectors(rtype, q)
            if sel is None:
                return
            w = _Watcher(rtype, version, ns, sel[0], sel[1], False, "")
            with api.lock:
                rv = api.rv
                items = sorted(
                    (o for o in api.objects.get((rtype.group, rtype.plural), {}).values() if w.matches(o)),
                    key=lambda o: o["metadata"]["name"],
                )
                items = [_served(o, rtype, version) for o in items]
            if not rtype.group:  # items of built-in lists carry no kind/apiVersion
                for o in items:
                    o.pop("kind", None)
                    o.pop("apiVersion", None)
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            cont = q.get("continue")
            if cont:
                try:
                    tok = json.loads(base64.urlsafe_b64decode(cont.encode()))
                except ValueError:
                    self._error(400, "BadRequest", "invalid continue token")
                    return
                if tok["rv"] < api.compacted_rv:
                    self._error(410, "Expired", "The provided continue parameter is too old")
                    return
                items = [o for o in items if o["metadata"]["name"] > tok["after"]]
                meta["resourceVersion"] = str(tok["rv"])
            limit = int(q.get("limit") or 0)
            if limit and len(items) > limit:
                items = items[:limit]
                tok = {"rv": int(meta["resourceVersion"]), "after": items[-1]["metadata"]["name"]}
                meta["continue"] = base64.urlsafe_b64encode(json.dumps(tok).encode()).decode()
                meta["remainingItemCount"] = 0
            self._send_json(
                200,
                {
                    "kind": f"{rtype.kind}List",
                    "apiVersion": rtype.api_version(version),
                    "metadata": meta,
                    "items": items,
                },
            )

        def _watch(self, rtype: ResourceType, version: str, ns: str, q: dict[str, str]) -> None:
            sel = self._selectors(rtype, q)
            if sel is None:
                return
            while not api._watch_gate.wait(0.05):
                pass
            w = _Watcher(
                rtype,
                version,
                ns,
                sel[0],
                sel[1],
                q.get("allowWatchBookmarks") in _TRUE,
                urlsplit(self.path).path,
            )
            rv_param = q.get("resourceVersion", "")
            with api.lock:
                if rv_param not in ("", "0"):
                    try:
                        since = int(rv_param)
                    except ValueError:
                        self._error(400, "BadRequest", f"invalid resource version {rv_param!r}")
                        return
                    if since < api.compacted_rv:
                        if api.watch_410_as_http:
                            self._error(410, "Expired", f"too old resource version: {since} ({api.compacted_rv})")
                            return
                        w.q.put(
                            {
                                "type": "ERROR",
                                "object": status_body(
                                    410, "Expired", f"too old resource version: {since} ({api.compacted_rv})"
                                ),
                            }
                        )
                        w.q.put(_END)
                    else:
                        for ch in api.history:
                            if ch.rv > since:
                                ev = _translate(w, ch)
                                if ev is not None:
                                    w.q.put(ev)
                else:  # no resourceVersion: synthetic ADDED for the current state, then live
                    for o in api.objects.get((rtype.group, rtype.plural), {}).values():
                        if w.matches(o):
                            w.q.put({"type": "ADDED", "object": _served(o, rtype, version)})
                api.watchers.add(w)
            try:
                self._stream(w, float(q.get("timeoutSeconds") or 1800))
            finally:
                with api.lock:
                    api.watchers.discard(w)

        def _stream(self, w: _Watcher, timeout: float) -> None:
            chunked = api.chunked_watch
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:  # a body delimited by closing the connection, as some proxies relay it
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.flush()
            deadline = time.monotonic() + timeout
            next_bookmark = (time.monotonic() + api.bookmark_interval) if api.bookmark_interval else None
            while True:
                now = time.monotonic()
                wait = deadline - now
                if next_bookmark is not None:
                    wait = min(wait, next_bookmark - now)
                if wait <= 0:
                    if now >= deadline:
                        break
                    if w.bookmarks:
                        with api.lock:
                            w.q.put(_bookmark(w, api.rv))
                    next_bookmark = now + (api.bookmark_interval or 0)
                    continue
                try:
                    item = w.q.get(timeout=min(wait, 0.05))
                except queue.Empty:
                    if self._client_gone():
                        self.close_connection = True
                        return
                    continue
                if item is _DROP:
                    self.close_connection = True
                    with suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if item is _END:
                    break
                data = (json.dumps(item) + "\n").encode()
                try:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                    self.wfile.flush()
                except OSError:
                    self.close_connection = True
                    return
                if api.on_sent is not None:
                    api.on_sent(item["type"], item["object"], time.perf_counter())
            with suppress(OSError):
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        def _client_gone(self) -> bool:
            """The client hung up (a real server notices through its HTTP/2 stream context)."""
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def _create(self, rtype: ResourceType, version: str, ns: str, body: Any) -> None:
            if not isinstance(body, dict) or not body.get("metadata", {}).get("name"):
                self._error(422, "Invalid", "metadata.name: Required value")
                return
            body["metadata"]["namespace"] = ns
            body["apiVersion"], body["kind"] = rtype.api_version(version), rtype.kind
            if api.kubelet and rtype.plural == "pods":
                with api.lock:
                    api._next_ip += 1
                    n = api._next_ip
                body["status"] = {"phase": "Running", "podIP": f"10.244.{n >> 8}.{n & 255}", "conditions": []}
                _kubelet_ready(body)
            try:
                created = api.create(body)
            except KeyError:
                self._error(409, "AlreadyExists", f'{rtype.plural} "{body["metadata"]["name"]}" already exists')
                return
            self._send_json(201, _served(created, rtype, version))

        def _write(
            self, method: str, rtype: ResourceType, version: str, ns: str, name: str, status: bool, body: Any
        ) -> None:
            if not isinstance(body, dict):
                self._error(400, "BadRequest", "expected a JSON object")
                return
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if method == "PATCH" and ctype not in (
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
            ):
                self._error(415, "UnsupportedMediaType", f"patch type {ctype!r} is not supported here")
                return
            with api.lock:
                cur = api.objects.get((rtype.group, rtype.plural), {}).get((ns, name))
                if cur is None:
                    self._error(404, "NotFound", f'{rtype.plural} "{name}" not found')
                    return
                want_rv = (body.get("metadata") or {}).get("resourceVersion")
                if want_rv and want_rv != cur["metadata"]["resourceVersion"]:
                    self._error(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on {rtype.plural} "{name}": '
                        "the object has been modified; please apply your changes to the latest version "
                        "and try again",
                    )
                    return
                if method == "PATCH":
                    merge = strategic_merge if ctype == "application/strategic-merge-patch+json" else merge_patch
                    new = merge(cur, body)
                else:
                    new = copy.deepcopy(body)
                new.setdefault("metadata", {})
                new["metadata"]["name"], new["metadata"]["namespace"] = name, ns
                new["apiVersion"], new["kind"] = cur["apiVersion"], rtype.kind
                if api.kubelet and rtype.plural == "pods":
                    _kubelet_ready(new)
                out = api.update(new, status=status)
            self._send_json(200, _served(out, rtype, version))

    return Handler


# ---- object builders for tests and benchmarks --------------------------------------------------
def pod(
    name: str,
    ip: str | None,
    labels: dict[str, str],
    *,
    ready: bool = True,
    namespace: str = "default",
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Pod as the API server would hold it (Running, with a Ready condition)."""
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
    md: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if annotations:
        md["annotations"] = dict(annotations)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": md,
        "spec": {"containers": [{"name": "server", "image": "vllm"}]},
        "status": status,
    }


def pool_v1(name: str, selector: dict[str, str], ports: list[int], *, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP_V1}/v1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": dict(selector)},
            "targetPorts": [{"number": p} for p in ports],
            "endpointPickerRef": {"name": f"{name}-epp", "port": {"number": 9002}},
        },
    }


def pool_v1alpha2(name: str, selector: dict[str, str], port: int, *, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP_X}/v1alpha2",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": dict(selector),
            "targetPortNumber": port,
            "extensionRef": {"name": f"{name}-epp", "portNumber": 9002, "failureMode": "FailOpen"},
        },
    }


def inference_model(
    name: str,
    model_name: str,
    pool: str,
    *,
    version: str = "v1alpha2",
    namespace: str = "default",
    created: str | None = None,
    criticality: str | None = None,
) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "namespace": namespace}
    if created:
        md["creationTimestamp"] = created
    spec: dict[str, Any] = {"modelName": model_name, "poolRef": {"name": pool, "group": GROUP_V1}}
    if criticality:
        spec["criticality"] = criticality
    return {"apiVersion": f"{GROUP_X}/{version}", "kind": "InferenceModel", "metadata": md, "spec": spec}


def rewrite(
    name: str, pool: str, match: str, target: str, *, group: str = GROUP_X, namespace: str = "default"
) -> dict[str, Any]:
    return {
        "apiVersion": f"{group}/v1alpha2",
        "kind": "InferenceModelRewrite",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "poolRef": {"name": pool, "group": GROUP_V1},
            "rules": [
                {
                    "matches": [{"model": {"type": "Exact", "value": match}}],
                    "targets": [{"modelRewrite": target}],
                }
            ],
        },
    }


def objective(
    name: str, pool: str, priority: int, *, group: str = GROUP_X, namespace: str = "default"
) -> dict[str, Any]:
    return {
        "apiVersion": f"{group}/v1alpha2",
        "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"priority": priority, "poolRef": {"name": pool, "group": GROUP_V1}},
    }


def iter_pods(
    n: int, labels: dict[str, str], *, prefix: str = "pod", namespace: str = "default"
) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield pod(f"{prefix}-{i}", f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", labels, namespace=namespace)


def main() -> None:
    """Serve the emulator until interrupted: `python -m tests.sources.apiserver KUBECONFIG [--kubelet]`.

    Handy for pointing the opt-in real-cluster suite at it (EPP_TEST_KUBECONFIG=KUBECONFIG), which
    checks that suite's own code paths; it is no substitute for a real cluster.
    """
    import sys

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if not args:
        raise SystemExit("usage: python -m tests.sources.apiserver KUBECONFIG [--kubelet]")
    api = ApiServer(kubelet="--kubelet" in sys.argv)
    api.start()
    api.write_kubeconfig(Path(args[0]))
    print(f"serving {api.url}; kubeconfig {args[0]}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        api.stop()


if __name__ == "__main__":
    main()

"""List-then-watch of one API collection in a thread, handing results to the event loop.

The official client's watch is blocking, so each collection gets a daemon thread that:
1. lists (paged) and hands the complete set to the loop (`on_sync`: the caller reconciles with it);
2. watches from the list's resourceVersion with bookmarks, handing each ADDED/MODIFIED/DELETED
   event to the loop (`on_event`) and remembering the newest resourceVersion (events and BOOKMARKs);
3. when a stream ends (server timeoutSeconds) or the connection drops, watches again from that
   resourceVersion, so nothing is lost; when the server says 410 Gone (HTTP status or an ERROR event),
   lists again and hands over the new complete set, so what vanished meanwhile is removed;
4. on 404 (the resource is not served: CRD or version not installed) reports the collection as
   absent (`on_sync([], present=False)`) and retries slowly; on any other error backs off
   exponentially with jitter, capped.
Callbacks run only on the loop (`call_soon_threadsafe`); after `stop()` nothing more is delivered.
State changes (synced, absent, failing, recovered) are logged once each, not per retry.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import urllib3
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("epp.sources.kube_watch")

T = TypeVar("T")

# A broken stream or connection: resume the watch from the last resourceVersion.
_DROPPED = (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


class Gone(Exception):
    """The resourceVersion is too old (410): list again."""


@dataclass(frozen=True, slots=True)
class WatchTarget:
    """One collection: a bound list function (namespace, group... already applied) and selectors."""

    name: str  # for logs, e.g. "pods" or "inferencemodels.inference.networking.x-k8s.io/v1alpha2"
    list_call: Callable[..., Any]
    label_selector: str = ""
    field_selector: str = ""
    kind: str = ""  # default kind/apiVersion for list items that omit them (core types do)
    api_version: str = ""


@dataclass(frozen=True, slots=True)
class WatchTiming:
    """Timeouts and retry pacing; the defaults suit a real cluster, tests shorten them."""

    watch_timeout: int = 30  # server-side timeoutSeconds, jittered up to 2x per request
    connect_timeout: float = 10.0
    list_timeout: float = 60.0
    page_size: int = 500
    backoff_base: float = 0.25
    backoff_cap: float = 30.0
    absent_retry: float = 60.0  # 404: how often to look again for a resource that is not served


def _socket_of(resp: Any) -> socket.socket | None:
    """The socket under a streaming urllib3 response, to shut it down from another thread."""
    if resp is None:
        return None
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is None:  # a `Connection: close` body: http.client left the socket only with the response
        raw = getattr(getattr(getattr(resp, "_fp", None), "fp", None), "raw", None)
        sock = getattr(raw, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _chunks(resp: Any) -> Iterator[bytes]:
    """Bytes of a watch response as they arrive (not when a buffer fills)."""
    if getattr(resp, "chunked", True) or not hasattr(resp, "read1"):
        yield from resp.stream(amt=None, decode_content=False)  # one HTTP chunk at a time
        return
    while True:  # no chunked encoding (a proxy in between): whatever the socket has
        data = resp.read1(65536)
        if not data:
            return
        yield data


def _lines(resp: Any) -> Iterator[bytes]:
    """Lines of a watch response as they arrive."""
    buf = b""
    for chunk in _chunks(resp):
        buf += chunk
        while True:
            i = buf.find(b"\n")
            if i < 0:
                break
            line, buf = buf[:i], buf[i + 1 :]
            if line.strip():
                yield line
    if buf.strip():
        yield buf


class Reflector(Generic[T]):
    """Keeps one collection in step with the API server; see the module docstring."""

    def __init__(
        self,
        target: WatchTarget,
        loop: Any,
        convert: Callable[[dict[str, Any]], T],
        on_sync: Callable[[list[T], bool], None],
        on_event: Callable[[str, T], None],
        timing: WatchTiming | None = None,
    ) -> None:
        self.target = target
        self._loop = loop
        self._convert = convert
        self._on_sync = on_sync
        self._on_event = on_event
        self.timing = timing or WatchTiming()
        self._stop_evt = threading.Event()
        self._stopped = False  # read and written on the loop only: drop deliveries after stop()
        self._resp: Any = None
        self._state = ""
        self.resource_version: str | None = None  # last known, for tests and logs
        self._thread = threading.Thread(target=self._run, name=f"watch-{target.name}", daemon=True)

    # ---- control (loop side) ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop delivering now and make the thread end promptly (its socket is shut down)."""
        self._stopped = True
        self._stop_evt.set()
        sock = _socket_of(self._resp)
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- delivery --------------------------------------------------------------------------
    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, fn, args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._stop_evt.set()

    def _deliver(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        if self._stopped:
            return
        try:
            fn(*args)
        except Exception:
            log.exception("handling a watch result failed", extra={"watch": self.target.name})

    def _set_state(self, state: str, level: int, msg: str, **extra: Any) -> None:
        if state != self._state:
            self._state = state
            log.log(level, msg, extra={"watch": self.target.name, **extra})

    # ---- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        rv: str | None = None
        failures = 0
        last_list = 0.0
        while not self._stop_evt.is_set():
            try:
                if rv is None:
                    if time.monotonic() - last_list < 1.0 and failures:
                        self._sleep(self._backoff(failures))
                        if self._stop_evt.is_set():
                            break
                    last_list = time.monotonic()
                    items, rv = self._list()
                    self.resource_version = rv
                    self._post(self._on_sync, items, True)
                    self._set_state("synced", logging.INFO, "watch listed", count=len(items), resource_version=rv)
                rv, healthy = self._watch(rv)
                self.resource_version = rv
                failures = 0 if healthy else failures + 1
                if not healthy:
                    self._sleep(self._backoff(failures))
            except Gone:
                # Relist at once; a 410 right after a relist counts as a failure (backoff above).
                failures += 1
                rv = None
                self._set_state("gone", logging.INFO, "watch expired (410 Gone), listing again")
            except ApiException as e:
                if e.status == 404:
                    failures = 0
                    if self._state != "absent":
                        self._post(self._on_sync, [], False)
                    self._set_state(
                        "absent",
                        logging.INFO,
                        "resource not served (404), will look again",
                        retry_seconds=self.timing.absent_retry,
                    )
                    rv = None
                    self._sleep(self.timing.absent_retry)
                elif e.status == 410:
                    failures += 1
                    rv = None
                    self._set_state("gone", logging.INFO, "watch expired (410 Gone), listing again")
                else:
                    failures += 1
                    self._set_state(
                        f"error:{e.status}",
                        logging.WARNING,
                        "watch API error, backing off",
                        status=e.status,
                        reason=str(e.reason),
                    )
                    self._sleep(self._backoff(failures))
            except Exception as e:
                if self._stop_evt.is_set():
                    break
                failures += 1
                self._set_state(
                    f"error:{type(e).__name__}",
                    logging.WARNING,
                    "watch failed, backing off",
                    error=f"{type(e).__name__}: {e}",
                )
                self._sleep(self._backoff(failures))
        self._resp = None

    def _sleep(self, seconds: float) -> None:
        self._stop_evt.wait(seconds)

    def _backoff(self, failures: int) -> float:
        t = self.timing
        delay = min(t.backoff_cap, t.backoff_base * (2 ** min(failures - 1, 16)))
        return delay * random.uniform(0.5, 1.0)

    def _selectors(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.target.label_selector:
            kw["label_selector"] = self.target.label_selector
        if self.target.field_selector:
            kw["field_selector"] = self.target.field_selector
        return kw

    def _fill(self, raw: Any) -> Any:
        # Items of core-type lists carry no kind/apiVersion; parse_object needs both.
        if isinstance(raw, dict):
            if self.target.kind and not raw.get("kind"):
                raw["kind"] = self.target.kind
            if self.target.api_version and not raw.get("apiVersion"):
                raw["apiVersion"] = self.target.api_version
        return raw

    def _list(self) -> tuple[list[T], str]:
        t = self.timing
        items: list[T] = []
        cont: str | None = None
        while True:
            kw = self._selectors()
            kw.update(
                limit=t.page_size,
                _preload_content=False,
                _request_timeout=(t.connect_timeout, t.list_timeout),
            )
            if cont:
                kw["_continue"] = cont
            resp = self.target.list_call(**kw)
            try:
                status = getattr(resp, "status", 200)
                if not 200 <= status < 300:
                    raise ApiException(status=status, reason="list failed")
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            meta = body.get("metadata") or {}
            items.extend(self._convert(self._fill(raw)) for raw in body.get("items") or [])
            cont = meta.get("continue") or None
            if not cont:
                return items, str(meta.get("resourceVersion") or "")
            if self._stop_evt.is_set():
                raise InterruptedError("stopping")

    def _watch(self, rv: str) -> tuple[str, bool]:
        """Stream events from `rv`; returns the newest rv and whether the stream was healthy.

        A stream counts as unhealthy when it ended within a second without delivering anything
        (a server dropping or ending every request at once must not make us spin).
        """
        t = self.timing
        timeout = random.randint(t.watch_timeout, 2 * t.watch_timeout)
        resp = self.target.list_call(
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _preload_content=False,
            _request_timeout=(t.connect_timeout, timeout + 15),
            **self._selectors(),
        )
        self._resp = resp
        started, seen = time.monotonic(), 0
        try:
            if self._stop_evt.is_set():
                return rv, True
            status = getattr(resp, "status", 200)
            if not 200 <= status < 300:
                raise ApiException(status=status, reason="watch failed")
            for line in _lines(resp):
                seen += 1
                try:
                    ev = json.loads(line)
                except ValueError:
                    log.debug("unreadable watch line", extra={"watch": self.target.name})
                    continue
                typ = ev.get("type")
                obj = ev.get("object") or {}
                if typ == "ERROR":
                    code = obj.get("code")
                    if code == 410:
                        raise Gone()
                    raise ApiException(status=code, reason=f"{obj.get('reason')}: {obj.get('message')}")
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if typ in ("ADDED", "MODIFIED", "DELETED"):
                    self._post(self._on_event, typ, self._convert(self._fill(obj)))
                if new_rv and typ in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
                    rv = self.resource_version = str(new_rv)
                if self._stop_evt.is_set():
                    break
            if self._state != "synced":
                self._set_state("synced", logging.INFO, "watch recovered", resource_version=rv)
        except _DROPPED as e:
            if self._stop_evt.is_set():
                return rv, True
            log.debug(
                "watch stream dropped, resuming",
                extra={"watch": self.target.name, "error": str(e), "resource_version": rv},
            )
        finally:
            self._resp = None
            with suppress(Exception):
                resp.close()
                resp.release_conn()
        healthy = seen > 0 or time.monotonic() - started >= 1.0
        return rv, healthy

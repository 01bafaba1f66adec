"""Leader election on a coordination.k8s.io/v1 Lease, in the manner of client-go's leaderelection.

Every replica campaigns: it reads the Lease every retry period; when nobody holds it, the holder
field is empty, or the holder's record has not changed for `lease_duration` seconds *as observed on
this replica's own clock* (no trust in other machines' clocks), it writes itself in with a PUT
carrying the resourceVersion it read, so of two racing replicas exactly one wins (the other gets
409 Conflict). The leader renews every retry period; if it cannot renew for `renew_deadline`
seconds, or it sees another holder in the Lease, it steps down and campaigns again as a follower.
A clean stop releases the Lease (empty holder) so a follower takes over within one retry period.

`on_change(is_leader)` runs on the event loop at each transition (and with False on stop when it
was leader). Lease API calls run in threads with short timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from epp.sources.kube_client import make_api_client

log = logging.getLogger("epp.sources.leader")


def lease_name(pool_name: str, namespace: str) -> str:
    """The Lease of the picker replicas of one pool: `epp-<namespace>-<pool>` (in the pool's namespace).

    Names longer than a DNS subdomain allows (253) are cut and given a short hash suffix.
    """
    name = f"epp-{namespace}-{pool_name}".lower()
    if len(name) > 253:
        name = name[:240] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


def default_identity() -> str:
    """Hostname (the pod name in a cluster) plus a random suffix, unique per process."""
    return f"{socket.gethostname()}_{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """client-go's defaults: a leader is replaced at most ~lease_duration after it stops renewing."""

    lease_duration: int = 15  # seconds (the Lease field is an integer)
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not (self.lease_duration - self.retry_period > self.renew_deadline > self.retry_period > 0):
            raise ValueError("need lease_duration - retry_period > renew_deadline > retry_period > 0")


def _finish(resp: Any) -> bytes:
    """Read a raw (`_preload_content=False`) response to the end and give its connection back."""
    try:
        data: bytes = resp.data
        return data
    finally:
        resp.release_conn()


def _micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Campaigns for one Lease and reports leadership changes; see the module docstring."""

    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        on_change: Callable[[bool], None] | None = None,
        identity: str | None = None,
        api_client: client.ApiClient | None = None,
        kubeconfig: str | None = None,
        timing: LeaseTiming | None = None,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.timing = timing or LeaseTiming()
        self._on_change = on_change
        self._api = api_client
        self._kubeconfig = kubeconfig
        self._leader = False
        self._last_renew = 0.0
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._last_read = 0.0  # monotonic time of the previous Lease read
        self._expires_at = 0.0  # when the observed holder's lease runs out, on our clock
        self._lock = threading.Lock()  # one Lease round-trip at a time (a timed-out one may still run)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()  # set by stop() to cut a retry-period sleep short
        self._state = ""
        self._leases: Any = None  # CoordinationV1Api; raw dict bodies and responses

    @property
    def is_leader(self) -> bool:
        return self._leader

    async def start(self) -> None:
        if self._api is None:
            self._api = await asyncio.to_thread(make_api_client, self._kubeconfig)
        self._leases = client.CoordinationV1Api(self._api)
        log.info("leader election started", extra={"lease": f"{self.namespace}/{self.name}", "identity": self.identity})
        self._task = asyncio.get_running_loop().create_task(self._run(), name="leader-election")

    async def stop(self, release: bool = True) -> None:
        """Stop campaigning; as leader, release the Lease (unless `release` is False) and step down."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._leader:
            if release:
                try:
                    await asyncio.wait_for(asyncio.to_thread(self._release), self.timing.renew_deadline)
                except Exception as e:
                    log.warning("releasing the lease failed", extra={"error": str(e)})
            self._set(False)

    # ---- the campaign ------------------------------------------------------------------------
    async def _attempt(self) -> tuple[bool, bool]:
        """One Lease round-trip in a thread, bounded by half the renew deadline."""
        fut = asyncio.ensure_future(asyncio.to_thread(self._try))
        # asyncio.wait, not wait_for: on 3.11 wait_for can swallow a cancellation that races completion.
        done, _ = await asyncio.wait({fut}, timeout=self.timing.renew_deadline / 2)
        if fut not in done:
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieve it later, quietly
            self._log_state("timeout", logging.WARNING, "lease request timed out")
            return False, False
        try:
            return fut.result()
        except Exception as e:  # never let the campaign die
            self._log_state(f"error:{type(e).__name__}", logging.WARNING, "lease request failed", error=str(e))
            return False, False

    async def _run(self) -> None:
        t = self.timing
        while not self._stopping:
            ok, other = await self._attempt()
            if self._stopping:
                break
            now = time.monotonic()
            if ok:
                self._last_renew = now
                self._set(True)
            elif self._leader and (other or now - self._last_renew >= t.renew_deadline):
                log.warning(
                    "leadership lost",
                    extra={
                        "lease": f"{self.namespace}/{self.name}",
                        "reason": "lease held by another replica" if other else "could not renew within the deadline",
                    },
                )
                self._set(False)
            delay = t.retry_period if self._leader else t.retry_period * random.uniform(1.0, 1.2)
            if not self._leader and self._expires_at > now:
                # wake exactly when the holder's lease runs out rather than up to a period later
                delay = min(delay, self._expires_at - now + 0.01)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _set(self, leader: bool) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        log.info(
            "leadership changed",
            extra={"leader": leader, "identity": self.identity, "lease": f"{self.namespace}/{self.name}"},
        )
        if self._on_change is not None:
            try:
                self._on_change(leader)
            except Exception:
                log.exception("leadership callback failed")

    def _log_state(self, state: str, level: int, msg: str, **extra: Any) -> None:
        if state != self._state:
            self._state = state
            log.log(level, msg, extra={"lease": f"{self.namespace}/{self.name}", **extra})

    # ---- Lease round-trips (threads) ---------------------------------------------------------
    def _timeout(self) -> tuple[float, float]:
        t = max(0.5, self.timing.renew_deadline / 3)
        return (t, t)

    def _read(self) -> dict[str, Any] | None:
        assert self._leases is not None
        try:
            resp = self._leases.read_namespaced_lease(
                self.name, self.namespace, _preload_content=False, _request_timeout=self._timeout()
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        data: dict[str, Any] = json.loads(_finish(resp))
        return data

    def _spec(self, old: dict[str, Any] | None, now: str) -> dict[str, Any]:
        old = old or {}
        mine = old.get("holderIdentity") == self.identity
        transitions = int(old.get("leaseTransitions") or 0)
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.timing.lease_duration,
            "acquireTime": old.get("acquireTime") if mine and old.get("acquireTime") else now,
            "renewTime": now,
            "leaseTransitions": transitions if mine or not old else transitions + 1,
        }

    def _try(self) -> tuple[bool, bool]:
        """One attempt to acquire or renew: (we hold it now, another replica holds it)."""
        with self._lock:
            assert self._leases is not None
            lease = self._read()
            now = _micro_now()
            if lease is None:
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(None, now),
                }
                try:
                    resp = self._leases.create_namespaced_lease(
                        self.namespace, body, _preload_content=False, _request_timeout=self._timeout()
                    )
                    _finish(resp)
                except ApiException as e:
                    if e.status == 409:  # another replica created it first
                        return False, True
                    raise
                self._log_state("leader", logging.DEBUG, "lease created")
                return True, False
            spec = lease.get("spec") or {}
            md = lease.get("metadata") or {}
            holder = spec.get("holderIdentity") or ""
            record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"), md.get("resourceVersion"))
            mono = time.monotonic()
            if record != self._observed:
                # a change seen now was written after our previous read: count from that read, so a
                # dead leader is replaced within lease_duration of its last renewal, not one retry
                # period later (safe: a leader steps down after renew_deadline < lease_duration -
                # retry_period without a successful renewal)
                first = self._observed is None
                self._observed = record
                self._observed_at = mono if first or not self._last_read else self._last_read
            self._last_read = mono
            duration = spec.get("leaseDurationSeconds") or self.timing.lease_duration
            self._expires_at = self._observed_at + float(duration)
            if holder and holder != self.identity and mono < self._observed_at + float(duration):
                self._log_state("follower", logging.DEBUG, "lease held by another replica", holder=holder)
                return False, True
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": self.name,
                    "namespace": self.namespace,
                    "resourceVersion": md.get("resourceVersion"),
                },
                "spec": self._spec(spec, now),
            }
            try:
                resp = self._leases.replace_namespaced_lease(
                    self.name, self.namespace, body, _preload_content=False, _request_timeout=self._timeout()
                )
                _finish(resp)
            except ApiException as e:
                if e.status == 409:  # somebody wrote in between: they hold it
                    return False, True
                raise
            self._log_state("leader", logging.DEBUG, "lease renewed")
            return True, False

    def _release(self) -> None:
        with self._lock:
            assert self._leases is not None
            lease = self._read()
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            now = _micro_now()
            spec = dict(lease.get("spec") or {})
            spec.pop("holderIdentity", None)
            spec.update(leaseDurationSeconds=1, renewTime=now, acquireTime=now)
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": self.name,
                    "namespace": self.namespace,
                    "resourceVersion": (lease.get("metadata") or {}).get("resourceVersion"),
                },
                "spec": spec,
            }
            resp = self._leases.replace_namespaced_lease(
                self.name, self.namespace, body, _preload_content=False, _request_timeout=self._timeout()
            )
            _finish(resp)
            log.info("lease released", extra={"lease": f"{self.namespace}/{self.name}"})

"""Kubernetes source: watch the InferencePool, its pods and the model objects; feed the Datastore.

Watches (each a list-then-watch thread, see `kube_watch`), all in the pool's namespace:
- the InferencePool named `pool_name` in `pool_group` (v1 for inference.networking.k8s.io, v1alpha2
  for inference.networking.x-k8s.io), by field selector `metadata.name` — unless the pool comes from
  flags (`pool_override`), in which case no pool is watched;
- Pods, with the pool's selector as a server-side label selector; when the selector changes the pod
  watch restarts with the new one and the datastore is reconciled with its fresh list;
- InferenceModel (x-k8s.io v1alpha2 and v1alpha1), InferenceModelRewrite and InferenceObjective (both
  inference groups and llm-d.ai v1alpha2). A version or CRD that is not installed (404) is treated as
  empty and looked for again slowly.
Objects are parsed with `epp.resources.parse_object`; an invalid object is logged with the bad field
and treated as absent (the pool keeps its last valid version instead, so routing goes on).

The Datastore is changed only on the event loop. The pool is published (`set_pool`) only after the
pod list for its selector has been applied (and, at start, after the model objects have been listed
or a short grace period passed), so readiness never shows a pool with a not-yet-listed pod set.

The one write: when two InferenceModels claim one modelName, the newer one gets the status condition
`Accepted=False, reason ModelNameConflict`; when the conflict goes away it becomes `Accepted=True,
reason Accepted`. Only changes are written; see docs/kubernetes.md.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from epp.datastore import Datastore
from epp.resources import (
    GROUP_LLMD,
    GROUP_V1,
    GROUP_X,
    InferenceModel,
    InferencePool,
    Pod,
    Resource,
    ResourceError,
    parse_object,
    refers_to_pool,
)
from epp.sources.kube_client import make_api_client
from epp.sources.kube_watch import Reflector, WatchTarget, WatchTiming

log = logging.getLogger("epp.sources.kube")

POOL_VERSIONS = {GROUP_V1: "v1", GROUP_X: "v1alpha2"}

# The InferenceModel status condition this picker owns.
CONDITION_TYPE = "Accepted"
REASON_CONFLICT = "ModelNameConflict"
REASON_ACCEPTED = "Accepted"
MESSAGE_ACCEPTED = "modelName is not claimed by an older InferenceModel in this pool"


@dataclass(frozen=True, slots=True)
class Item:
    """One watched object after parsing (in the watch thread); `obj` is None when invalid."""

    key: str  # namespace/name
    resource_version: str
    obj: Resource | None
    error: ResourceError | None = None
    api_version: str = ""
    generation: int = 0
    conditions: tuple[dict[str, Any], ...] = ()  # status.conditions, kept for InferenceModel
    kind: str = ""


def convert(raw: dict[str, Any], namespace: str) -> Item:
    """Parse one raw object; never raises (a bad object becomes an Item with `error`)."""
    if not isinstance(raw, dict):
        return Item("?", "", None, ResourceError("", f"expected an object, got {type(raw).__name__}"))
    md_raw = raw.get("metadata")
    md: dict[str, Any] = md_raw if isinstance(md_raw, dict) else {}
    key = f"{md.get('namespace') or namespace}/{md.get('name') or ''}"
    rv = str(md.get("resourceVersion") or "")
    try:
        obj = parse_object(raw, default_namespace=namespace)
    except ResourceError as e:
        return Item(key, rv, None, e, str(raw.get("apiVersion") or ""), kind=str(raw.get("kind") or ""))
    conditions: tuple[dict[str, Any], ...] = ()
    if isinstance(obj, InferenceModel):
        status = raw.get("status")
        conds = status.get("conditions") if isinstance(status, dict) else None
        if isinstance(conds, list):
            conditions = tuple(c for c in conds if isinstance(c, dict))
    gen = md.get("generation")
    generation = gen if isinstance(gen, int) else 0
    return Item(key, rv, obj, None, obj.meta.api_version, generation, conditions, obj.meta.kind)


@dataclass(slots=True)
class _Kind:
    """A kind watched through several reflectors (versions or groups), merged by preference."""

    name: str
    upsert: Callable[[Any], None]
    delete: Callable[[str], None]  # by key "namespace/name"
    replace: Callable[[list[Any]], None]
    slots: list[dict[str, Item]] = field(default_factory=list)

    def effective(self, key: str) -> Item | None:
        for slot in self.slots:
            item = slot.get(key)
            if item is not None:
                return item
        return None

    def union(self) -> dict[str, Item]:
        out: dict[str, Item] = {}
        for slot in self.slots:
            for k, it in slot.items():
                out.setdefault(k, it)
        return out


def _pool_spec(pool: InferencePool | None) -> tuple[Any, ...] | None:
    if pool is None:
        return None
    return (tuple(sorted(pool.selector.items())), pool.target_ports, pool.app_protocol, pool.picker)


def label_selector(selector: Mapping[str, str]) -> str:
    """matchLabels as a label-selector string (`k=v,k2=v2`)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


class KubeSource:
    """Feeds a Datastore from the Kubernetes API; see the module docstring."""

    def __init__(
        self,
        datastore: Datastore,
        *,
        pool_name: str,
        namespace: str,
        pool_group: str = GROUP_V1,
        kubeconfig: str | None = None,
        pool_override: InferencePool | None = None,
        api_client: client.ApiClient | None = None,
        write_status: bool = True,
        timing: WatchTiming | None = None,
        models_grace: float = 10.0,
    ) -> None:
        if pool_group not in POOL_VERSIONS:
            raise ValueError(f"unknown pool group {pool_group!r}; expected one of {', '.join(POOL_VERSIONS)}")
        self._ds = datastore
        self.pool_name = pool_name
        self.namespace = namespace
        self.pool_group = pool_group
        self._kubeconfig = kubeconfig
        self._override = pool_override
        self._api = api_client
        self._write_status = write_status
        self._timing = timing or WatchTiming()
        self._models_grace = models_grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._core: Any = None  # CoreV1Api, CustomObjectsApi once started
        self._custom: Any = None
        self._reflectors: list[Reflector[Item]] = []
        self._retired: list[Reflector[Item]] = []
        self._pods: Reflector[Item] | None = None
        self._pods_selector: dict[str, str] | None = None
        self._pods_synced = False
        self._pool: InferencePool | None = None
        self._pool_listed = False
        self._published: InferencePool | None = None
        self._published_spec: tuple[Any, ...] | None = None
        self._gate_open = False
        self._gate_pending: set[str] = set()
        self._gate_timer: asyncio.TimerHandle | None = None
        self._synced = asyncio.Event()
        self._invalid_seen: dict[tuple[str, str], str] = {}  # (kind, key) -> resourceVersion logged
        self._status_sent: dict[str, tuple[str, str, str]] = {}
        self._status_inflight: set[str] = set()
        self._status_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        ds = datastore
        self._models = _Kind("InferenceModel", ds.upsert_model, ds.delete_model, ds.replace_models)
        self._rewrites = _Kind("InferenceModelRewrite", ds.upsert_rewrite, ds.delete_rewrite, ds.replace_rewrites)
        self._objectives = _Kind(
            "InferenceObjective",
            ds.upsert_objective,
            lambda key: ds.delete_objective(key.rpartition("/")[2]),
            ds.replace_objectives,
        )

    # ---- public ------------------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        """The pool (or its absence), its pods and the model objects have been loaded once."""
        return self._synced.is_set()

    async def wait_synced(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def set_status_writer(self, enabled: bool) -> None:
        """Whether this replica writes InferenceModel status (with leader election: only the leader)."""
        self._write_status = enabled
        if enabled:
            self._status_sent.clear()
            self._schedule_status()

    async def start(self) -> None:
        """Start the watches; returns at once (see `wait_synced`)."""
        self._loop = asyncio.get_running_loop()
        if self._api is None:
            self._api = await asyncio.to_thread(make_api_client, self._kubeconfig)
        core = client.CoreV1Api(self._api)
        custom = client.CustomObjectsApi(self._api)
        self._core, self._custom = core, custom
        ns = self.namespace

        def crd(group: str, version: str, plural: str, **kw: str) -> WatchTarget:
            call = functools.partial(custom.list_namespaced_custom_object, group, version, ns, plural)
            return WatchTarget(f"{plural}.{group}/{version}", call, **kw)

        if self._override is None:
            version = POOL_VERSIONS[self.pool_group]
            target = crd(self.pool_group, version, "inferencepools", field_selector=f"metadata.name={self.pool_name}")
            self._add(target, self._on_pool_sync, self._on_pool_event)
        kinds: list[tuple[_Kind, list[tuple[str, str]], str]] = [
            (self._models, [(GROUP_X, "v1alpha2"), (GROUP_X, "v1alpha1")], "inferencemodels"),
            (self._rewrites, [(GROUP_V1, "v1alpha2"), (GROUP_X, "v1alpha2"), (GROUP_LLMD, "v1alpha2")],
             "inferencemodelrewrites"),
            (self._objectives, [(GROUP_V1, "v1alpha2"), (GROUP_X, "v1alpha2"), (GROUP_LLMD, "v1alpha2")],
             "inferenceobjectives"),
        ]
        for kind, versions, plural in kinds:
            for group, version in versions:
                idx = len(kind.slots)
                kind.slots.append({})
                target = crd(group, version, plural)
                self._gate_pending.add(target.name)
                self._add(
                    target,
                    functools.partial(self._on_kind_sync, kind, idx, target.name),
                    functools.partial(self._on_kind_event, kind, idx),
                )
        self._gate_timer = self._loop.call_later(self._models_grace, self._open_gate, "grace period over")
        log.info(
            "kubernetes source started",
            extra={
                "pool": self.pool_name,
                "namespace": ns,
                "pool_source": "flags"
                if self._override is not None
                else f"{self.pool_group}/{POOL_VERSIONS[self.pool_group]}",
            },
        )
        if self._override is not None:
            self._reconcile_pool()

    async def stop(self) -> None:
        """Stop every watch thread (promptly: their sockets are shut down) and pending status writes."""
        self._stopping = True
        if self._gate_timer is not None:
            self._gate_timer.cancel()
        everyone = [*self._reflectors, *self._retired]
        for r in everyone:
            r.stop()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

        def join_all() -> int:
            deadline = time.monotonic() + 5.0
            return sum(0 if r.join(max(0.0, deadline - time.monotonic())) else 1 for r in everyone)

        stuck = await asyncio.to_thread(join_all)
        if stuck:
            log.warning("watch threads still running after stop", extra={"count": stuck})
        log.info("kubernetes source stopped")

    # ---- plumbing ----------------------------------------------------------------------------
    def _add(
        self,
        target: WatchTarget,
        on_sync: Callable[[list[Item], bool], None],
        on_event: Callable[[str, Item], None],
    ) -> Reflector[Item]:
        conv = functools.partial(convert, namespace=self.namespace)
        r: Reflector[Item] = Reflector(target, self._loop, conv, on_sync, on_event, self._timing)
        self._reflectors.append(r)
        r.start()
        return r

    def _log_invalid(self, item: Item) -> None:
        if self._invalid_seen.get((item.kind, item.key)) == item.resource_version:
            return  # logged already (a relist, or the other version of the CRD, hands the same object again)
        self._invalid_seen[(item.kind, item.key)] = item.resource_version
        err = item.error
        log.warning(
            "invalid object skipped",
            extra={
                "kind": item.kind,
                "object": item.key,
                "api_version": item.api_version,
                "field": err.field if err else "",
                "error": err.message if err else "",
            },
        )

    def _valid(self, item: Item) -> bool:
        if item.obj is None:
            self._log_invalid(item)
            return False
        self._invalid_seen.pop((item.kind, item.key), None)
        return True

    # ---- pool --------------------------------------------------------------------------------
    def _on_pool_sync(self, items: list[Item], present: bool) -> None:
        self._pool_listed = True
        if not present:
            log.warning(
                "InferencePool resource is not served; is the CRD installed?",
                extra={"group": self.pool_group},
            )
            self._pool = None
        else:
            mine = [i for i in items if i.key == f"{self.namespace}/{self.pool_name}"]
            if not mine:
                self._pool = None
            elif self._valid(mine[0]):
                assert isinstance(mine[0].obj, InferencePool)
                self._pool = mine[0].obj
        self._reconcile_pool()

    def _on_pool_event(self, typ: str, item: Item) -> None:
        if item.key != f"{self.namespace}/{self.pool_name}":
            return
        if typ == "DELETED":
            self._pool = None
        elif self._valid(item):
            assert isinstance(item.obj, InferencePool)
            self._pool = item.obj
        self._reconcile_pool()

    def _reconcile_pool(self) -> None:
        """Bring the datastore's pool (and the pod watch's selector) in line with what we know."""
        if self._stopping:
            return
        want = self._override or self._pool
        if want is None:
            if self._pool_listed and (self._published is not None or not self._ds.synced):
                self._ds.set_pool(None)
                self._published, self._published_spec = None, None
                log.info("pool absent: no endpoints", extra={"pool": self.pool_name})
            self._update_synced()
            return
        self._ensure_pod_watch(dict(want.selector))
        if not (self._pods_synced and self._gate_open):
            return
        spec = _pool_spec(want)
        if spec != self._published_spec or self._published is None:
            self._ds.set_pool(want)
            self._published, self._published_spec = want, spec
            log.info(
                "pool applied",
                extra={
                    "pool": self.pool_name,
                    "selector": dict(want.selector),
                    "target_ports": list(want.target_ports),
                    "endpoints": len(self._ds.endpoints),
                },
            )
        self._update_synced()

    def _update_synced(self) -> None:
        if self._synced.is_set() or not self._gate_open:
            return
        if self._published is not None or (self._pool_listed and self._override is None and self._pool is None):
            self._synced.set()

    def _open_gate(self, why: str) -> None:
        if self._gate_open:
            return
        self._gate_open = True
        if self._gate_timer is not None:
            self._gate_timer.cancel()
        if self._gate_pending:
            log.warning(
                "model objects not listed yet; applying the pool anyway",
                extra={"reason": why, "pending": sorted(self._gate_pending)},
            )
        self._reconcile_pool()

    # ---- pods --------------------------------------------------------------------------------
    def _ensure_pod_watch(self, selector: dict[str, str]) -> None:
        if self._pods is not None and self._pods_selector == selector:
            return
        if self._pods is not None:
            log.info(
                "pool selector changed: restarting the pod watch",
                extra={"old": self._pods_selector, "new": selector},
            )
            self._pods.stop()
            self._reflectors.remove(self._pods)
            self._retired = [r for r in self._retired if not r.join(0)]
            self._retired.append(self._pods)
        core = self._core
        target = WatchTarget(
            "pods",
            functools.partial(core.list_namespaced_pod, self.namespace),
            label_selector=label_selector(selector),
            kind="Pod",
            api_version="v1",
        )
        self._pods_selector = selector
        self._pods_synced = False
        self._pods = self._add(target, self._on_pods_sync, self._on_pod_event)

    def _on_pods_sync(self, items: list[Item], present: bool) -> None:
        pods: list[Pod] = []
        for it in items:
            if self._valid(it):
                assert isinstance(it.obj, Pod)
                pods.append(it.obj)
        self._ds.replace_pods(pods)
        self._pods_synced = True
        self._reconcile_pool()

    def _on_pod_event(self, typ: str, item: Item) -> None:
        if typ != "DELETED" and self._valid(item):
            assert isinstance(item.obj, Pod)
            self._ds.upsert_pod(item.obj)
        else:
            self._ds.delete_pod(item.key)

    # ---- models, rewrites, objectives ---------------------------------------------------------
    def _on_kind_sync(self, kind: _Kind, idx: int, name: str, items: list[Item], present: bool) -> None:
        kind.slots[idx] = {it.key: it for it in items if self._valid(it)}
        kind.replace([it.obj for it in kind.union().values()])
        if kind is self._models:
            self._schedule_status()
        if name in self._gate_pending:
            self._gate_pending.discard(name)
            if not self._gate_pending:
                self._open_gate("model objects listed")

    def _on_kind_event(self, kind: _Kind, idx: int, typ: str, item: Item) -> None:
        slot = kind.slots[idx]
        if typ != "DELETED" and self._valid(item):
            slot[item.key] = item
        else:
            slot.pop(item.key, None)
        eff = kind.effective(item.key)
        if eff is None:
            kind.delete(item.key)
        else:
            kind.upsert(eff.obj)
        if kind is self._models:
            self._schedule_status()

    # ---- InferenceModel status ----------------------------------------------------------------
    def _schedule_status(self) -> None:
        if self._status_scheduled or not self._write_status or self._stopping or self._loop is None:
            return
        self._status_scheduled = True
        self._loop.call_soon(self._reconcile_status)

    def _desired(self, item: Item, conflict: str | None) -> tuple[str, str, str] | None:
        """The Accepted condition to write, or None when what the object shows is already right."""
        cur = next((c for c in item.conditions if c.get("type") == CONDITION_TYPE), None)
        if conflict is not None:
            want = ("False", REASON_CONFLICT, conflict)
        elif cur is not None and cur.get("status") == "False" and cur.get("reason") == REASON_CONFLICT:
            want = ("True", REASON_ACCEPTED, MESSAGE_ACCEPTED)
        else:
            return None
        if cur is not None and (cur.get("status"), cur.get("reason"), cur.get("message")) == want:
            return None
        return want

    def _reconcile_status(self) -> None:
        self._status_scheduled = False
        if not self._write_status or self._stopping:
            return
        conflicts = self._ds.model_conflicts
        for key, item in self._models.union().items():
            m = item.obj
            if not isinstance(m, InferenceModel) or not refers_to_pool(m.pool_ref, self.pool_name):
                continue
            want = self._desired(item, conflicts.get(key))
            if want is None:
                self._status_sent.pop(key, None)
                continue
            if self._status_sent.get(key) == want or key in self._status_inflight:
                continue
            self._status_sent[key] = want
            self._status_inflight.add(key)
            task = asyncio.get_running_loop().create_task(self._write_condition(key, item, want))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write_condition(self, key: str, item: Item, want: tuple[str, str, str]) -> None:
        status, reason, message = want
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        conds = [dict(c) for c in item.conditions if c.get("type") != CONDITION_TYPE]
        prev = next((c for c in item.conditions if c.get("type") == CONDITION_TYPE), None)
        since = prev.get("lastTransitionTime") if prev and prev.get("status") == status else None
        cond: dict[str, Any] = {
            "type": CONDITION_TYPE,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": since or now,
        }
        if item.generation:
            cond["observedGeneration"] = item.generation
        conds.append(cond)
        group, _, version = item.api_version.rpartition("/")
        name = key.rpartition("/")[2]
        try:
            resp: Any = await asyncio.to_thread(
                self._custom.patch_namespaced_custom_object_status,
                group,
                version,
                self.namespace,
                "inferencemodels",
                name,
                {"status": {"conditions": conds}},
                _preload_content=False,
                _request_timeout=(self._timing.connect_timeout, 30),
            )
            resp.release_conn()
            log.info("InferenceModel status written", extra={"object": key, "accepted": status, "reason": reason})
        except ApiException as e:
            self._status_sent.pop(key, None)
            if e.status != 404:
                log.warning(
                    "InferenceModel status write failed; will retry",
                    extra={"object": key, "status": e.status, "reason": str(e.reason)},
                )
                self._retry_status_later()
        except Exception as e:
            self._status_sent.pop(key, None)
            log.warning("InferenceModel status write failed; will retry", extra={"object": key, "error": str(e)})
            self._retry_status_later()
        finally:
            self._status_inflight.discard(key)

    def _retry_status_later(self) -> None:
        if self._loop is not None and not self._stopping:
            self._loop.call_later(self._timing.backoff_cap / 6, self._schedule_status)

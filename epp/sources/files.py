"""No-cluster mode: the objects a cluster would hold, read from YAML/JSON files, reloaded on change.

`--manifests PATH` names a file or a directory (read recursively: *.yaml, *.yml, *.json). Every
document of a kind the picker reads is parsed with the same code the Kubernetes source uses.
Changes are found by polling mtimes and sizes (no inotify dependency; a 1 s poll of a few files
costs nothing). After the first load, files are stat'ed, read and parsed on a worker thread and only
the result is applied on the serving loop, so a large manifest being reloaded does not hold up requests.

A file being rewritten must not drop the pool, so a change is applied only when it reads as a
whole and makes sense; otherwise the file's last good objects stay until it does, and the reason
is logged once per version of the file:

- a changed file is read once its mtime is SETTLE seconds old (a writer still at it keeps
  moving the mtime), and each read is stat, read, stat again: a file whose size or mtime moved
  while it was read is read again at the next poll;
- an empty file (no documents: zero bytes, whitespace or comments only) keeps the last good
  objects, as a file that stops parsing as YAML does, or one with a document that is not an
  object with a `kind` (a half-written or foreign file);
- an invalid object is reported by file, document and field. A version that makes an object
  invalid that was not before keeps the whole last good version of the file (a half-written
  file usually ends in one); objects that were already invalid are skipped, the rest applies.

The first read of a file at start applies at once (there is nothing to keep). Deleting a file
removes its objects. A writer that pauses mid-file for longer than SETTLE can still be seen
half-written: to replace a manifest atomically, write a temporary file and rename it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

import yaml

from epp.datastore import Datastore
from epp.resources import GROUP_V1, InferencePool, ObjectSet, ResourceError, is_known, parse_object

log = logging.getLogger("epp.sources.files")

_EXTENSIONS = (".yaml", ".yml", ".json")


SETTLE = 0.3  # seconds a changed file's mtime must be old before it is read


@dataclass(slots=True)
class _FileState:
    stamp: tuple[int, int]
    objects: list = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    invalid: frozenset[tuple[str, str, str]] = frozenset()  # (kind, namespace, name) of invalid objects


class Unusable(ValueError):
    """The file as a whole cannot be applied (empty, not YAML, or not manifests)."""


def _stamp(st: os.stat_result) -> tuple[int, int]:
    return (st.st_mtime_ns, st.st_size)


def read_stable(path: str) -> tuple[tuple[int, int], str] | None:
    """(stamp, text) of a file read whole while it did not change; None while it is being written."""
    before = os.stat(path)
    with open(path, "rb") as f:
        data = f.read()
    after = os.stat(path)
    if _stamp(before) != _stamp(after) or len(data) != after.st_size:
        return None
    return _stamp(after), data.decode("utf-8")


def _identity(obj: object, namespace: str) -> tuple[str, str, str] | None:
    if not isinstance(obj, dict):
        return None
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        return None
    return (str(obj.get("kind", "")), str(meta.get("namespace") or namespace), str(meta["name"]))


def _list_files(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs.sort()
                out.extend(os.path.join(root, f) for f in sorted(files)
                           if f.endswith(_EXTENSIONS) and not f.startswith("."))
        elif os.path.exists(p):
            out.append(p)
    return out


def parse_file(path: str, text: str, namespace: str, seq_base: int) -> tuple[list, list[str], frozenset]:
    """Typed objects, error lines ("file: document N (Kind/name): field: message") and the
    (kind, namespace, name) of the invalid objects of one file. Raises yaml.YAMLError or
    Unusable for a file that cannot be applied at all."""
    objects: list = []
    errors: list[str] = []
    invalid: set[tuple[str, str, str]] = set()
    docs = [d for d in yaml.safe_load_all(text) if d is not None]  # raises yaml.YAMLError
    if not docs:
        raise Unusable("the file is empty (no documents)")
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or not doc.get("kind"):
            raise Unusable(f"document {i + 1} is not an object with a kind (a half-written or foreign file?)")
    seq = seq_base
    for i, doc in enumerate(docs):
        items = doc.get("items") if isinstance(doc, dict) and str(doc.get("kind", "")).endswith("List") else [doc]
        for j, obj in enumerate(items or []):
            if obj is None or not is_known(obj):
                continue
            seq += 1
            where = f"document {i + 1}" + (f" item {j + 1}" if len(items or []) > 1 or doc is not obj else "")
            name = (obj.get("metadata") or {}).get("name", "?") if isinstance(obj.get("metadata"), dict) else "?"
            try:
                objects.append(parse_object(obj, namespace, seq))
            except ResourceError as e:
                invalid.add(_identity(obj, namespace) or (str(obj.get("kind")), namespace, f"{where}"))
                errors.append(f"{path}: {where} ({obj.get('kind')}/{name}): {e}")
    return objects, errors, frozenset(invalid)


class FileSource:
    """Feeds a Datastore from manifest files and keeps it in step with edits."""

    def __init__(
        self,
        datastore: Datastore,
        paths: list[str],
        *,
        pool_override: InferencePool | None = None,
        pool_group: str = GROUP_V1,
        interval: float = 1.0,
    ) -> None:
        self.datastore = datastore
        self.paths = paths
        self.pool_override = pool_override
        self.pool_group = pool_group
        self.interval = interval
        self._files: dict[str, _FileState] = {}
        self._task: asyncio.Task[None] | None = None
        self.errors: list[str] = []  # current errors across all files, for tests and status

    def load(self) -> bool:
        """Read changed files and apply everything to the datastore; True when something changed."""
        return self._settle(self._scan())

    def _settle(self, changed: bool) -> bool:
        """Apply the files' objects to the datastore when they changed or it has none yet (on the loop)."""
        if changed or not self.datastore.synced:
            self._apply()
        return changed

    def _scan(self) -> bool:
        """Stat, read and parse the changed files into `_files` (no datastore change: this runs on a
        worker thread while the picker serves); True when something changed."""
        changed = False
        seen = set()
        for seq_base, path in enumerate(_list_files(self.paths)):
            seen.add(path)
            try:
                st = os.stat(path)
            except OSError:
                continue
            old = self._files.get(path)
            if old is not None and old.stamp == _stamp(st):
                continue
            if old is not None and 0 <= time.time() - st.st_mtime < SETTLE:
                continue  # just written, maybe still being written: look again at the next poll
            try:
                got = read_stable(path)
            except (OSError, UnicodeDecodeError) as e:
                changed |= self._keep(path, _stamp(st), old, [f"{path}: {e}"])
                continue
            if got is None:  # changed while read: try again at the next poll
                log.debug("manifest changed while read; retrying", extra={"file": path})
                continue
            stamp, text = got
            try:
                objects, errors, invalid = parse_file(path, text, self.datastore.pool_namespace, seq_base * 10_000)
            except (yaml.YAMLError, Unusable) as e:
                changed |= self._keep(path, stamp, old, [f"{path}: " + str(e).replace("\n", " ")])
                continue
            if old is not None and not invalid <= old.invalid:
                # an object valid before is not now: most likely a half-written file
                changed |= self._keep(path, stamp, old, errors)
                continue
            changed = True
            for err in errors:
                log.error("invalid object skipped", extra={"error": err})
            self._files[path] = _FileState(stamp, objects, errors, invalid)
        for gone in [p for p in self._files if p not in seen]:
            del self._files[gone]
            changed = True
        return changed

    def _keep(self, path: str, stamp: tuple[int, int], old: _FileState | None, errors: list[str]) -> bool:
        """Record an unusable version of `path`, keeping its last good objects (logged once: the
        next poll sees the same stamp). True: the current errors changed."""
        log.error("manifest not applied; keeping its last good objects",
                  extra={"file": path, "error": "; ".join(errors)})
        self._files[path] = _FileState(stamp, old.objects if old else [], list(errors),
                                       old.invalid if old else frozenset())
        return True

    def _apply(self) -> None:
        objs = ObjectSet()
        self.errors = []
        for st in self._files.values():
            self.errors.extend(st.errors)
            for o in st.objects:
                objs.add(o)
        ds = self.datastore
        pool = self.pool_override
        if pool is None:
            mine = [p for p in objs.pools if p.meta.name == ds.pool_name and p.meta.namespace == ds.pool_namespace]
            # the preferred API group first, then the others (a file may hold several versions)
            mine.sort(key=lambda p: (p.meta.group != self.pool_group, p.meta.seq))
            pool = mine[0] if mine else None
        ds.set_pool(pool)
        ds.replace_pods(objs.pods)
        ds.replace_models(objs.models)
        ds.replace_rewrites(objs.rewrites)
        ds.replace_objectives(objs.objectives)
        log.info("manifests loaded", extra={
            "pool": pool.meta.key if pool else None, "endpoints": len(ds.endpoints), "models": len(objs.models),
            "rewrites": len(objs.rewrites), "objectives": len(objs.objectives), "errors": len(self.errors)})

    async def start(self) -> None:
        self.load()
        self._task = asyncio.create_task(self._watch(), name="manifest-watch")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                # the files are read and parsed on a thread: a large manifest takes many ms to parse,
                # which on the serving loop every request would wait for; the datastore changes here
                self._settle(await asyncio.to_thread(self._scan))
            except Exception:  # never let a bad file stop reloading
                log.exception("manifest reload failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

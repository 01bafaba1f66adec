"""No-cluster mode: the objects a cluster would hold, read from YAML/JSON files, reloaded on change.

`--manifests PATH` names a file or a directory (read recursively: *.yaml, *.yml, *.json). Every
document of a kind the picker reads is parsed with the same code the Kubernetes source uses. An
invalid object is reported once, by file, document and field, and skipped; a file that stops
parsing as YAML keeps its last good objects until it is fixed. Changes are found by polling
mtimes and sizes (no inotify dependency; a 1 s poll of a few files costs nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field

import yaml

from epp.datastore import Datastore
from epp.resources import GROUP_V1, InferencePool, ObjectSet, ResourceError, is_known, parse_object

log = logging.getLogger("epp.sources.files")

_EXTENSIONS = (".yaml", ".yml", ".json")


@dataclass(slots=True)
class _FileState:
    stamp: tuple[int, int]
    objects: list = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


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


def parse_file(path: str, text: str, namespace: str, seq_base: int) -> tuple[list, list[str]]:
    """Typed objects and error lines ("file: document N (Kind/name): field: message") of one file."""
    objects: list = []
    errors: list[str] = []
    docs = list(yaml.safe_load_all(text))  # raises yaml.YAMLError for the whole file
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
                errors.append(f"{path}: {where} ({obj.get('kind')}/{name}): {e}")
    return objects, errors


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
        changed = False
        seen = set()
        for seq_base, path in enumerate(_list_files(self.paths)):
            seen.add(path)
            try:
                st = os.stat(path)
            except OSError:
                continue
            stamp = (st.st_mtime_ns, st.st_size)
            old = self._files.get(path)
            if old is not None and old.stamp == stamp:
                continue
            changed = True
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                objects, errors = parse_file(path, text, self.datastore.pool_namespace, seq_base * 10_000)
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
                msg = str(e).replace("\n", " ")
                log.error("manifest unreadable; keeping its last good objects",
                          extra={"file": path, "error": msg})
                self._files[path] = _FileState(stamp, old.objects if old else [], [f"{path}: {msg}"])
                continue
            for err in errors:
                log.error("invalid object skipped", extra={"error": err})
            self._files[path] = _FileState(stamp, objects, errors)
        for gone in [p for p in self._files if p not in seen]:
            del self._files[gone]
            changed = True
        if changed or not self.datastore.synced:
            self._apply()
        return changed

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
                self.load()
            except Exception:  # never let a bad file stop reloading
                log.exception("manifest reload failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

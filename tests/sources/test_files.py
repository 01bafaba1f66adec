"""No-cluster source: directories, lists, bad YAML keeps the last good objects, deletions apply."""

from __future__ import annotations

import asyncio
import os
import textwrap
import time

from epp.datastore import Datastore
from epp.sources import files
from epp.sources.files import FileSource

POOL = """
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: p}
spec: {selector: {matchLabels: {app: x}}, targetPorts: [{number: 8000}]}
"""
PODS = """
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Pod
    metadata: {name: a, labels: {app: x}}
    status: {podIP: 10.0.0.1, conditions: [{type: Ready, status: "True"}]}
  - apiVersion: v1
    kind: Pod
    metadata: {name: b, labels: {app: x}}
    status: {podIP: 10.0.0.2, conditions: [{type: Ready, status: "True"}]}
  - apiVersion: v1
    kind: ConfigMap
    metadata: {name: ignored}
"""


_tick = [0]


def touch(path, text):
    """Write `text` with a distinct mtime in the past: the change is seen even within one mtime tick,
    and it is already older than the source's settle time."""
    path.write_text(textwrap.dedent(text))
    _tick[0] += 1
    t = time.time_ns() - 60 * 10**9 + _tick[0] * 10**6
    os.utime(path, ns=(t, t))


def test_directory_lists_and_reload(tmp_path):
    (tmp_path / "sub").mkdir()
    touch(tmp_path / "pool.yaml", POOL)
    touch(tmp_path / "sub" / "pods.yml", PODS)
    (tmp_path / "notes.txt").write_text("not a manifest")
    ds = Datastore("p")
    src = FileSource(ds, [str(tmp_path)])
    src.load()
    assert sorted(ds.endpoints) == ["10.0.0.1:8000", "10.0.0.2:8000"] and not src.errors

    touch(tmp_path / "sub" / "pods.yml", "items: [\n  - broken")  # YAML syntax error
    src.load()
    assert sorted(ds.endpoints) == ["10.0.0.1:8000", "10.0.0.2:8000"]  # last good objects kept
    assert any("pods.yml" in e for e in src.errors)

    os.remove(tmp_path / "sub" / "pods.yml")
    src.load()
    assert not ds.endpoints and ds.ready  # pool still there, pods gone
    os.remove(tmp_path / "pool.yaml")
    src.load()
    assert not ds.ready


def test_preferred_pool_group_and_field_errors(tmp_path):
    touch(tmp_path / "a.yaml", POOL.replace("8000", "8001") + """
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferencePool
metadata: {name: p}
spec: {selector: {app: x}, targetPortNumber: 9000}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata: {name: bad}
spec: {modelName: m, poolRef: {name: p}, criticality: Urgent}
""")
    ds = Datastore("p")
    src = FileSource(ds, [str(tmp_path / "a.yaml")], pool_group="inference.networking.x-k8s.io")
    src.load()
    assert ds.pool is not None and ds.pool.target_ports == (9000,)
    assert len(src.errors) == 1
    assert "a.yaml: document 3 (InferenceModel/bad): spec.criticality" in src.errors[0]


GOOD = POOL + "---\n" + PODS


def test_empty_or_garbage_file_keeps_the_pool_until_good_again(tmp_path, caplog):
    f = tmp_path / "m.yaml"
    touch(f, GOOD)
    ds = Datastore("p")
    src = FileSource(ds, [str(f)])
    src.load()
    assert ds.ready and sorted(ds.endpoints) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    bad_versions = [
        "",  # truncated to zero bytes: the moment a rewrite starts
        "\n  # only a comment\n",
        "{{{ not yaml",
        "just some words",  # YAML, but a scalar: not a manifest
        "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata: {name: p}\nspec:",  # cut short
    ]
    for text in bad_versions:
        touch(f, text)
        caplog.clear()
        src.load()
        assert ds.ready and ds.pool is not None, text
        assert ds.pool.target_ports == (8000,), text
        src.load()  # the same broken version again: not logged twice
        logged = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(logged) == 1, (text, [r.getMessage() for r in logged])
        assert src.errors and "m.yaml" in src.errors[0]
        assert sorted(ds.endpoints) == ["10.0.0.1:8000", "10.0.0.2:8000"], text
    touch(f, GOOD.replace("8000", "8001"))
    src.load()
    assert sorted(ds.endpoints) == ["10.0.0.1:8001", "10.0.0.2:8001"] and not src.errors


def test_newly_invalid_object_keeps_the_last_good_file(tmp_path):
    f = tmp_path / "m.yaml"
    touch(f, GOOD)
    ds = Datastore("p")
    src = FileSource(ds, [str(f)])
    src.load()
    # a pod edit and a pool that turned invalid: the whole last good version stays
    touch(f, GOOD.replace("targetPorts: [{number: 8000}]", "targetPorts: [{number: not-a-port}]")
          .replace("10.0.0.2", "10.0.0.3"))
    src.load()
    assert ds.pool is not None and ds.pool.target_ports == (8000,)
    assert sorted(ds.endpoints) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert len(src.errors) == 1 and "spec.targetPorts[0].number" in src.errors[0]
    # an object invalid from the first read does not block later edits of the others
    bad_model = ("---\napiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModel\n"
                 "metadata: {name: bad}\nspec: {modelName: m, poolRef: {name: p}, criticality: Urgent}\n")
    touch(f, GOOD + bad_model)
    ds = Datastore("p")
    src = FileSource(ds, [str(f)])
    src.load()
    assert ds.ready and len(src.errors) == 1 and "InferenceModel/bad" in src.errors[0]
    touch(f, GOOD.replace("10.0.0.2", "10.0.0.3") + bad_model)
    src.load()
    assert sorted(ds.endpoints) == ["10.0.0.1:8000", "10.0.0.3:8000"]
    os.remove(f)
    src.load()
    assert not ds.ready  # deleting the file does remove the pool


def test_a_just_written_file_waits_for_the_settle_time(tmp_path):
    from epp.sources import files

    f = tmp_path / "m.yaml"
    touch(f, GOOD)
    ds = Datastore("p")
    src = FileSource(ds, [str(f)])
    src.load()
    f.write_text(GOOD.replace("10.0.0.2", "10.0.0.3"))  # mtime: now
    src.load()
    assert sorted(ds.endpoints) == ["10.0.0.1:8000", "10.0.0.2:8000"]  # not yet
    for _ in range(100):  # bounded: the settle time is a fraction of a second
        time.sleep(files.SETTLE / 4)
        src.load()
        if "10.0.0.3:8000" in ds.endpoints:
            break
    assert sorted(ds.endpoints) == ["10.0.0.1:8000", "10.0.0.3:8000"]


def test_pool_survives_a_file_being_rewritten_while_polled(tmp_path):
    """A writer rewrites the manifest in place (truncate, then two writes) while load() polls it:
    the pool is never dropped and the endpoints are always one of the complete versions."""
    import threading

    f = tmp_path / "m.yaml"
    versions = [GOOD, GOOD.replace("10.0.0.2", "10.0.0.3")]
    touch(f, versions[0])
    ds = Datastore("p")
    src = FileSource(ds, [str(f)])
    src.load()
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set() and n < 20_000:
            text = versions[n % 2]
            with open(f, "w") as out:  # truncates first: readers may see 0 bytes or half a file
                cut = len(POOL) // 2 + n % 40
                out.write(text[:cut])
                out.flush()
                out.write(text[cut:])
            n += 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    seen = set()
    try:
        for _ in range(400):
            src.load()
            assert ds.ready and ds.pool is not None and ds.pool.target_ports == (8000,)
            seen.add(tuple(sorted(ds.endpoints)))
    finally:
        stop.set()
        t.join(timeout=10)
    allowed = {("10.0.0.1:8000", "10.0.0.2:8000"), ("10.0.0.1:8000", "10.0.0.3:8000")}
    assert seen <= allowed, seen


async def test_a_slow_reload_does_not_hold_up_the_serving_loop(tmp_path, monkeypatch):
    """Reading and parsing a changed manifest happens off the event loop: the loop keeps running
    while a (here artificially) slow parse is under way, and the result is applied afterwards."""
    touch(tmp_path / "pool.yaml", POOL)
    touch(tmp_path / "pods.yaml", PODS)
    ds = Datastore("p")
    src = FileSource(ds, [str(tmp_path)], interval=0.05)
    await src.start()
    try:
        assert sorted(ds.endpoints) == ["10.0.0.1:8000", "10.0.0.2:8000"]
        real = files.parse_file
        parsing = asyncio.Event()
        loop = asyncio.get_running_loop()

        def slow_parse(*args, **kwargs):
            loop.call_soon_threadsafe(parsing.set)
            time.sleep(0.6)  # a parse this long on the loop would stall every request
            return real(*args, **kwargs)

        monkeypatch.setattr(files, "parse_file", slow_parse)
        touch(tmp_path / "pods.yaml", PODS.replace("10.0.0.2", "10.0.0.9"))
        await asyncio.wait_for(parsing.wait(), 5)
        gaps, last = [], loop.time()
        deadline = last + 5
        while sorted(ds.endpoints) != ["10.0.0.1:8000", "10.0.0.9:8000"]:
            await asyncio.sleep(0.01)
            now = loop.time()
            gaps.append(now - last)
            last = now
            assert now < deadline, "the reload never applied"
        assert len(gaps) > 10 and max(gaps) < 0.3, f"the loop stalled during the reload: {max(gaps):.2f} s"
    finally:
        await src.stop()

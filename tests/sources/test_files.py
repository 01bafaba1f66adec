"""No-cluster source: directories, lists, bad YAML keeps the last good objects, deletions apply."""

from __future__ import annotations

import os
import textwrap

from epp.datastore import Datastore
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


def touch(path, text):
    path.write_text(textwrap.dedent(text))
    st = os.stat(path)  # make sure the change is seen even within one mtime tick
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


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

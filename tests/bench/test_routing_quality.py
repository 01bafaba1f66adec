"""The routing-quality benchmark still runs end to end on a tiny configuration and prints its tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "routing_quality.py"


def test_tiny_run_produces_tables_and_json(tmp_path: Path) -> None:
    out_json = tmp_path / "rq.json"
    out_md = tmp_path / "rq.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--no-plots", "--json", str(out_json), "--markdown", str(out_md)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    for heading in ("### Capacity, 4 servers", "### shared-prefix, 4 servers", "### lora, 4 servers",
                    "### Goals, 4 servers", "### Picker replicas: shared-prefix"):
        assert heading in text
    assert "| policy | TTFT p50 ms | p90 | p99 |" in text
    md = out_md.read_text()
    header = "| policy | TTFT p50 ms |"
    assert "### Goals, 4 servers" in md and md.count(header) == text.count(header)

    data = json.loads(out_json.read_text())
    runs = data["runs"]["4"]
    assert set(runs) == {"shared-prefix", "lora"}
    policies = runs["shared-prefix"]["85"]
    assert {"random", "round-robin", "least-request-p2c", "reference", "default"} <= set(policies)
    for name, m in policies.items():
        assert m["requests"] > 0, name
        assert 0.0 < m["ttft_p50"] <= m["ttft_p90"] <= m["ttft_p99"], name
        assert m["e2e_p50"] <= m["e2e_p90"], name
        assert 0.0 <= m["hit_rate"] <= 1.0 and m["rate_429"] == 0.0 and m["failed"] == 0.0, name
    # round-robin spreads requests exactly; prefix-aware routing finds more cached prompt tokens
    assert policies["round-robin"]["requests_cv"] < 0.05
    assert policies["default"]["hit_rate"] > policies["random"]["hit_rate"]
    assert data["capacity"]["4"]["shared-prefix"] > 0
    assert set(data["replicas"]["shared-prefix"]["default (index)"]) == {"1", "2"}

    # the doc refresher fills marked blocks from the JSON and leaves the prose alone
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- routing:goals-4 -->\nold\n<!-- /routing -->\nmiddle\n"
                   "<!-- routing:detail85-4 -->\n<!-- /routing -->\nend\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "routing_doc.py"), str(out_json), str(doc)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    filled = doc.read_text()
    assert filled.startswith("intro\n") and "\nmiddle\n" in filled and filled.endswith("end\n")
    assert "old" not in filled and "| goal | measured |" in filled
    assert "**shared-prefix, 4 servers, 85% (" in filled and "**lora, 4 servers, 85% (" in filled


def test_picker_policy_accounts_like_the_director() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from routing_policies import PickerPolicy, policy
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from epp.scheduling.config import load_config
    from epp.sim.des import Cluster
    from epp.sim.workload import shared_prefix

    pol = PickerPolicy(load_config(None), replicas=2, seed=3)
    seen: list[tuple[int, int]] = []

    class Spy:  # the picker policy, recording its own in-flight total against the cluster's
        def choose(self, request, servers):  # type: ignore[no-untyped-def]
            i = pol.choose(request, servers)
            seen.append((sum(e.inflight for r in pol._replicas for e in r.endpoints),
                         sum(e.inflight for e in servers)))
            return i

        def on_complete(self, result):  # type: ignore[no-untyped-def]
            pol.on_complete(result)

    cluster = Cluster(3, Spy(), seed=3)
    pol.bind(cluster)
    results = cluster.run(shared_prefix(200, 150.0, groups=4, seed=5))
    assert len(results) == 200 and all(r.ok for r in results)
    assert pol.outstanding == 0
    # the replicas' own counts (what their schedulers see) track the cluster's and drain to zero
    assert all(mine == total + 1 for mine, total in seen)  # the cluster counts the new one after choose
    assert all(e.inflight == 0 and e.inflight_tokens == 0 for r in pol._replicas for e in r.endpoints)
    assert policy("least-request-p2c").make(1, 1).choose(results[0].request, cluster.endpoints) in range(3)

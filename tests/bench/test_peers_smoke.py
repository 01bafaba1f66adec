"""The live peer benchmark runs a tiny cell end to end and produces its figures: our picker behind a
real Envoy, Envoy round-robin, and each peer router whose package is installed (the `bench` extra)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "peers.py"

pytestmark = pytest.mark.envoy


def run_tiny(tmp_path: Path, policies: list[str], *extra: str) -> tuple[dict[str, Any], str]:
    out_json, out_md = tmp_path / "peers.json", tmp_path / "peers.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--workloads", "shared-prefix", "--loads", "50", "--policies", *policies,
         "--repeats", "1", "--seconds", "2", "--warmup", "1", "--no-plots", "--json", str(out_json),
         "--markdown", str(out_md), *extra],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out_json.read_text()), out_md.read_text()


def check_cell(cell: dict[str, Any]) -> None:
    name = cell["policy"]
    assert "failed" not in cell, cell
    assert cell["requests"] > 0 and cell["ok"] == cell["requests"] and cell["errors"] == 0, name
    assert 0.0 < cell["ttft_p50"] <= cell["ttft_p90"] <= cell["ttft_p99"] <= cell["e2e_p99"], name
    assert cell["e2e_p50"] <= cell["e2e_p90"] <= cell["e2e_p99"], name
    assert 0.0 < cell["hit_rate"] <= 1.0, name
    assert cell["output_tok_s"] > 0, name
    # every measured request was served by one of the 4 simulators (the counters moved by as much)
    assert len(cell["per_pod"]) == 4 and sum(cell["per_pod"]) == cell["requests"], name
    assert math.isfinite(cell["cpu_ms_per_req"]) and cell["cpu_ms_per_req"] >= 0, name
    assert len(cell["loadavg"]) == 2, name


def test_ours_and_envoy_round_robin(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    data, md = run_tiny(tmp_path, ["ours", "envoy-rr"], "--request-log", str(log))
    cells = {c["policy"]: c for c in data["cells"]}
    assert set(cells) == {"ours", "envoy-rr"}
    for cell in cells.values():
        check_cell(cell)
    # prefix-aware routing finds more of the shared prompts cached than round-robin does
    assert cells["ours"]["hit_rate"] > cells["envoy-rr"]["hit_rate"]
    assert cells["envoy-rr"]["pod_cv"] < 0.2  # round-robin spreads evenly
    assert "**shared-prefix, 50% (" in md and "| policy | TTFT p50 ms |" in md
    assert "| shared-prefix 50% |" not in md  # no peer in this run: no comparison row
    # the request log carries each request's id, pod and the server's own TTFT; replayed with the
    # logged pods, the discrete-event twin gives back what the live servers reported
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["policy"] for r in logged} == {"ours", "envoy-rr"}
    assert all(r["id"] and r["pod"].startswith("pod-") and r["sim_ttft"] is not None for r in logged)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--replay", str(log)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for policy in ("ours", "envoy-rr"):
        row = next(line for line in proc.stdout.splitlines() if line.startswith(f"| shared-prefix {policy} seed 1 |"))
        twin, served, client = (float(c) for c in row.strip("|").split("|")[1:])
        assert twin == pytest.approx(served, rel=0.05), row
        assert client >= served * 0.95, row  # the client's TTFT adds the path to the server's


@pytest.mark.parametrize(("policy", "module"), [("sglang-cache", "sglang_router"), ("vllm-cache", "vllm_router")])
def test_peer_router(tmp_path: Path, policy: str, module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install '.[bench]')")
    data, md = run_tiny(tmp_path, [policy])
    (cell,) = data["cells"]
    assert cell["policy"] == policy
    check_cell(cell)
    assert cell["hit_rate"] > 0.3  # cache-aware: a group's prompt is found again
    assert f"| {policy} |" in md


def test_variants_build_and_new_default_is_the_default() -> None:
    # the variants are changes to the previous default; "new-default" must stay what runs without a config
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import peers
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from epp.scheduling.config import load_config

    for name in peers.VARIANTS:
        load_config(peers.variant_text(name))  # every variant is a valid config
    # the default is the second round's (`new-default` = `round2-default`) plus the backlog preset
    # with coldPrompts (since 2026-12-04; `backlog1.5-hit50-move4s-idle` is the one before)
    new, default = load_config(peers.variant_text("backlog-cold")), load_config(None)
    assert new.plugins == default.plugins
    def weights(cfg: Any) -> list[tuple[str, float]]:
        return [(e.plugin, e.weight) for e in cfg.profile.entries]

    assert weights(new) == weights(default)
    round2, old2 = load_config(peers.variant_text("round2-default")), load_config(peers.variant_text("new-default"))
    assert round2.plugins == old2.plugins and weights(round2) == weights(old2)
    assert "prefill-backlog-scorer" not in {p.type for p in round2.plugins}
    assert load_config(peers.variant_text("previous-default")).plugins != default.plugins

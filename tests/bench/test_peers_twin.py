"""The peers' discrete-event twin (bench/peers.py): its cold rule, the live cells' own schedule in the
twin (`--des-live`), and the replay of a request log with the logged pods (`--replay`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def peers() -> ModuleType:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import peers as mod
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return mod


class _Server:
    def __init__(self, inflight: int) -> None:
        self.inflight = inflight


def test_cold_prompt_goes_to_the_least_loaded_worker(peers: ModuleType) -> None:
    from epp.sim.des import SimRequest

    twin, tree = peers.CacheAwareTwin(), peers.CacheAwareTwin(cold="smallest-tree")
    warm = SimRequest("a", "x" * 400, max_tokens=4, model="")
    servers = [_Server(0), _Server(0), _Server(0)]
    assert twin.choose(warm, servers) == tree.choose(warm, servers) == 0  # empty trees: ties to the first
    # a prompt sharing nothing: the installed router's rule takes the least loaded worker, though worker 0
    # holds the only tree; the older documented rule takes a worker with the smallest tree
    cold = SimRequest("b", "y" * 400, max_tokens=4, model="")
    loaded = [_Server(1), _Server(5), _Server(3)]
    assert twin.choose(cold, loaded) == 0
    assert tree.choose(cold, loaded) == 1
    again = SimRequest("c", "x" * 400, max_tokens=4, model="")  # found again where it went, however loaded
    assert twin.choose(again, [_Server(9), _Server(0), _Server(0)]) == 0


def _log_twin_cell(peers: ModuleType, path: Path, rate: float, seconds: float, seed: int) -> float:
    """Run the peers' twin on a live cell's schedule and write what --request-log would have logged;
    returns the cell's p90 TTFT (ms)."""
    w = peers.workload("shared-prefix")
    plan = peers.schedule(w, rate, seconds, 2.0, seed)
    results, ids = peers._twin_cell(w, plan, seed, peers.CacheAwareTwin())
    by_id = {r.request_id: r for r in results}
    with path.open("w") as f:
        for _, measured, req in plan:
            r = by_id[req.request_id]
            f.write(json.dumps({"workload": "shared-prefix", "rate": rate, "policy": "twin", "seed": seed,
                                "id": req.request_id, "measured": measured, "status": 200,
                                "pod": f"pod-{r.server}", "ttft": r.ttft, "sim_ttft": r.ttft}) + "\n")
    p90: float = peers._p90_ms(results, ids)
    return p90


def test_replay_gives_back_the_logged_cell(peers: ModuleType, tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    p90 = _log_twin_cell(peers, log, rate=12.0, seconds=6.0, seed=3)
    (text,) = peers.replay(log, 2.0)
    row = next(line for line in text.splitlines() if line.startswith("| shared-prefix twin seed 3 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # the same placements in the same twin: the same TTFTs, and the logged server-side ones
    assert float(cells[1]) == pytest.approx(p90, abs=0.5)
    assert float(cells[2]) == pytest.approx(p90, abs=0.5)


def test_replay_names_a_log_that_does_not_match_the_schedule(peers: ModuleType, tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    _log_twin_cell(peers, log, rate=12.0, seconds=6.0, seed=3)
    lines = log.read_text().splitlines()
    del lines[len(lines) // 2]  # one request missing: its pod is unknown, the replay would not be this cell
    log.write_text("\n".join(lines) + "\n")
    (text,) = peers.replay(log, 2.0)
    assert "schedule differs from the log" in text


def test_des_live_reports_each_policy_against_the_peers_twin(peers: ModuleType) -> None:
    caps: dict[str, Any] = {"bursty": 20.0}
    (text,) = peers.des_live(["bursty"], [70], caps, seed=1, seeds=2, seconds=6.0, warmup=2.0,
                             configs={"round2": peers.variant_text("round2-default")})
    assert "seeds 1-2" in text
    header = next(line for line in text.splitlines() if line.startswith("| cell |"))
    assert "peers' cache_aware (twin)" in header and "| default |" in header and "ours:round2" in header
    row = next(line for line in text.splitlines() if line.startswith("| bursty 70% |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0  # the peers' twin: a mean, no count against itself
    for cell in cells[2:]:  # every other policy: a mean and how many of the 2 seeds were at or below the peers
        mean, wins = cell.split(" ")
        assert float(mean) > 0 and wins in ("(0/2)", "(1/2)", "(2/2)")

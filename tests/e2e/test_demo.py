"""`python -m epp.demo` as a user runs it: a short run prints the report and leaves no process
behind; Ctrl-C (SIGINT) mid-run stops everything too."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from epp.demo import PODS
from tests.e2e.conftest import needs_envoy

pytestmark = [pytest.mark.envoy, needs_envoy]

REPO = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (the demo's working directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


async def run_demo(tmp_path: Path, *args: str, interrupt_after: float | None = None) -> tuple[int, str, dict[str, Any]]:
    out = tmp_path / "report.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp.demo", "--report-json", str(out), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=REPO,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        if interrupt_after is not None:
            while True:
                line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
                assert line, "demo exited early:\n" + "".join(lines)
                lines.append(line)
                if line.startswith("sending the mixed workload"):
                    break
            await asyncio.sleep(interrupt_after)
            proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = "".join(lines) + rest.decode()
    assert out.exists(), text
    return int(proc.returncode or 0), text, json.loads(out.read_text())


def assert_nothing_left(data: dict[str, Any]) -> None:
    assert len(data["pids"]) >= PODS + 1
    assert [p for p in data["pids"] if alive(p)] == []
    if Path("/proc").is_dir():
        assert processes_mentioning(data["workdir"]) == []
    assert not Path(data["workdir"]).exists()  # the temporary configs and logs are removed


async def test_demo_runs_reports_and_cleans_up(tmp_path: Path) -> None:
    code, text, data = await run_demo(tmp_path, "--seconds", "5", "--concurrency", "8")
    assert code == 0, text
    assert "== epp demo report: policy=default" in text
    for needle in ("per pod", "TTFT", "prefix-cache hit rate", "429s", "LoRA requests"):
        assert needle in text
    rep = data["report"]
    assert rep["ok"] > 0
    assert set(rep["per_pod"]) == {f"pod-{i}" for i in range(PODS)}
    assert sum(rep["per_pod"].values()) == rep["ok"]
    assert rep["requests"] == rep["ok"] + rep["status_429"] + sum(rep["errors"].values())
    assert rep["ttft_ms"]["n"] > 0 and rep["ttft_ms"]["p50"] <= rep["ttft_ms"]["p90"]
    assert rep["prefix_cache_hit_rate"] is not None and 0.0 < rep["prefix_cache_hit_rate"] <= 1.0
    # an adapter request can only succeed on the pod that has the adapter
    assert rep["lora"]["ok"] == rep["lora"]["on_adapter_pod"]
    assert set(rep["by_kind"]) <= {"shared-prefix", "multi-turn", "lora", "completion"}
    assert_nothing_left(data)


async def test_demo_round_robin_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    code, text, data = await run_demo(tmp_path, "--seconds", "60", "--policy", "round-robin", "--concurrency", "8",
                                      interrupt_after=2.0)  # fmt: skip
    assert code == 130, text
    assert "interrupted" in text
    assert "== epp demo report: policy=round-robin" in text
    assert data["report"]["requests"] > 0
    assert "picker" not in text.split("epp demo: stopped", 1)[1]  # round-robin runs no picker
    assert_nothing_left(data)

"""Latency the picker's path adds, measured by a load generator that is not Python (`wrk`).

    .venv/bin/python bench/e2e_wrk.py [--seconds 6] [--connections 1 4] [--paths ours ours-duplex envoy-rr]
        [--variant NAME="PICKER FLAGS"]   (also path ours:NAME: the default with those flags)

4 simulated vLLM servers (`python -m epp.sim --time-scale 0.01`: a 1-token completion answers in
well under a millisecond, so the path is what is measured) behind Envoy: with the picker as
`make demo` runs it (the generated default profile, buffered; TLS), with the generated duplex
profile (the reference's), or Envoy alone round-robin. `wrk` (Debian's package: `apt-get install
wrk`) posts 1-token completions over keep-alive connections, closed loop: with 1 connection the
path is unloaded; the capacity line
(16 connections) says what share of it each connection count used. Added latency = a percentile
of the path minus the same percentile of Envoy alone at the same connection count. CPU of the
picker and Envoy per request from /proc, and the load average, are printed with every row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402

from epp.demo import Stack  # noqa: E402
from epp.sim.config import DEFAULT_MODEL  # noqa: E402

_BODY = json.dumps({"model": DEFAULT_MODEL, "prompt": "say one word about routing", "max_tokens": 1})
LUA = f"""wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.body = '{_BODY}'
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def wrk(url: str, connections: int, seconds: float, script: Path) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script),
                          f"{url}/v1/completions"], capture_output=True, text=True, timeout=seconds + 30).stdout
    res: dict[str, float] = {}
    for q in ("50", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", out, re.M)
        res[f"p{q}"] = _ms(m.group(1)) if m else float("nan")
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    res["errors"] = float(m.group(1)) if m else 0.0
    return res


VARIANTS: dict[str, list[str]] = {}  # "ours:NAME" -> extra picker flags (--variant NAME="FLAGS")


async def cell(path: str, conns: list[int], seconds: float, script: Path) -> list[dict[str, float | str]]:
    stack = Stack(policy="round-robin" if path == "envoy-rr" else "default", time_scale=0.01,
                  picker_args=VARIANTS.get(path, []))
    if path == "ours-duplex":
        stack.profile = "duplex"
    rows: list[dict[str, float | str]] = []
    try:
        await stack.start()
        pids = [c.proc.pid for c in stack.children if c.name in ("picker", "envoy")]
        wrk(stack.url, 4, 1.0, script)  # warm-up
        cap = await asyncio.to_thread(wrk, stack.url, 16, seconds, script)
        for c in conns:
            load = peers.loadavg()
            cpu0 = peers.group_cpu(pids)
            r = await asyncio.to_thread(wrk, stack.url, c, seconds, script)
            cpu = peers.group_cpu(pids) - cpu0
            r["cpu_ms"] = 1000.0 * cpu / max(1.0, r["rps"] * seconds)
            rows.append({"path": path, "connections": c, "capacity": cap["rps"], "load": load, **r})
    finally:
        await stack.close()
    return rows


async def amain(a: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "post.lua"
        script.write_text(LUA)
        rows = []
        for path in a.paths:
            rows += await cell(path, a.connections, a.seconds, script)
    base = {r["connections"]: r for r in rows if r["path"] == "envoy-rr"}
    print("| path | connections | req/s (capacity at 16) | p50 | p90 | p99 | added p50 / p99 | CPU ms/req "
          "(picker + Envoy) | errors | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = base.get(r["connections"])
        added = (f"{r['p50'] - b['p50']:.2f} / {r['p99'] - b['p99']:.2f} ms" if b is not None and r is not b else "–")
        print(f"| {r['path']} | {r['connections']} | {r['rps']:.0f} ({r['capacity']:.0f}) | {r['p50']:.2f} ms | "
              f"{r['p90']:.2f} ms | {r['p99']:.2f} ms | {added} | {r['cpu_ms']:.2f} | {r['errors']:.0f} | "
              f"{r['load']:.2f} |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--connections", type=int, nargs="+", default=[1, 4])
    p.add_argument("--paths", nargs="+", default=["ours", "ours-duplex", "envoy-rr"],
                   choices=["ours", "ours-duplex", "envoy-rr"])
    p.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                   help="also run path ours:NAME, the default with these picker flags (an A/B); repeatable")
    a = p.parse_args()
    VARIANTS.update(peers.picker_variants(p, a.variant))
    a.paths += list(VARIANTS)
    return asyncio.run(amain(a))


if __name__ == "__main__":
    sys.exit(main())

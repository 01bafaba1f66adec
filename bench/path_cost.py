"""CPU per request of the whole routing path, side by side, at the same request rate (issue 17).

    .venv/bin/python bench/path_cost.py                  # every path, 8 s each, ~2 min
    options: --paths ours ours-duplex envoy-rr sglang-rr vllm-rr  --rate 16  --seconds 8
             --tokens 128  --prompt-chars 800  --repeats 1  --json PATH
             --variant NAME="PICKER FLAGS"   (also path ours:NAME, interleaved: an A/B on one VM phase)

Every cell gets fresh processes: 4 simulated vLLM servers in real time (`python -m epp.sim`, as
`make demo` runs them) and the path under test:

  ours           Envoy + our picker as `make demo` runs them: the config `python -m epp envoy-config`
                 generates (its default profile, buffered: the response body only for the requests
                 that need it, mode_override; picker over TLS, ORIGINAL_DST), `python -m epp` with no
                 tuning flags;
  ours-duplex    the same with the generated duplex profile (the reference's: every SSE chunk of the
                 response crosses the picker);
  ours-lean      the same with the generated lean profile (no response phase at all: 2 messages a
                 request, like the default's unsampled ones);
  envoy-rr       the same Envoy with the picker taken out (STATIC cluster, ROUND_ROBIN): the floor;
  sglang-rr / vllm-rr   the Rust routers (bench/peers.py's command lines), round robin: full proxies.

Load: open-loop Poisson arrivals at --rate of streaming chat completions (--tokens output tokens,
`stream_options.include_usage`), after a 2 s warm-up at the same rate that is left out. CPU: each
process group's CPU clock (bench/cpuclock.py: exact, where /proc's ticks were 10 ms; the picker and
Envoy apart), less the idle rate each process shows over 3 s before the traffic (what it burns with
no requests: scraping at its idle intervals, timers), divided by the requests completed. The
simulators' own CPU is reported too, at idle: the difference between `ours` and `envoy-rr` there is
what scraping costs the model servers. /proc/loadavg at the
start and the end of every cell says how busy the (shared) machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpuclock  # noqa: E402
import peers  # noqa: E402  (launch code and the /proc readers are shared with the peer benchmark)

from epp.demo import Stack  # noqa: E402
from epp.sim.des import SimRequest  # noqa: E402

PATHS = ("ours", "ours-duplex", "ours-lean", "ours-grpcio", "ours-plain", "envoy-rr", "sglang-rr", "vllm-rr")
DEFAULT_PATHS = ("ours", "ours-duplex", "envoy-rr", "sglang-rr", "vllm-rr")  # the others are A/Bs
WARMUP_S = 2.0
IDLE_S = 3.0  # idle rate read over this long before the traffic (the adaptive scrape has settled)
_WORDS = ("token", "cache", "route", "pod", "model", "batch")
SIM_ARGS = ["--num-gpu-blocks", str(peers.KV_BLOCKS)]


class Cell:
    """The processes of one path: its URL, the process groups to measure, how to stop it."""

    def __init__(self, url: str, groups: dict[str, list[int]], stop: Any) -> None:
        self.url = url
        self.groups = groups  # role -> process-group ids (picker, envoy, router, sims)
        self.stop = stop

    def cpu(self) -> dict[str, float]:
        return {role: peers.group_cpu(pids) for role, pids in self.groups.items()}


VARIANTS: dict[str, list[str]] = {}  # "ours:NAME" -> extra picker flags (--variant NAME="FLAGS")


async def start(path: str) -> Cell:
    extra = VARIANTS.get(path)
    if extra is not None:
        path = "ours"
    if path in ("ours", "ours-duplex", "ours-lean", "ours-grpcio", "ours-plain", "envoy-rr"):
        # ours-grpcio: the default with the picker's gRPC on grpc.aio (--grpc-server grpcio), the A/B;
        # ours-plain: the default with plaintext between Envoy and the picker (what TLS costs both)
        stack = Stack(policy="round-robin" if path == "envoy-rr" else "default", pods=peers.PODS,
                      sim_args=SIM_ARGS,
                      picker_args=(["--grpc-server", "grpcio"] if path == "ours-grpcio" else []) + (extra or []),
                      picker_tls=path != "ours-plain")
        if path in ("ours-duplex", "ours-lean"):
            stack.profile = path.removeprefix("ours-")
        try:
            await stack.start()
        except BaseException:
            await stack.close()
            raise
        groups: dict[str, list[int]] = {"sims": [c.proc.pid for c in stack.children if c.name.startswith("pod-")]}
        for c in stack.children:
            if c.name in ("picker", "envoy"):
                groups[c.name] = [c.proc.pid]
        return Cell(stack.url, groups, stack.close)
    if not peers.peer_installed(path):
        raise RuntimeError(f"{path}: not installed")
    running = await peers.start_cell(path, peers.workload("shared-prefix"))
    sims = [pid for pid in _sim_pids(running)]
    return Cell(running.url, {"router": running.router_pids, "sims": sims}, running.stop)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of one process (bench/cpuclock.py, exact): the picker's serving
    loop is its main thread, the scraper thread "scraper", gRPC's threads their own."""
    return {("serving loop" if k == "main" else k): v for k, v in cpuclock.thread_cpu(pid).items()}


def _sim_pids(running: Any) -> list[int]:
    """The simulators' process groups of a peer cell (their children are in the stop closure)."""
    closure = getattr(running.stop, "__closure__", None) or ()
    for cell in closure:
        value = cell.cell_contents
        if isinstance(value, list) and value and hasattr(value[0], "proc"):
            return [c.proc.pid for c in value if c.name.startswith("pod-")]
    return []


def plan(rate: float, seconds: float, tokens: int, prompt_chars: int,
         seed: int) -> list[tuple[float, bool, SimRequest]]:
    """(send time s, measured?, request): a warm-up, then `seconds` of Poisson arrivals at `rate`."""
    rng = random.Random(seed)
    out: list[tuple[float, bool, SimRequest]] = []
    t = 0.0
    i = 0
    while t < WARMUP_S + seconds:
        words = " ".join(rng.choice(_WORDS) for _ in range(prompt_chars // 6))
        out.append((t, t >= WARMUP_S, SimRequest(prompt=f"{i} {words}", max_tokens=tokens, request_id=f"r{i}")))
        t += rng.expovariate(rate)
        i += 1
    return out


async def run_cell(path: str, rate: float, seconds: float, tokens: int, prompt_chars: int, seed: int) -> dict[str, Any]:
    cell = await start(path)
    picker = cell.groups.get("picker", [0])[0]

    def threads() -> dict[str, float]:
        return thread_cpu(picker) if picker else {}

    th0: dict[str, float] = {}
    load0 = peers.loadavg()
    try:
        # idle first: right after traffic the scraper still polls busy pods at the fast interval,
        # which would count traffic's own cost as idle
        await asyncio.sleep(0.5)
        idle0, thi0 = cell.cpu(), threads()
        await asyncio.sleep(IDLE_S)
        idle1, thi1 = cell.cpu(), threads()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=120)) as session:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            tasks: list[asyncio.Task[peers.Sent]] = []
            cpu0: dict[str, float] | None = None
            t_meas = 0.0
            for at, measured, req in plan(rate, seconds, tokens, prompt_chars, seed):
                delay = at - (loop.time() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                if measured and cpu0 is None:
                    cpu0, t_meas = cell.cpu(), loop.time()
                    th0 = threads()
                tasks.append(asyncio.create_task(peers.send_chat(session, cell.url, req, measured)))
            results = list(await asyncio.gather(*tasks))
            window = loop.time() - t_meas
            cpu1 = cell.cpu()
            th1 = threads()
        load1 = peers.loadavg()
    finally:
        await cell.stop()
    assert cpu0 is not None
    ok = [r for r in results if r.measured and r.status == 200]
    measured = [r for r in results if r.measured]
    per_role: dict[str, dict[str, float]] = {}
    for role in cell.groups:
        idle_rate = (idle1[role] - idle0[role]) / IDLE_S
        busy = max(0.0, cpu1[role] - cpu0[role] - idle_rate * window)
        per_role[role] = {"ms_per_req": 1000.0 * busy / len(ok) if ok else float("nan"),
                          "idle_pct": 100.0 * idle_rate, "total_ms_per_req":
                          1000.0 * (cpu1[role] - cpu0[role]) / len(ok) if ok else float("nan")}
    path_roles = [r for r in per_role if r != "sims"]
    # the picker's threads: ms per request over the window (gross), and each one's idle rate
    # (% of a core, read before the traffic, as for the processes)
    per_thread = {name: {"ms_per_req": (th1[name] - th0.get(name, 0.0)) * 1000.0 / len(ok),
                         "idle_pct": 100.0 * (thi1.get(name, 0.0) - thi0.get(name, 0.0)) / IDLE_S}
                  for name in th1} if ok and th1 else {}
    e2e = sorted(r.e2e for r in ok)
    ttft = sorted(r.ttft for r in ok if r.ttft is not None)
    return {
        "path": path, "rate": rate, "requests": len(measured), "ok": len(ok), "tokens_per_req":
        statistics.fmean(r.tokens for r in ok) if ok else 0.0,
        "path_ms_per_req": sum(per_role[r]["ms_per_req"] for r in path_roles),
        "roles": per_role, "picker_threads": per_thread,
        "ttft_p50": peers._pct(ttft, 0.5), "ttft_p99": peers._pct(ttft, 0.99),
        "e2e_p50": peers._pct(e2e, 0.5), "e2e_p99": peers._pct(e2e, 0.99), "loadavg": [load0, load1],
        "errors": sorted({r.error for r in measured if r.error})[:3],
    }


def render(rows: list[dict[str, Any]]) -> str:
    out = ["| path | req/s | ok | CPU ms/request (path, beyond idle) | picker | envoy / router | idle % of a core "
           "(path) | simulators idle % | TTFT p50 | e2e p50 | load avg |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        roles = r["roles"]
        pick = roles.get("picker", {}).get("ms_per_req")
        other = (roles.get("envoy") or roles.get("router") or {}).get("ms_per_req")
        idle = sum(v["idle_pct"] for k, v in roles.items() if k != "sims")
        out.append(f"| {r['path']} | {r['rate']:g} | {r['ok']}/{r['requests']} | {r['path_ms_per_req']:.2f} | "
                   f"{'-' if pick is None else f'{pick:.2f}'} | {'-' if other is None else f'{other:.2f}'} | "
                   f"{idle:.1f} | {roles['sims']['idle_pct']:.1f} | {1000 * r['ttft_p50']:.0f} ms | "
                   f"{1000 * r['e2e_p50']:.0f} ms | {r['loadavg'][0]:.2f}-{r['loadavg'][1]:.2f} |")
    return "\n".join(out)


async def amain(a: argparse.Namespace) -> int:
    rows = []
    for rep in range(a.repeats):
        order = list(a.paths) if rep % 2 == 0 else list(reversed(a.paths))
        for path in order:
            if path in ("sglang-rr", "vllm-rr") and not peers.peer_installed(path):
                print(f"[path_cost] {path}: not installed, skipped", file=sys.stderr)
                continue
            t = time.perf_counter()
            row = await run_cell(path, a.rate, a.seconds, a.tokens, a.prompt_chars, a.seed + rep)
            rows.append(row)
            print(f"[path_cost] {path}: {row['path_ms_per_req']:.2f} ms/request "
                  f"({row['ok']}/{row['requests']} ok, {time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
            if row["picker_threads"]:
                split = ", ".join(f"{k} {v['ms_per_req']:.2f} (idle {v['idle_pct']:.1f}%)"
                                  for k, v in sorted(row["picker_threads"].items(), key=lambda x: -x[1]["ms_per_req"])
                                  if v["ms_per_req"] >= 0.005)
                print(f"[path_cost]   picker threads, gross ms/request: {split}", file=sys.stderr, flush=True)
    print(render(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=float))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", nargs="+", default=list(DEFAULT_PATHS), choices=PATHS,
                   help=f"default: {' '.join(DEFAULT_PATHS)}")
    p.add_argument("--rate", type=float, default=16.0, help="requests per second (default %(default)s)")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--tokens", type=int, default=128, help="output tokens per request (default %(default)s)")
    p.add_argument("--prompt-chars", type=int, default=800)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default="")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                   help="also run path ours:NAME, the default with these picker flags, interleaved with the "
                        "others (an A/B on the same VM phase); repeatable")
    a = p.parse_args(argv)
    VARIANTS.update(peers.picker_variants(p, a.variant))
    a.paths += list(VARIANTS)
    return asyncio.run(amain(a))


if __name__ == "__main__":
    sys.exit(main())


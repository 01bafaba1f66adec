"""P/D disaggregation vs aggregated serving at equal pod count, in the discrete-event simulator.

Same engines (epp.sim defaults: Llama-3.1-8B-like on one H100, 8192-token steps with chunked
prefill), same workload stream and seed per row; routing by the picker's own schedulers:
- aggregated: N pods labelled `both`, one profile (decode-filter, prefix-cache-scorer x2,
  queue-scorer x1 over an approx-prefix-cache-producer: the decode profile of llm-d's
  pd-epp-config);
- P/D: P prefill + (N - P) decode pods, llm-d's pd-epp-config (disagg-profile-handler, decode
  first, then a prefill pod when the decider says so), with `always-disagg-pd-decider` or
  `prefix-based-pd-decider` at several `nonCachedTokens` thresholds; the KV transfer costs
  1 ms + 5 µs a token (epp.sim.pd.TransferCost).

Workloads (Poisson arrivals): `long` — 4k-token prompts sharing nothing, 256 output tokens;
`mixed` — 25% long (4k tokens, half of them on 8 shared 3k-token documents), 75% short chats
(200 tokens on 8 shared system prompts), 128-384 output tokens.

Reports TTFT and TPOT p50/p90 (ms), output tokens/s, share disaggregated. Run:
    .venv/bin/python bench/pd.py [--pods 4] [--requests 600] [--quick] [--json out.json]

`--sidecar-cost N` instead measures the live sidecar (epp.sidecar) over loopback against two
simulated engines at a near-zero time scale: wall ms per request sent to the engine directly,
through the sidecar without a prefill header, and through it with one (prefill leg + decode leg),
N requests each, one at a time, and the sidecar process's CPU per request.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from epp.scheduling.config import build_scheduler, load_config  # noqa: E402
from epp.scheduling.disagg import PREFILL_HEADER  # noqa: E402
from epp.scheduling.framework import SchedulingRequest  # noqa: E402
from epp.sim.des import SimRequest  # noqa: E402
from epp.sim.pd import TransferCost, pd_cluster, run_pd, summarize_pd  # noqa: E402
from epp.sim.workload import random_text  # noqa: E402

AGGREGATED = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 16, autoTune: false, maxPrefixTokensToMatch: 16384, lruCapacityPerServer: 31250}
- type: prefix-cache-scorer
- type: queue-scorer
- type: decode-filter
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: max-score-picker
  - {pluginRef: prefix-cache-scorer, weight: 2}
  - {pluginRef: queue-scorer, weight: 1}
"""
PD_CONFIG = (ROOT / "tests" / "configs" / "llmd-pd-epp-config.yaml").read_text()
ALWAYS = PD_CONFIG.replace("prefill: prefix-based-pd-decider", "prefill: always-disagg-pd-decider").replace(
    "- type: prefix-based-pd-decider\n  parameters:\n    nonCachedTokens: 16\n", "- type: always-disagg-pd-decider\n")


def pd_config(threshold: int) -> str:
    return PD_CONFIG.replace("nonCachedTokens: 16", f"nonCachedTokens: {threshold}")


def long_workload(n: int, rate: float, seed: int) -> Iterator[tuple[float, SimRequest]]:
    rng = random.Random(seed)
    t = 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        yield t, SimRequest(f"r{i}", random_text(rng, 16_000), max_tokens=256)


def mixed_workload(n: int, rate: float, seed: int) -> Iterator[tuple[float, SimRequest]]:
    rng = random.Random(seed)
    docs = [f"document {d}: " + random_text(rng, 12_000) for d in range(8)]
    systems = [f"system {s}: " + random_text(rng, 600) for s in range(8)]
    t = 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        u = rng.random()
        if u < 0.125:
            prompt = rng.choice(docs) + " " + random_text(rng, 4000)  # ~4k tokens, 3k of them shared
        elif u < 0.25:
            prompt = random_text(rng, 16_000)  # ~4k unrelated tokens
        else:
            prompt = rng.choice(systems) + " " + random_text(rng, 200)  # ~200 tokens
        yield t, SimRequest(f"r{i}", prompt, max_tokens=rng.randint(128, 384))


WORKLOADS = {"long": long_workload, "mixed": mixed_workload}


class Router:
    """The picker's scheduler as the P/D cluster's chooser, in the cluster's virtual time."""

    def __init__(self, config: str, seed: int) -> None:
        self.now = 0.0
        self.scheduler: Any = build_scheduler(load_config(config), rng=random.Random(seed), clock=lambda: self.now)
        self.routed: dict[str, tuple[SchedulingRequest, Any]] = {}
        self.cluster: Any = None

    def choose(self, req: SimRequest, eps: Any) -> tuple[int, int | None]:
        self.now = self.cluster.now
        sreq = SchedulingRequest(req.request_id, "", prompt=req.prompt)
        res = self.scheduler.schedule(sreq, eps)
        if not res.endpoints:
            raise RuntimeError(res.reason)
        dest = res.endpoints[0]
        self.scheduler.on_routed(sreq, dest)
        self.routed[req.request_id] = (sreq, dest)
        index = {e.address: i for i, e in enumerate(eps)}
        prefill = dict(res.headers).get(PREFILL_HEADER)
        return index[dest.address], index[prefill] if prefill else None

    def finished(self, req: SimRequest, decode: int, prefill: int) -> None:
        got = self.routed.pop(req.request_id, None)
        if got is not None:
            self.scheduler.on_finished(*got)


def run(workload: str, rate: float, roles: list[str], config: str, n: int, seed: int) -> dict[str, Any]:
    router = Router(config, seed)
    cluster, policy = pd_cluster(roles, router.choose, transfer=TransferCost(), seed=seed,
                                 on_finished=router.finished)
    router.cluster = cluster
    t0 = time.perf_counter()
    results = run_pd(cluster, policy, WORKLOADS[workload](n, rate, seed))
    out = summarize_pd(results)
    out["wall_s"] = time.perf_counter() - t0
    return out


def setups(pods: int, quick: bool) -> list[tuple[str, list[str], str]]:
    both = ["both"] * pods
    out = [("aggregated", both, AGGREGATED)]
    for p in ([1] if quick else [1, pods // 2]):
        roles = ["prefill"] * p + ["decode"] * (pods - p)
        out.append((f"P/D {p}P{pods - p}D always", roles, ALWAYS))
        for th in ([1024] if quick else [256, 1024, 8192]):
            out.append((f"P/D {p}P{pods - p}D nonCached>={th}", roles, pd_config(th)))
    return out


async def _sidecar_cost(n: int) -> None:
    import aiohttp

    from epp.sidecar.options import SidecarOptions
    from epp.sidecar.proxy import Sidecar
    from epp.sim.server import SimServer, SimServerConfig

    prefill = await SimServer(SimServerConfig(name="prefill", time_scale=1e-4)).start()
    engine = await SimServer(SimServerConfig(name="decode", time_scale=1e-4)).start()
    sc = await Sidecar(SidecarOptions(port=0, host="127.0.0.1", engine_host="127.0.0.1", secure_proxy=False,
                                      model_server_port=engine.port)).start()
    body = {"prompt": "x" * 8000, "max_tokens": 16, "stream": True}
    cases = [("engine directly", f"{engine.url}/v1/completions", {}),
             ("sidecar, no prefill header", f"http://127.0.0.1:{sc.port}/v1/completions", {}),
             ("sidecar, P/D (two legs)", f"http://127.0.0.1:{sc.port}/v1/completions",
              {PREFILL_HEADER: prefill.address})]
    try:
        async with aiohttp.ClientSession() as http:
            print(f"{n} streamed requests each (2k-token prompt, 16 tokens), one at a time")
            for name, url, headers in cases:
                for _ in range(20):  # warm up connections
                    async with http.post(url, json=body, headers=headers) as r:
                        await r.read()
                times = []
                cpu0 = time.process_time()
                for _ in range(n):
                    t0 = time.perf_counter()
                    async with http.post(url, json=body, headers=headers) as r:
                        await r.read()
                        assert r.status == 200
                    times.append(time.perf_counter() - t0)
                cpu = (time.process_time() - cpu0) / n
                times.sort()
                print(f"  {name:28} p50 {times[n // 2] * 1e3:6.2f} ms  p90 {times[int(n * 0.9)] * 1e3:6.2f} ms  "
                      f"process CPU {cpu * 1e3:5.2f} ms/request (client, sidecar and engines in one process)")
    finally:
        await sc.stop()
        await prefill.stop()
        await engine.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="fewer setups and requests (a smoke run)")
    ap.add_argument("--json", default="")
    ap.add_argument("--sidecar-cost", type=int, default=0, metavar="N")
    args = ap.parse_args(argv)
    if args.sidecar_cost:
        import asyncio

        asyncio.run(_sidecar_cost(args.sidecar_cost))
        return 0
    n = 150 if args.quick else args.requests
    # per-pod arrival rates: moderate and high load for each workload
    rates = {"long": (1.0, 2.0), "mixed": (3.0, 6.0)}
    if args.quick:
        rates = {"long": (1.5,), "mixed": (4.0,)}
    rows = []
    print(f"pods={args.pods} requests={n} seed={args.seed}  (TTFT/TPOT in ms)")
    print(f"{'workload':8} {'req/s':>6} {'setup':28} {'TTFT p50':>9} {'TTFT p90':>9} {'TPOT p50':>9} "
          f"{'TPOT p90':>9} {'out tok/s':>10} {'disagg':>7}")
    for wl, per_pod in rates.items():
        for r in per_pod:
            rate = r * args.pods
            for name, roles, config in setups(args.pods, args.quick):
                s = run(wl, rate, roles, config, n, args.seed)
                rows.append({"workload": wl, "rate": rate, "setup": name, **s})
                print(f"{wl:8} {rate:6.1f} {name:28} {s['ttft_p50'] * 1e3:9.0f} {s['ttft_p90'] * 1e3:9.0f} "
                      f"{s['tpot_p50'] * 1e3:9.1f} {s['tpot_p90'] * 1e3:9.1f} {s['output_tokens_per_s']:10.0f} "
                      f"{s['disaggregated']:7.0%}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

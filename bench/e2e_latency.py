"""End-to-end latency through Envoy: with the picker vs Envoy round-robin straight to the servers.

Both runs use the same stack as `python -m epp.demo` (4 simulated vLLM servers as child processes,
the picker in no-cluster mode over TLS, Envoy from epp.envoyconf; round-robin is the same Envoy
config with the picker taken out) and the same open-loop load: Poisson arrivals at a fixed rate,
so both see equal load whatever their latency. Latency is measured at the client: whole request
(e2e) and, for streaming requests, time to the first generated text (TTFT).

Scenarios:
  mixed : the demo's request shapes without multi-turn and LoRA (70% shared-prefix chat over 48
          long system prompts, ~72k tokens together, 30% plain completions), half streaming, 16..96
          output tokens; simulators in real time (Llama-3.1-8B shape) with 64k tokens of KV cache
          each, so the shared prompts do not fit everywhere. Shows what routing buys.
  tiny  : 1-token completions of a short prompt: the model's time is ~7 ms, so differences are the
          picker's own cost on the request path (ext_proc round trips, TLS, the decision).

usage: python bench/e2e_latency.py [--scenario mixed|tiny] [--rate 20] [--seconds 20] [--modes picker,round-robin]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from epp.demo import KV_BLOCKS, Result, Stack, Workload, filler_text, percentile, prefix_counters, send_one
from epp.sim.config import DEFAULT_MODEL


def request_for(scenario: str, rng: random.Random, wl: Workload) -> tuple[str, dict[str, Any], str]:
    """(path, body, kind) of the next request."""
    if scenario == "tiny":
        body = {"model": DEFAULT_MODEL, "prompt": "ping " + str(rng.random()), "max_tokens": 1}
        return "/v1/completions", body, "tiny"
    stream = rng.random() < wl.stream_share
    extra: dict[str, Any] = {"max_tokens": rng.randint(*wl.max_tokens), "stream": stream}
    if stream:
        extra["stream_options"] = {"include_usage": True}
    if rng.random() < 0.7:
        messages = [{"role": "system", "content": rng.choice(wl.systems)},
                    {"role": "user", "content": filler_text(rng, rng.randint(10, 60))}]  # fmt: skip
        return "/v1/chat/completions", {"model": DEFAULT_MODEL, "messages": messages, **extra}, "shared-prefix"
    prompt = filler_text(rng, rng.randint(50, 400))
    return "/v1/completions", {"model": DEFAULT_MODEL, "prompt": prompt, **extra}, "completion"


async def open_loop(url: str, scenario: str, rate: float, seconds: float, seed: int,
                    prompts: int = 4) -> tuple[list[Result], float]:
    """Poisson arrivals at `rate` for `seconds`; every request is sent on time, however slow the
    earlier ones are (open loop). Returns the results and the achieved send rate."""
    rng = random.Random(seed)
    wl = Workload(seed=seed, system_prompts=prompts)
    results: list[Result] = []
    tasks: list[asyncio.Task[Result]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        at = start
        while True:
            at += rng.expovariate(rate)
            if at - start > seconds:
                break
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            path, body, kind = request_for(scenario, rng, wl)
            tasks.append(asyncio.create_task(send_one(session, url, path, body, kind)))
        sent_for = loop.time() - start
        results = list(await asyncio.gather(*tasks))
    return results, len(tasks) / sent_for


async def measure(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    stack = Stack(policy="default" if mode == "picker" else "round-robin", time_scale=args.time_scale,
                  sim_args=args.sim_args.split(), picker_args=args.picker_args.split())
    try:
        await stack.start()
        # warm: a few seconds at the same rate so caches, connections and scrapes are in steady state
        await open_loop(stack.url, args.scenario, args.rate, args.warmup, args.seed + 1, args.prompts)
        before = await prefix_counters(stack.endpoints)
        t0 = time.perf_counter()
        results, sent_rate = await open_loop(stack.url, args.scenario, args.rate, args.seconds, args.seed, args.prompts)
        elapsed = time.perf_counter() - t0
        after = await prefix_counters(stack.endpoints)
    finally:
        await stack.close()
    ok = [r for r in results if r.status == 200]
    lat = sorted(r.latency for r in ok)
    ttft = sorted(r.ttft for r in ok if r.ttft is not None)
    hits = sum(after[p][0] - before.get(p, (0.0, 0.0))[0] for p in after)
    queries = sum(after[p][1] - before.get(p, (0.0, 0.0))[1] for p in after)
    per_pod: dict[str, int] = {}
    for r in ok:
        per_pod[r.pod] = per_pod.get(r.pod, 0) + 1
    return {
        "mode": mode, "sent_rate": sent_rate, "elapsed": elapsed, "n": len(results), "ok": len(ok),
        "errors": len(results) - len(ok),
        "p50": percentile(lat, 0.5), "p90": percentile(lat, 0.9), "p99": percentile(lat, 0.99),
        "ttft_n": len(ttft), "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
        "hit": hits / queries if queries else float("nan"),
        "spread": "/".join(str(per_pod.get(f"pod-{i}", 0)) for i in range(len(stack.endpoints))),
    }  # fmt: skip


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["mixed", "tiny"], default="mixed")
    ap.add_argument("--rate", type=float, default=20.0, help="requests per second, open loop (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per mode (default %(default)s)")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first (default %(default)s)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="simulator time scale (default: real time)")
    ap.add_argument("--modes", default="picker,round-robin")
    ap.add_argument("--sim-args", default=f"--num-gpu-blocks {KV_BLOCKS}",
                    help="`python -m epp.sim` flags (default '%(default)s': 64k tokens of KV per server)")
    ap.add_argument("--picker-args", default="", help="extra picker flags, e.g. '--config-file F'")
    ap.add_argument("--prompts", type=int, default=48, help="distinct shared system prompts (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"e2e latency: scenario {args.scenario}, {args.rate:g} req/s open loop, {args.seconds:g} s per mode "
          f"(+{args.warmup:g} s warm-up), 4 simulators, time scale {args.time_scale:g}", flush=True)  # fmt: skip
    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        row = await measure(mode, args)
        rows.append(row)
        ms = 1e3
        print(f"{row['mode']:<12} sent {row['sent_rate']:6.1f}/s  ok {row['ok']:5d}  err {row['errors']:3d}  "
              f"e2e p50 {row['p50'] * ms:7.1f} ms  p90 {row['p90'] * ms:7.1f} ms  p99 {row['p99'] * ms:7.1f} ms  "
              + (f"TTFT p50 {row['ttft_p50'] * ms:6.1f} ms  p99 {row['ttft_p99'] * ms:6.1f} ms  "
                 if row["ttft_n"] else "")
              + f"prefix hit {100 * row['hit']:5.1f}%  per pod {row['spread']}", flush=True)  # fmt: skip
    if len(rows) == 2:
        a, b = rows
        print(f"{a['mode']} / {b['mode']}: e2e p50 x{a['p50'] / b['p50']:.2f}, p99 x{a['p99'] / b['p99']:.2f}"
              + (f", TTFT p50 x{a['ttft_p50'] / b['ttft_p50']:.2f}" if a["ttft_n"] and b["ttft_n"] else ""))


if __name__ == "__main__":
    asyncio.run(main())

"""How fast the discrete-event simulator runs: simulated requests per wall second.

Usage: python bench/sim_des_speed.py [REQUESTS] [SERVERS]
Runs a shared-prefix workload (4k-char prefixes, 256-char suffixes, 64 output tokens) at 25 req/s per
server under three baseline policies and prints wall-clock speed and the simulated
outcome (so a change that speeds the simulator up by changing its answers is visible). Per-CPU-second
figures are steadier than wall figures on a shared machine.
"""

from __future__ import annotations

import sys
import time

from epp.sim import Cluster, LeastRequest, RandomChoice, RoundRobin, summarize
from epp.sim.workload import shared_prefix


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    servers = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    rate = 25.0 * servers  # requests/s (virtual): a moderate load, batches of ~10-20 per server
    print(f"{n} requests, {servers} servers, {rate:.0f} req/s virtual arrival rate")
    for policy in (RoundRobin(), RandomChoice(1), LeastRequest(1)):
        cluster = Cluster(servers, policy, seed=1)
        t0, c0 = time.perf_counter(), time.process_time()
        results = cluster.run(shared_prefix(n, rate, groups=32, seed=2))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        s = summarize(results)
        steps = sum(v.engine.stats.steps for v in cluster.servers)
        print(f"{type(policy).__name__:>12}: {len(results) / wall:6.0f} simulated req/s wall "
              f"({len(results) / cpu:6.0f} per CPU s), {steps / cpu:6.0f} engine steps per CPU s, "
              f"virtual {s['makespan']:.1f}s in {wall:.2f}s wall | "
              f"ttft p50 {s['ttft_p50'] * 1000:.1f} ms p99 {s['ttft_p99'] * 1000:.1f} ms, "
              f"e2e p50 {s['e2e_p50']:.3f} s, hit ratio {s['prefix_hit_ratio']:.2f}")


if __name__ == "__main__":
    main()

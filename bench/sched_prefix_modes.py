"""Prefix modes compared on a synthetic multi-turn workload: cache hits vs load spread.

    .venv/bin/python bench/sched_prefix_modes.py [--requests N] [--pods P] [--replicas R]

A first-order proxy, not the routing-quality benchmark: each simulated pod keeps an LRU of the
64-byte prompt blocks it has seen (its "KV cache", `--cache-blocks` entries); each request holds
its pod for the next `--concurrency` requests (in flight), and a pod runs 8 at a time, the rest
waiting. With `--replicas` > 1 requests go round-robin to independent picker replicas (each with
its own index) that share only the pods' metrics and their own in-flight counts.

Printed per policy: hit = prompt blocks already cached on the chosen pod; spread = busiest pod's
request count / mean; p99 wait = 99th percentile of the chosen pod's waiting queue at pick time.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from epp.datastore import Endpoint, Metrics
from epp.scheduling.config import build_scheduler, load_config, preset_config
from epp.scheduling.framework import SchedulingRequest
from epp.scheduling.prefix import block_hashes

HEAD = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
RENDEZVOUS = HEAD + """
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters: {mode: rendezvous}
- type: inflight-load-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: inflight-load-scorer, weight: 1}
"""
LEAST_INFLIGHT = HEAD + """
plugins: [{type: inflight-load-scorer}, {type: max-score-picker}]
schedulingProfiles: [{name: d, plugins: [{pluginRef: inflight-load-scorer}, {pluginRef: max-score-picker}]}]
"""
RANDOM = HEAD + """
plugins: [{type: random-picker}]
schedulingProfiles: [{name: d, plugins: [{pluginRef: random-picker}]}]
"""
POLICIES = {
    "reference": lambda: preset_config("reference"),
    "default (index+guard)": lambda: load_config(None),
    "rendezvous": lambda: load_config(RENDEZVOUS),
    "least-inflight": lambda: load_config(LEAST_INFLIGHT),
    "random": lambda: load_config(RANDOM),
}
WORDS = "the a of to and in is it you that he was for on are with as his they be at one have this".split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def workload(n: int, seed: int) -> list[str]:
    """Multi-turn chats over a few popular system prompts (Zipf-like popularity)."""
    rng = random.Random(seed)
    systems = [f"system {i}: " + words(rng, 400) for i in range(12)]
    weights = [1 / (i + 1) for i in range(len(systems))]
    chats: list[str] = []
    prompts = []
    for _ in range(n):
        if chats and rng.random() < 0.6:  # continue a recent conversation
            i = rng.randrange(max(0, len(chats) - 40), len(chats))
            chats[i] = chats[i] + " user: " + words(rng, 60)
            prompts.append(chats[i])
        else:
            chats.append(rng.choices(systems, weights)[0] + " user: " + words(rng, 60))
            prompts.append(chats[-1])
    return prompts


class Pod:
    def __init__(self, i: int, cache_blocks: int) -> None:
        ip = f"10.1.0.{i + 1}"
        self.ep = Endpoint(address=f"{ip}:8000", ip=ip, port=8000, pod=f"sim/{i}", metrics=Metrics())
        self.cache: dict[int, None] = {}
        self.capacity = cache_blocks
        self.inflight = 0
        self.served = 0

    def serve(self, hashes: list[int]) -> int:
        hit = 0
        for h in hashes:  # the engine's prefix cache: leading blocks found, stop at the first miss
            if h not in self.cache:
                break
            hit += 1
        for h in reversed(hashes):
            self.cache.pop(h, None)
            self.cache[h] = None
        while len(self.cache) > self.capacity:
            del self.cache[next(iter(self.cache))]
        return hit

    def publish(self, now: float) -> None:
        running = min(self.inflight, 8)
        self.ep.metrics = Metrics(waiting=max(0, self.inflight - 8), running=running,
                                  kv_usage=min(1.0, len(self.cache) / self.capacity * 0.5 + running / 16),
                                  updated=now + 3600)


def simulate(policy: str, prompts: list[str], pods_n: int, replicas: int, concurrency: int,
             cache_blocks: int) -> tuple[float, float, float]:
    pods = [Pod(i, cache_blocks) for i in range(pods_n)]
    by_ep = {id(p.ep): p for p in pods}
    scheds = [build_scheduler(POLICIES[policy](), rng=random.Random(r)) for r in range(replicas)]
    inflight: deque[tuple[int, Pod, SchedulingRequest]] = deque()
    hits = blocks = 0
    waits = []
    eps = tuple(p.ep for p in pods)
    now = time.monotonic()
    for n, prompt in enumerate(prompts):
        while inflight and inflight[0][0] <= n:
            _, pod, done = inflight.popleft()
            pod.inflight -= 1
            pod.ep.inflight -= 1
        for p in pods:
            p.publish(now)
        sched = scheds[n % replicas]
        req = SchedulingRequest(request_id=str(n), model="m", prompt=prompt)
        ep = sched.schedule(req, eps).endpoints[0]
        pod = by_ep[id(ep)]
        waits.append(max(0, pod.inflight - 8))
        sched.on_routed(req, ep)
        hs = block_hashes(prompt, "m", 64, 256)
        hits += pod.serve(hs)
        blocks += len(hs)
        pod.inflight += 1
        pod.served += 1
        ep.inflight += 1
        inflight.append((n + concurrency, pod, req))
    waits.sort()
    mean = len(prompts) / pods_n
    return hits / max(1, blocks), max(p.served for p in pods) / mean, waits[int(0.99 * (len(waits) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--pods", type=int, default=8)
    ap.add_argument("--replicas", type=int, nargs="*", default=[1, 3])
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight at once")
    ap.add_argument("--cache-blocks", type=int, default=3000, help="simulated prefix cache per pod (blocks)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    prompts = workload(args.requests, args.seed)
    print(f"{args.requests} requests, {args.pods} pods, {args.concurrency} in flight, "
          f"{args.cache_blocks} cached blocks per pod")
    for replicas in args.replicas:
        print(f"\npicker replicas: {replicas}")
        print(f"  {'policy':<24}{'hit':>7}{'spread':>8}{'p99 wait':>10}")
        for name in POLICIES:
            hit, spread, p99 = simulate(name, prompts, args.pods, replicas, args.concurrency, args.cache_blocks)
            print(f"  {name:<24}{hit:>7.1%}{spread:>8.2f}{p99:>10}")


if __name__ == "__main__":
    main()

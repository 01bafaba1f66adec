"""CPU per scheduling decision: default profile, 4 KB prompts, 8 / 64 / 256 endpoints.

Goal: ≤ 100 µs per decision at 64 endpoints. Prints a table; asserts nothing.

    .venv/bin/python bench/sched_decision.py [--iterations N] [--preset default|reference] [--mode index|rendezvous]

Each decision builds a fresh SchedulingRequest (as the director does), so the prompt's block hashes
are computed every time. "schedule" times schedule() alone; "+routed" adds on_routed() (the prefix
index insert). The index is warmed first with prompts sharing a 2 KB system prefix, so matching
walks real entries. Metrics are stamped in the future so they stay fresh for the whole run.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from epp.datastore import Endpoint, Metrics
from epp.scheduling.config import build_scheduler, load_config, preset_config
from epp.scheduling.framework import SchedulingRequest

ALPHABET = "abcdefghijklmnopqrstuvwxyz      ,.\n"


def make_endpoints(n: int, rng: random.Random) -> list[Endpoint]:
    future = time.monotonic() + 86400.0
    eps = []
    for i in range(n):
        ip = f"10.{i // 250}.{i % 250}.{1 + i % 7}"
        m = Metrics(waiting=rng.randint(0, 6), running=rng.randint(0, 40), kv_usage=rng.random() * 0.9,
                    block_size=16, num_blocks=20000, updated=future)
        eps.append(Endpoint(address=f"{ip}:8000", ip=ip, port=8000, pod=f"default/pod-{i}", metrics=m,
                            inflight=rng.randint(0, 8), inflight_tokens=rng.randint(0, 8000)))
    return eps


def make_prompts(count: int, rng: random.Random) -> list[str]:
    systems = ["".join(rng.choice(ALPHABET) for _ in range(2048)) for _ in range(8)]
    return [rng.choice(systems) + "".join(rng.choice(ALPHABET) for _ in range(2048)) for _ in range(count)]


def run(n: int, iterations: int, repeat: int, preset: str, mode: str | None) -> tuple[float, float]:
    rng = random.Random(n)
    if mode is None:
        cfg = preset_config(preset)
    else:
        cfg = load_config(f"""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters: {{mode: {mode}}}
- type: inflight-load-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: 2}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
  - {{pluginRef: inflight-load-scorer, weight: 1}}
""")
    sched = build_scheduler(cfg, has_lora=False, rng=rng)
    eps = tuple(make_endpoints(n, rng))
    prompts = make_prompts(256, rng)
    for i in range(2000):  # warm the prefix index
        req = SchedulingRequest(request_id=str(i), model="m", prompt=prompts[i % len(prompts)])
        res = sched.schedule(req, eps)
        sched.on_routed(req, res.endpoints[0])

    def timed(with_routed: bool) -> float:
        best = float("inf")
        for _ in range(repeat):  # best of a few: the machine is shared, the minimum is the cost
            reqs = [SchedulingRequest(request_id=str(i), model="m", prompt=prompts[i % len(prompts)])
                    for i in range(iterations)]
            t0 = time.process_time()
            for req in reqs:
                res = sched.schedule(req, eps)
                if with_routed:
                    sched.on_routed(req, res.endpoints[0])
            best = min(best, (time.process_time() - t0) / iterations * 1e6)
        return best

    return timed(False), timed(True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--preset", default="default", choices=("default", "reference"))
    ap.add_argument("--mode", choices=("index", "rendezvous"), help="prefix mode (custom profile)")
    args = ap.parse_args()
    label = args.preset if args.mode is None else f"default-like, prefix mode {args.mode}"
    print(f"profile: {label}; 4 KB prompts; best of {args.repeat} × {args.iterations} decisions")
    print(f"{'endpoints':>9} {'schedule µs':>12} {'+routed µs':>11}")
    for n in (8, 64, 256):
        s, r = run(n, args.iterations, args.repeat, args.preset, args.mode)
        print(f"{n:>9} {s:>12.1f} {r:>11.1f}")


if __name__ == "__main__":
    main()

"""Latency the picker adds, at 25 / 50 / 90% of its capacity, and its memory over many requests.

The picker runs as `python -m epp` on CPU 0 with N loopback metric endpoints (as bench/extproc_cost.py);
this process drives it from CPU 1 over real gRPC.
1. capacity: closed-loop requests/s for the profile;
2. added latency: open-loop Poisson arrivals at 25 / 50 / 90% of that capacity; for each request,
   the time from sending the last request message (body end_of_stream) to receiving the routed
   headers reply: the picker's whole decision as Envoy would wait for it (it includes this Python
   client's own scheduling, so it is an upper bound);
3. with --requests N: RSS of the picker process every N/10 requests of a closed-loop run (the lean
   profile by default, the cheapest, so a million requests take the least time).
usage: python bench/picker_latency.py [--profile duplex] [--seconds 8] [--requests 1000000] [--picker-arg=ARG]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from extproc_cost import drive, free_port, metrics_server, picker_cmd, plan, wait_port


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def one(stub: ep_grpc.ExternalProcessorStub, steps: list, lat: list[float]) -> None:
    call = stub.Process()
    routed_at = 0.0
    sent_body = 0.0
    for msg, replies in steps:
        await call.write(msg)
        if msg.WhichOneof("request") == "request_body":
            sent_body = time.perf_counter()
        for i in range(replies):
            await call.read()
            if i == 0 and not routed_at and sent_body:
                routed_at = time.perf_counter()
    await call.done_writing()
    await call.read()
    lat.append(routed_at - sent_body)


async def open_loop(addr: str, steps: list, rate: float, secs: float, seed: int) -> tuple[list[float], float]:
    """Poisson arrivals at `rate`/s for `secs`; returns latencies and the achieved rate."""
    rng = random.Random(seed)
    lat: list[float] = []
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = ep_grpc.ExternalProcessorStub(ch)
        tasks = []
        start = time.perf_counter()
        t = start
        while t - start < secs:
            t += rng.expovariate(rate)
            delay = t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(stub, steps, lat)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return lat, len(lat) / elapsed


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(p / 100 * len(v)))] if v else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="duplex", choices=["duplex", "buffered", "lean"])
    ap.add_argument("--endpoints", type=int, default=16)
    ap.add_argument("--prompt-bytes", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--requests", type=int, default=0, help="also: RSS over this many requests (lean profile)")
    ap.add_argument("--rss-profile", default="lean", choices=["duplex", "buffered", "lean"])
    ap.add_argument("--picker-arg", action="append", default=[], metavar="ARG",
                    help="one more picker flag, e.g. --picker-arg=--gc-tuning=false (repeatable)")
    a = ap.parse_args()

    port = free_port()
    ms, addrs = metrics_server(a.endpoints)
    p = subprocess.Popen(picker_cmd(port, addrs) + a.picker_arg, stderr=subprocess.DEVNULL)
    addr = f"127.0.0.1:{port}"
    try:
        wait_port(port)
        os.sched_setaffinity(0, {1})
        steps = plan(a.profile, a.prompt_bytes)
        asyncio.run(drive(addr, steps, 1.0, 8))  # warm-up
        t0 = time.perf_counter()
        n = asyncio.run(drive(addr, steps, a.seconds, 32))
        capacity = n / (time.perf_counter() - t0)
        print(f"picker capacity, {a.profile} profile, {a.endpoints} endpoints, {a.prompt_bytes} B prompt: "
              f"{capacity:.0f} req/s (closed loop, 32 streams)")
        print("| load | offered req/s | achieved req/s | added latency p50 | p90 | p99 |")
        print("|---|---|---|---|---|---|")
        for level in (0.25, 0.5, 0.9):
            lat, achieved = asyncio.run(open_loop(addr, steps, level * capacity, a.seconds, seed=int(level * 100)))
            print(f"| {level:.0%} | {level * capacity:.0f} | {achieved:.0f} | {pct(lat, 50) * 1e3:.2f} ms | "
                  f"{pct(lat, 90) * 1e3:.2f} ms | {pct(lat, 99) * 1e3:.2f} ms |", flush=True)
        if a.requests:
            steps = plan(a.rss_profile, a.prompt_bytes)
            step = max(1, a.requests // 10)
            print(f"RSS over {a.requests} requests ({a.rss_profile} profile): start {rss_mib(p.pid):.1f} MiB")
            done = 0
            t0 = time.perf_counter()
            while done < a.requests:
                done += asyncio.run(drive(addr, steps, 0, 64, count=step))
                print(f"  after {done:>8} requests: RSS {rss_mib(p.pid):6.1f} MiB  "
                      f"({done / (time.perf_counter() - t0):.0f} req/s)", flush=True)
    finally:
        p.terminate()
        p.wait()
        ms.terminate()
        ms.wait()


if __name__ == "__main__":
    main()

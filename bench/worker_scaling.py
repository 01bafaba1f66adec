"""`--workers` 1 -> 2: routed requests per second and CPU per request of the picker's processes.

    .venv/bin/python bench/worker_scaling.py [SECONDS] [--profile lean] [--workers 1 2]

The picker runs as `python -m epp --workers N` (plaintext, 16 static endpoints on loopback metric
pages, bench/extproc_cost.py's), unpinned; this process drives it closed-loop over 4 gRPC channels
per worker, each with its own connection (a local subchannel pool: one shared connection would land
on one worker). CPU is read from /proc for every worker. On a machine with fewer free cores than
workers + the client, req/s cannot scale; CPU per request says whether the work per request grew.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from extproc_cost import free_port, metrics_server, plan, ticks, wait_port

HZ = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(entry))
    return out


async def drive(addr: str, steps: list, secs: float, channels: int, conc: int) -> int:
    done = 0
    stop = time.perf_counter() + secs
    chans = [grpc.aio.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(channels)]

    async def loop(stub: ep_grpc.ExternalProcessorStub) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            call = stub.Process()
            for msg, replies in steps:
                await call.write(msg)
                for _ in range(replies):
                    await call.read()
            await call.done_writing()
            await call.read()
            done += 1

    try:
        stubs = [ep_grpc.ExternalProcessorStub(c) for c in chans]
        await asyncio.gather(*(loop(stubs[i % channels]) for i in range(conc)))
    finally:
        for c in chans:
            await c.close()
    return done


def run(workers: int, profile: str, secs: float, addrs: list[str],
        server_pid: int) -> tuple[float, float, int, float]:
    """(req/s, CPU µs per request over every worker, workers seen, the metrics pages' server CPU in %
    of a core while the picker ran: what its scraping costs the model servers)."""
    port = free_port()
    argv = [sys.executable, "-m", "epp", "--workers", str(workers), "--pool-name", "bench", "--endpoints",
            ",".join(addrs), "--secure-serving=false", "--grpc-port", str(port), "--grpc-health-port",
            str(free_port()), "--metrics-port", "0", "--bind-address", "127.0.0.1", "--log-level", "warning",
            "--drain-timeout", "0s", "--shutdown-grace", "1s"]
    p = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=60)  # a busy shared machine starts Python slowly
        time.sleep(1.5)  # every worker listening
        pids = children(p.pid) if workers > 1 else [p.pid]
        steps = plan(profile, 1000)
        addr = f"127.0.0.1:{port}"
        asyncio.run(drive(addr, steps, 1.0, 4 * workers, 16))  # warm-up
        c0 = sum(ticks(x) for x in pids)
        s0 = ticks(server_pid)
        t0 = time.perf_counter()
        n = asyncio.run(drive(addr, steps, secs, 4 * workers, 32))
        wall = time.perf_counter() - t0
        cpu = (sum(ticks(x) for x in pids) - c0) / HZ
        served = (ticks(server_pid) - s0) / HZ
        return n / wall, 1e6 * cpu / max(n, 1), len(pids), 100 * served / wall
    finally:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seconds", nargs="?", type=float, default=5.0)
    ap.add_argument("--profile", default="lean", choices=["duplex", "buffered", "lean"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    ms, addrs = metrics_server(16)
    try:
        with open("/proc/loadavg") as f:
            load0 = f.read().split()[0]
        rows = [(w, *run(w, a.profile, a.seconds, addrs, ms.pid)) for w in a.workers]
        with open("/proc/loadavg") as f:
            load1 = f.read().split()[0]
    finally:
        ms.terminate()
        ms.wait()
    base = rows[0][1]
    print(f"{a.profile} profile, 16 endpoints, 1 KB chat, {os.cpu_count()} CPUs, load average {load0} -> {load1}")
    print("| workers | req/s | × 1 worker | CPU µs / request (all workers) | metrics pages' server, % of a core |")
    print("|---|---|---|---|---|")
    for w, rps, us, seen, pages in rows:
        print(f"| {w} ({seen} processes) | {rps:.0f} | {rps / base:.2f} | {us:.0f} | {pages:.1f} |")


if __name__ == "__main__":
    main()

"""Server CPU per routed request of the picker, side by side with the do-nothing floor, in one run.

The picker runs as `python -m epp` (plaintext, N static endpoints, the default scheduling profile)
in a child pinned to CPU 0; this process drives it from CPU 1 over real gRPC with the same message
plan as ../shared/bench-floor/floor_profiles.py, and reads the child's CPU time from /proc.
The endpoints are N ports of one small metrics server on 127.0.0.1 (a vLLM-shaped page), so the
picker scrapes and scores as in production. The scraper's steady cost is measured with no traffic
first and reported apart ("scrape"); "net" is the CPU per request above it.
  duplex  : request headers, 1 KB chat body (EoS), response headers (SSE), 4 response chunks
  buffered: request headers (answered at once), body (answered with the route), response headers
            (dropped when the picker's request-headers reply skips the response side, as Envoy does)
  lean    : request headers, body; no response phases (envoyconf's lean profile)
The machine's noise (other processes, frequency changes) only ever adds CPU, so with --repeat R
each figure is the lowest of R interleaved runs (floor and picker alternate).
usage: python bench/extproc_cost.py [SECONDS] [--repeat R] [--endpoints N] [--prompt-bytes B] [--no-floor]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpuclock

HERE = os.path.dirname(os.path.abspath(__file__))
FLOOR = os.path.join(HERE, "..", "..", "shared", "bench-floor", "floor_profiles.py")
M = processing_mode_pb2.ProcessingMode


def _hdrs(pairs: list[tuple[str, str]], eos: bool = False) -> ep.HttpHeaders:
    return ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]), end_of_stream=eos)


def plan(profile: str, prompt_bytes: int) -> list[tuple[ep.ProcessingRequest, int]]:
    """(message, number of replies to read after sending it)."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * prompt_bytes}]}).encode()
    req_mode = {"duplex": M.FULL_DUPLEX_STREAMED, "buffered": M.BUFFERED, "lean": M.FULL_DUPLEX_STREAMED}[profile]
    resp_mode = {"duplex": M.FULL_DUPLEX_STREAMED, "buffered": M.NONE, "lean": M.NONE}[profile]
    head = ep.ProcessingRequest(request_headers=_hdrs([(":method", "POST"), (":path", "/v1/chat/completions"),
                                                       ("content-type", "application/json"),
                                                       ("x-request-id", "bench")]))
    head.protocol_config.request_body_mode = req_mode
    head.protocol_config.response_body_mode = resp_mode
    body_chunks = -(-len(body) // 62000)
    steps = [(head, 1 if profile == "buffered" else 0),
             (ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True)),
              1 if profile == "buffered" else 1 + body_chunks),
             (ep.ProcessingRequest(response_headers=_hdrs([(":status", "200"),
                                                           ("content-type", "text/event-stream")])), 1)]
    if profile == "lean":
        steps.pop()
    if profile == "duplex":
        steps += [(ep.ProcessingRequest(response_body=ep.HttpBody(body=b"data: x\n\n", end_of_stream=i == 3)), 1)
                  for i in range(4)]
    return steps


def cpu_s(pid: int) -> float:
    """CPU seconds `pid` has used, exact (bench/cpuclock.py)."""
    return cpuclock.process_cpu(pid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def drive(addr: str, steps: list[tuple[ep.ProcessingRequest, int]], secs: float, conc: int,
                count: int | None = None, sent: list[int] | None = None) -> int:
    """Closed loop over `conc` streams for `secs` seconds (or exactly `count` requests); returns the count.
    As Envoy with the buffered profile (allow_mode_override, a BUFFERED request body) does, a reply's
    mode_override that skips the response headers drops the response phases that follow; `sent`
    (a one-item list) adds up the messages sent."""
    done = 0
    left = count if count is not None else -1
    honour = steps[0][0].protocol_config.request_body_mode == M.BUFFERED
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = ep_grpc.ExternalProcessorStub(ch)
        stop = time.perf_counter() + secs

        async def worker() -> None:
            nonlocal done, left
            while (left > 0) if count is not None else (time.perf_counter() < stop):
                left -= 1
                call = stub.Process()
                skip_response = False
                n = 0
                for msg, replies in steps:
                    if skip_response and msg.WhichOneof("request").startswith("response"):
                        break
                    await call.write(msg)
                    n += 1
                    for _ in range(replies):
                        r = await call.read()
                        if honour and r.HasField("mode_override") and \
                                r.mode_override.response_header_mode == M.SKIP:
                            skip_response = True
                await call.done_writing()
                if sent is not None:
                    sent[0] += n
                await call.read()
                done += 1

        await asyncio.gather(*(worker() for _ in range(conc)))
    return done


def wait_port(port: int, timeout: float = 20) -> None:
    end = time.time() + timeout
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("picker did not start")


METRICS_SERVER = r'''
import asyncio, sys
from aiohttp import web
PAGE = ("# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"m\"} 1\n"
        "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 3\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name=\"m\"} 0.3\n")
async def main():
    app = web.Application()
    app.router.add_get("/metrics", lambda r: web.Response(text=PAGE))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = []
    for _ in range(int(sys.argv[1])):
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
    print(",".join(str(a[1]) for a in runner.addresses), flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
'''


def metrics_server(n: int) -> tuple[subprocess.Popen[str], list[str]]:
    """N loopback ports serving a vLLM-shaped /metrics page, in a child on CPU 1."""
    p = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", METRICS_SERVER, str(n)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    ports = p.stdout.readline().strip().split(",")
    return p, [f"127.0.0.1:{port}" for port in ports]


LEAN_FLOOR = r'''
import asyncio, sys, grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep, external_processor_pb2_grpc as epg
sys.path.insert(0, sys.argv[2]); from floor_server import routed
R = routed("10.0.0.1:8000")
class F(epg.ExternalProcessorServicer):
    async def Process(self, requests, context):
        while True:
            req = await context.read()
            if req is grpc.aio.EOF:
                return
            if req.WhichOneof("request") == "request_body" and req.request_body.end_of_stream:
                await context.write(R)
                body = req.request_body.body  # echoed in chunks of at most 62000 bytes, as a picker must
                for i in range(0, max(len(body), 1), 62000):
                    await context.write(ep.ProcessingResponse(request_body=ep.BodyResponse(
                        response=ep.CommonResponse(body_mutation=ep.BodyMutation(
                            streamed_response=ep.StreamedBodyResponse(
                                body=body[i:i + 62000], end_of_stream=i + 62000 >= len(body)))))))
async def main():
    s = grpc.aio.server(); epg.add_ExternalProcessorServicer_to_server(F(), s)
    s.add_insecure_port(sys.argv[1]); await s.start(); await s.wait_for_termination()
asyncio.run(main())
'''


def measure_lean_floor(secs: float, prompt_bytes: int, conc: int) -> tuple[float, float]:
    """A do-nothing picker for the lean profile, written like floor_profiles.py's (read()/write(), a
    prebuilt route), answering request headers + body with the headers reply and the echoed body.
    floor_profiles.py has no such profile: its "bodyonly" skips the request headers, which Envoy cannot
    do (with headers skipped the router picks a host before any body reaches the picker)."""
    port = free_port()
    p = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", LEAN_FLOOR, f"127.0.0.1:{port}",
                          os.path.dirname(FLOOR)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        os.sched_setaffinity(0, {1})
        addr = f"127.0.0.1:{port}"
        steps = plan("lean", prompt_bytes)
        asyncio.run(drive(addr, steps, 0.5, 4))
        t0, c0 = time.perf_counter(), cpu_s(p.pid)
        n = asyncio.run(drive(addr, steps, secs, conc))
        el, cpu = time.perf_counter() - t0, cpu_s(p.pid) - c0
    finally:
        p.terminate()
        p.wait()
    return n / el, cpu / max(n, 1) * 1e6


def scrape_plan(endpoints: int, interval: str | None) -> tuple[str, list[str]]:
    """The scrape interval and extra picker flags for `endpoints`. Default: 50 ms up to 16 endpoints,
    then slower so the scraper stays near 320 polls/s (at 50 ms, 256 endpoints would need more than
    a core for scraping alone), with the staleness threshold raised to match so scores see fresh
    metrics, as an operator of a large pool would configure it."""
    if interval is not None:
        return interval, []
    secs = max(0.05, endpoints / 320)
    cfg = ("apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
           f"saturationDetector:\n  metricsStalenessThreshold: {max(0.2, 4 * secs):.2f}s\n")
    return f"{secs:.3f}s", ["--config-text", cfg]


GRPC_SERVER = ["native"]  # --grpc-server: what serves the picker's gRPC (the A/B of epp.h2server)


def picker_cmd(port: int, addrs: list[str], scrape_interval: str | None = None) -> list[str]:
    """`python -m epp` pinned to CPU 0, plaintext on `port`, the endpoints `addrs`."""
    interval, extra = scrape_plan(len(addrs), scrape_interval)
    extra = [*extra, "--grpc-server", GRPC_SERVER[0]]
    return ["taskset", "-c", "0", sys.executable, "-m", "epp", "--pool-name", "bench", "--endpoints", ",".join(addrs),
            "--secure-serving=false", "--grpc-port", str(port), "--grpc-health-port", "0", "--metrics-port", "0",
            "--bind-address", "127.0.0.1", "--log-level", "warning", "--refresh-metrics-interval", interval, *extra]


def measure(profile: str, secs: float, endpoints: int, prompt_bytes: int, conc: int,
            scrape_interval: str | None = None) -> tuple[float, float, float, float]:
    """(req/s, CPU µs per request above the scraper's idle cost, scraper CPU share of a core,
    messages sent per request)."""
    port = free_port()
    ms, addrs = metrics_server(endpoints)
    p = subprocess.Popen(picker_cmd(port, addrs, scrape_interval), stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        os.sched_setaffinity(0, {1})
        addr = f"127.0.0.1:{port}"
        steps = plan(profile, prompt_bytes)
        asyncio.run(drive(addr, steps, 0.5, 4))  # warm-up
        t0, c0 = time.perf_counter(), cpu_s(p.pid)
        time.sleep(min(3.0, secs))  # no traffic: what scraping alone costs
        idle = (cpu_s(p.pid) - c0) / (time.perf_counter() - t0)
        t0, c0 = time.perf_counter(), cpu_s(p.pid)
        sent = [0]
        n = asyncio.run(drive(addr, steps, secs, conc, sent=sent))
        el, cpu = time.perf_counter() - t0, cpu_s(p.pid) - c0
    finally:
        p.terminate()
        p.wait()
        ms.terminate()
        ms.wait()
    return n / el, max(0.0, cpu - idle * el) / max(n, 1) * 1e6, idle, sent[0] / max(n, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seconds", nargs="?", type=float, default=6.0)
    ap.add_argument("--endpoints", type=int, default=16)
    ap.add_argument("--prompt-bytes", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--profiles", default="duplex,buffered,lean")
    ap.add_argument("--no-floor", action="store_true")
    ap.add_argument("--grpc-server", choices=("native", "grpcio"), default="native",
                    help="the picker's gRPC server (python -m epp --grpc-server; default %(default)s)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--scrape-interval", default=None,
                    help="the picker's --refresh-metrics-interval (default: 50 ms, slower past 16 endpoints)")
    ap.add_argument("--matrix", action="store_true",
                    help="every profile x 1 KB / 200 KB prompts x 8 / 64 / 256 endpoints (one table)")
    a = ap.parse_args()
    GRPC_SERVER[0] = a.grpc_server
    if a.matrix:
        run_matrix(a)
        return
    floor: dict[str, tuple[float, float]] = {}
    ours: dict[str, tuple[float, float, float, float]] = {}
    profiles = a.profiles.split(",")
    for _ in range(max(1, a.repeat)):
        if not a.no_floor and os.path.exists(FLOOR):
            out = subprocess.run([sys.executable, FLOOR, str(a.seconds)], capture_output=True, text=True).stdout
            for line in out.splitlines():
                m = re.match(r"(\w+)\s+req/s\s+(\d+).*cpu-us/request\s+(\d+)", line)
                if m and (m.group(1) not in floor or float(m.group(3)) < floor[m.group(1)][1]):
                    floor[m.group(1)] = (float(m.group(2)), float(m.group(3)))
        if "lean" in profiles and not a.no_floor and os.path.exists(FLOOR):
            rps, us = measure_lean_floor(a.seconds, a.prompt_bytes, a.concurrency)
            if "lean" not in floor or us < floor["lean"][1]:
                floor["lean"] = (rps, us)
        for profile in profiles:
            got = measure(profile, a.seconds, a.endpoints, a.prompt_bytes, a.concurrency, a.scrape_interval)
            if profile not in ours or got[1] < ours[profile][1]:
                ours[profile] = got
    for name, (rps, us) in floor.items():
        print(f"floor  {name:9s} req/s {rps:6.0f}  server cpu-us/request {us:5.0f}  req/s per core {1e6 / us:6.0f}")
    floor_for = {"duplex": "duplex", "buffered": "buffered", "lean": "lean"}
    for profile in profiles:
        rps, us, idle, msgs = ours[profile]
        ref = floor.get(floor_for[profile])
        ratio = f"  = {us / ref[1]:4.2f}x floor({floor_for[profile]})" if ref else ""
        print(f"epp    {profile:9s} req/s {rps:6.0f}  server cpu-us/request {us:5.0f} net  "
              f"req/s per core {1e6 / us:6.0f}{ratio}  (scrape {idle * 100:.1f}% of a core; "
              f"{a.endpoints} endpoints, {a.prompt_bytes} B prompt; {msgs:.2f} messages in per request)")


def run_matrix(a: argparse.Namespace) -> None:
    """The issue's matrix in one run, next to floor_profiles.py (1 KB) and the lean floor (both sizes)."""
    floor: dict[str, float] = {}
    if os.path.exists(FLOOR):
        out = subprocess.run([sys.executable, FLOOR, str(a.seconds)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.match(r"(\w+)\s+req/s\s+(\d+).*cpu-us/request\s+(\d+)", line)
            if m:
                floor[f"{m.group(1)}/1000"] = float(m.group(3))
        for size in (1000, 200_000):
            floor[f"lean/{size}"] = measure_lean_floor(a.seconds, size, a.concurrency)[1]
    print("| profile | prompt | endpoints | req/s | CPU µs/request (net of scraping) | req/s per core | "
          "floor µs | × floor | scraping (% of a core) |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for profile in ("duplex", "buffered", "lean"):
        for size in (1000, 200_000):
            for n in (8, 64, 256):
                rps, us, idle, _ = measure(profile, a.seconds, n, size, a.concurrency, a.scrape_interval)
                ref = floor.get(f"{profile}/{size}")
                rel = f"{us / ref:.2f}" if ref else "–"
                print(f"| {profile} | {size // 1000} KB | {n} | {rps:.0f} | {us:.0f} | {1e6 / us:.0f} | "
                      f"{ref or 0:.0f} | {rel} | {idle * 100:.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""`--workers` 1 -> 2: routed requests per second and CPU per request of the picker's processes.

    .venv/bin/python bench/worker_scaling.py [SECONDS] [--profile lean] [--workers 1 2] [--repeat R]
        [--connections 16] [--spread balanced kernel]

The picker runs as `python -m epp --workers N` (plaintext, 16 static endpoints on loopback metric
pages, bench/extproc_cost.py's), unpinned. The load generator is `h2load` (C, Debian's
`nghttp2-client`), so the client costs a few per cent of a core instead of most of one (a Python
gRPC client left no free core for a second worker on a 2-core machine): each of its requests is
one ext_proc stream carrying the gRPC-framed messages Envoy sends for one request of the profile
(request headers, then the body with end_of_stream), closed loop over 16 connections of 8 streams
(`--connections`; the supervisor, or SO_REUSEPORT with `--spread kernel`, spreads connections, not
streams, over the workers). h2load sees HTTP status only,
so the picker's own /metrics (worker 0 merges every worker's counters) checks that every stream
was routed and none failed. CPU is read from /proc for the supervisor and every worker, and from
rusage for h2load; the figure per request divides by the requests the picker counted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpuclock import children
from extproc_cost import cpu_s, free_port, metrics_server, plan, wait_port

PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


def stream_body(profile: str, prompt_bytes: int = 1000) -> bytes:
    """The gRPC-framed request messages of one ext_proc stream, as Envoy sends them for `profile`.
    The response phases are left out: in buffered and lean the request-headers reply skips them."""
    msgs = [m.SerializeToString() for m, _ in plan(profile, prompt_bytes)[:2]]
    return b"".join(b"\0" + struct.pack(">I", len(m)) + m for m in msgs)


def counters(metrics_port: int) -> tuple[float, float]:
    """(requests the picker routed, request errors) from worker 0's merged /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    routed = errors = 0.0
    for line in text.splitlines():
        if line.startswith("inference_objective_request_total{"):
            routed += float(line.rsplit(" ", 1)[1])
        elif line.startswith("inference_objective_request_error_total{"):
            errors += float(line.rsplit(" ", 1)[1])
    return routed, errors


@dataclass
class Row:
    label: str
    processes: int
    rps: float  # h2load's main phase (summed over the control's two)
    us_per_req: float  # every picker process's CPU over the run / requests routed in it
    client_pct: float  # h2load's CPU, % of a core
    pages_pct: float  # the metrics pages' server (the model servers' stand-in), % of a core
    failed: int  # h2load's failed streams + the picker's request errors + streams it did not count


def h2load(port: int, secs: float, body: str, connections: int = 16) -> tuple[float, int, int, float]:
    """(main-phase req/s, requests done, failed, h2load's CPU seconds)."""
    proc = subprocess.Popen(["h2load", "-D", f"{secs:g}", "--warm-up-time", "1", "-c", str(connections), "-m", "8",
                             "-t", "1", "-d", body, "-H", "content-type: application/grpc", "-H", "te: trailers",
                             f"http://127.0.0.1:{port}{PATH}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    assert proc.stdout is not None
    timer = threading.Timer(secs + 60, proc.kill)  # a wedged run ends, it does not hang the bench
    timer.start()
    try:
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (several run at once)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        timer.cancel()
        proc.stdout.close()
    m = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
    n = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    if m is None or n is None:
        raise RuntimeError(f"h2load said:\n{out}")
    return float(m.group(1)), int(n.group(1)), int(n.group(3)), usage.ru_utime + usage.ru_stime


def start_picker(workers: int, addrs: list[str],
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen[bytes], int, int]:
    """`python -m epp --workers N` on a free port: (process, ext_proc port, metrics port)."""
    port, metrics_port = free_port(), free_port()
    argv = [sys.executable, "-m", "epp", "--workers", str(workers), "--pool-name", "bench", "--endpoints",
            ",".join(addrs), "--secure-serving=false", "--grpc-port", str(port), "--grpc-health-port",
            str(free_port()), "--metrics-port", str(metrics_port), "--metrics-endpoint-auth=false",
            "--bind-address", "127.0.0.1", "--log-level", "warning", "--drain-timeout", "0s",
            "--shutdown-grace", "1s", *extra]
    return subprocess.Popen(argv, stderr=subprocess.DEVNULL), port, metrics_port


def stop(p: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` s."""
    p.terminate()
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def run(workers: int, pickers: int, secs: float, addrs: list[str], server_pid: int, body: str,
        extra: tuple[str, ...] = (), connections: int = 16, spread: str = "") -> Row:
    """`pickers` independent pickers of `workers` workers each, every one driven by its own h2load
    (`connections` in all), at the same time; `spread`: their --worker-connections. pickers=2 with
    1 worker is the control: two processes that share nothing, i.e. what this machine allows two
    serving loops."""
    if spread:
        extra = (*extra, "--worker-connections", spread)
    started = [start_picker(workers, addrs, extra) for _ in range(pickers)]
    try:
        for _, port, metrics_port in started:
            wait_port(port, timeout=60)  # a busy shared machine starts Python slowly
            wait_port(metrics_port, timeout=60)
        time.sleep(1.5)  # every worker listening
        pids = [x for p, _, _ in started for x in ([p.pid, *children(p.pid)] if workers > 1 else [p.pid])]
        conns = max(1, connections // pickers)

        def drive(seconds: float) -> list[tuple[float, int, int, float]]:
            with ThreadPoolExecutor(pickers) as pool:
                return list(pool.map(lambda s: h2load(s[1], seconds, body, conns), started))

        drive(1.0)  # warm-up: connections, caches, the adaptive scrape rate
        before = [counters(m) for _, _, m in started]
        c0, s0, t0 = sum(cpu_s(x) for x in pids), cpu_s(server_pid), time.perf_counter()
        results = drive(secs)
        wall = time.perf_counter() - t0
        cpu = sum(cpu_s(x) for x in pids) - c0
        served = cpu_s(server_pid) - s0
        time.sleep(0.2)  # the other workers' counters reach worker 0's page
        after = [counters(m) for _, _, m in started]
        routed = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
        errors = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
        done = sum(r[1] for r in results)
        lost = sum(r[2] for r in results) + int(errors) + max(0, done - int(routed))
        label = f"{workers} worker{'s' if workers > 1 else ''}" if pickers == 1 else \
            f"control: {pickers} independent pickers"
        if spread:
            label += f" ({spread})"
        return Row(label, len(pids), sum(r[0] for r in results), 1e6 * cpu / max(routed, 1),
                   100 * sum(r[3] for r in results) / wall, 100 * served / wall, lost)
    finally:
        for p, _, _ in started:
            stop(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seconds", nargs="?", type=float, default=5.0, help="measured seconds per run (default 5)")
    ap.add_argument("--profile", default="lean", choices=["buffered", "lean"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every case, interleaved")
    ap.add_argument("--picker-arg", action="append", default=[], metavar="FLAG",
                    help="an extra flag for every picker, e.g. --picker-arg=--worker-prefix-notes=false")
    ap.add_argument("--connections", type=int, default=16,
                    help="h2load's connections in all (8 streams each; default 16). A gateway opens one per "
                         "Envoy worker thread, so 2 or 4 is what a small one sends")
    ap.add_argument("--spread", nargs="+", default=[""], choices=["", "balanced", "kernel"],
                    help="run the multi-worker cases once per --worker-connections value (default: the "
                         "picker's default only)")
    ap.add_argument("--no-control", action="store_true",
                    help="leave out the control (two independent single-worker pickers, each its own h2load)")
    a = ap.parse_args()
    if shutil.which("h2load") is None:
        sys.exit("h2load is not installed (Debian: apt-get install nghttp2-client)")
    body = f"/tmp/epp-worker-scaling-{os.getpid()}.bin"
    with open(body, "wb") as f:
        f.write(stream_body(a.profile))
    cases = [(w, 1, sp) for w in a.workers for sp in (a.spread if w > 1 else [""])] + \
        ([] if a.no_control else [(1, 2, "")])
    ms, addrs = metrics_server(16)
    try:
        with open("/proc/loadavg") as f:
            load0 = f.read().split()[0]
        rows = [run(w, n, a.seconds, addrs, ms.pid, body, tuple(a.picker_arg), a.connections, sp)
                for _ in range(a.repeat) for w, n, sp in cases]
        with open("/proc/loadavg") as f:
            load1 = f.read().split()[0]
    finally:
        ms.terminate()
        ms.wait()
        os.unlink(body)
    k = len(cases)
    print(f"{a.profile} profile, 16 endpoints, 1 KB chat, h2load {a.connections} connections x 8 streams, "
          f"{os.cpu_count()} CPUs, load average {load0} -> {load1}")
    print(f"| case | req/s | x the {rows[0].label} run of its round | CPU µs / request (all picker processes) "
          "| h2load, % of a core | metrics pages' server, % of a core | failed |")
    print("|---|---|---|---|---|---|---|")
    ratios: dict[str, list[float]] = {}
    for j, r in enumerate(rows):
        ratio = r.rps / rows[j - j % k].rps  # rounds drift on a shared VM: compare within one
        ratios.setdefault(r.label, []).append(ratio)
        print(f"| {r.label} ({r.processes} processes) | {r.rps:.0f} | {ratio:.2f} | {r.us_per_req:.0f} "
              f"| {r.client_pct:.0f} | {r.pages_pct:.1f} | {r.failed} |")
    for label, rs in list(ratios.items())[1:]:
        print(f"{label}: x{statistics.median(rs):.2f} median over {len(rs)} rounds ({min(rs):.2f}-{max(rs):.2f})")


if __name__ == "__main__":
    main()

"""Instructions the picker executes per routed request, counted by valgrind's callgrind.

    .venv/bin/python bench/picker_instructions.py [--requests 3000] [--profile buffered]
        [--rate 0] [--workers 1] [--tree DIR] [--repeat 1] [--picker-arg ARG ...]

Why: on a shared 2-core VM a CPU-time figure of the same code moves by 25% or more between
minutes (docs/benchmarks.md, "Picker cost"), so a change worth 5% cannot be seen in seconds of
CPU. An instruction count can: callgrind counts every instruction the process executes,
whatever else the machine does, and the same run repeats within about 1%. It is not a time (a
cache miss costs more than an add), so it ranks code changes; CPU per request stays the figure
of the goals.

How: `python -m epp` (plaintext, 16 static endpoints on loopback metric pages, as
bench/extproc_cost.py; `--refresh-metrics-interval 1s` so the scraper's share stays small) runs
under `valgrind --tool=callgrind` with instrumentation off. After a warm-up of 100 requests,
counting is switched on; the picker sits idle for `--idle-seconds` (its background rate:
scraping, timers), then `h2load` (Debian's nghttp2-client) sends `--requests` ext_proc streams
carrying the messages Envoy sends for one request of `--profile` (request headers, then the
body), over `--connections` (4) connections of 4 streams, or one stream at a time at `--rate`
requests/s. The figure per request is the instructions of that phase, less the idle rate over
its length, divided by the requests. `--workers N` runs `--workers N` with valgrind following the children, and counts
the supervisor and every worker together. `--tree DIR` runs the picker from another checkout (an
A/B against a worktree). Time runs ~50x slower under valgrind, so what the picker does per
interval of time (the workers' 1 ms fold of each other's counts, 2 ms note batches) happens per
request more often here than at full speed.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from extproc_cost import free_port, metrics_server, wait_port
from worker_scaling import PATH, stop, stream_body

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Count:
    requests: int
    ok: int
    idle_per_s: float  # instructions a second with no traffic
    per_request: float  # instructions per request beyond the idle rate
    seconds: float  # wall time of the traffic phase (valgrind runs the picker ~50x slower)


def _part_totals(prefix: str) -> dict[int, int]:
    """callgrind dump part -> its instruction total, summed over processes (one file per process
    and `callgrind_control -d`)."""
    out: dict[int, int] = {}
    for path in glob.glob(prefix + "*"):
        part, total = 0, None
        with open(path) as f:
            for line in f:
                if line.startswith("part:"):
                    part = int(line.split()[1])
                elif line.startswith("totals:"):
                    total = int(line.split()[1])
                    break
        if total is not None:
            out[part] = out.get(part, 0) + total
    return out


def _control(pid: int | None, *args: str) -> None:
    """callgrind_control for one process, or (None) for every process valgrind runs here."""
    subprocess.run(["callgrind_control", *args, *([str(pid)] if pid is not None else [])],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=60)


def count(requests: int, profile: str, rate: float, idle_s: float, tree: str, workdir: str,
          workers: int = 1, connections: int = 4, extra: tuple[str, ...] = ()) -> Count:
    """One picker under callgrind: its idle rate, then `requests` streams."""
    srv, addrs = metrics_server(16)
    body = os.path.join(workdir, "body.bin")
    with open(body, "wb") as f:
        f.write(stream_body(profile))
    port = free_port()
    prefix = os.path.join(workdir, f"cg.{time.monotonic_ns()}")
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={prefix}.%p", "--instr-atstart=no",
            *(["--trace-children=yes"] if workers > 1 else []),
            sys.executable, "-m", "epp", "--pool-name", "bench", "--endpoints", ",".join(addrs),
            "--secure-serving=false", "--grpc-port", str(port), "--grpc-health-port", str(free_port()),
            "--metrics-port", str(free_port()), "--metrics-endpoint-auth=false", "--bind-address", "127.0.0.1",
            "--log-level", "warning", "--drain-timeout", "0s", "--shutdown-grace", "1s",
            "--refresh-metrics-interval", "1s", *(["--workers", str(workers)] if workers > 1 else []), *extra]
    picker = subprocess.Popen(argv, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=300)  # Python starts slowly under valgrind
        load = ["h2load", "-t", "1", "-d", body, "-H", "content-type: application/grpc", "-H", "te: trailers"]
        load += ["-c", "1", "-m", "1", "--rps", f"{rate:g}"] if rate > 0 else ["-c", str(connections), "-m", "4"]
        url = f"http://127.0.0.1:{port}{PATH}"
        if workers > 1:
            time.sleep(15)  # every worker up (each imports the picker under valgrind)
        subprocess.run([*load, "-n", "100", url], stdout=subprocess.DEVNULL, check=True, timeout=600)  # warm-up
        who = picker.pid if workers == 1 else None  # None: the supervisor and every worker
        _control(who, "-i", "on")
        time.sleep(idle_s)
        _control(who, "-d")  # part 1: idle
        t0 = time.monotonic()
        run = subprocess.run([*load, "-n", str(requests), url], capture_output=True, text=True, timeout=1800)
        seconds = time.monotonic() - t0
        _control(who, "-d")  # part 2: traffic
        _control(who, "-i", "off")
    finally:
        stop(picker, timeout=120)  # valgrind writes its last dump on the way out
        srv.kill()
        srv.wait()
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", run.stdout)
    if m is None:
        raise RuntimeError(f"h2load said:\n{run.stdout}\n{run.stderr}")
    parts = _part_totals(prefix)
    if 1 not in parts or 2 not in parts:
        raise RuntimeError(f"callgrind wrote no dumps at {prefix}* (parts {sorted(parts)})")
    idle_rate = parts[1] / idle_s
    return Count(requests, int(m.group(1)), idle_rate, (parts[2] - idle_rate * seconds) / requests, seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--requests", type=int, default=3000, help="ext_proc streams counted (default %(default)s)")
    ap.add_argument("--profile", default="buffered", choices=("buffered", "lean"),
                    help="which messages a stream carries (default %(default)s)")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="requests/s one at a time (0: 4 connections x 4 streams, closed loop)")
    ap.add_argument("--idle-seconds", type=float, default=8.0, help="idle window counted first (default %(default)s)")
    ap.add_argument("--workers", type=int, default=1, help="the picker's --workers (default %(default)s)")
    ap.add_argument("--connections", type=int, default=4,
                    help="h2load's connections of 4 streams each, closed loop (default %(default)s; 2 with one "
                         "worker is what each of 2 workers is sent: the share of the gap that is split load)")
    ap.add_argument("--tree", default=ROOT, help="checkout whose picker runs (default: this one)")
    ap.add_argument("--repeat", type=int, default=1, help="runs (each a fresh picker)")
    ap.add_argument("--picker-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for the picker, repeatable (e.g. --picker-arg=--config-file=F)")
    ap.add_argument("--keep", default="", metavar="DIR",
                    help="leave the callgrind dumps in DIR (for callgrind_annotate; default: removed)")
    a = ap.parse_args()
    for tool in ("valgrind", "callgrind_control", "h2load"):
        if shutil.which(tool) is None:
            sys.exit(f"picker_instructions: `{tool}` not found (Debian: valgrind, nghttp2-client)")
    if a.requests < 1 or a.idle_seconds <= 0 or a.repeat < 1 or a.workers < 1 or a.connections < 1:
        sys.exit("picker_instructions: --requests, --idle-seconds, --repeat, --workers and --connections "
                 "must be positive")
    if a.keep:
        os.makedirs(a.keep, exist_ok=True)
    with contextlib.nullcontext(a.keep) if a.keep else tempfile.TemporaryDirectory(prefix="epp-cg-") as workdir:
        how = f"{a.rate:g}/s one at a time" if a.rate > 0 else f"{a.connections} connections x 4 streams"
        print(f"picker from {a.tree} (--workers {a.workers}); {a.profile}, {a.requests} requests, {how}",
              flush=True)
        for i in range(a.repeat):
            c = count(a.requests, a.profile, a.rate, a.idle_seconds, a.tree, workdir, a.workers, a.connections,
                      tuple(a.picker_arg))
            print(f"run {i + 1}: {c.per_request:,.0f} instructions per request "
                  f"({c.ok}/{c.requests} ok, idle {c.idle_per_s / 1e6:.1f} M/s, traffic {c.seconds:.1f} s)",
                  flush=True)


if __name__ == "__main__":
    main()

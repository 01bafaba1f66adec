"""CPU of the whole metrics poller: N endpoints polled every INTERVAL over real HTTP on loopback.

    .venv/bin/python bench/metrics_poller.py [--endpoints 100] [--interval 0.05] [--seconds 10]
                                              [--mode filtered|full|both] [--profile] [--no-pin]

The model servers run in a separate process (a minimal keep-alive HTTP/1.1 server on N ports
serving the 40 KB vLLM-shaped page of ../shared/bench-floor/vllm_page.py), so the CPU figures are
the poller process's only; the poller is pinned to the first CPU, the servers to the second.
`filtered`: the servers honour `?name[]=` like vLLM's prometheus_client (replies ~1 KB); `full`:
they ignore it and every poll reads the whole 40 KB page. Prints the poller's CPU as % of one
core, polls/s achieved against the target, CPU per poll, and (with --profile) where the time
goes. No assertions.

`--hostile K` adds K pods that answer every poll with a 10 MB page (issue 13.7); `--no-caps`
polls them as before the page cap and backoff existed (no size cap, no backoff) for comparison.
The poller's peak RSS is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "shared" / "bench-floor"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpuclock  # noqa: E402

# ---- the server process ------------------------------------------------------------------------


def serve(count: int, honour_filter: bool, hostile: int = 0) -> None:
    """Listen on `count` (+ `hostile`) ports of 127.0.0.1; print them; answer GETs until stdin closes."""
    from vllm_page import page

    text = page()
    filler = "".join(f'filler_metric{{i="{i:08d}",pad="{"x" * 64}"}} 1\n' for i in range(1000))
    huge = text + filler * (10_000_000 // len(filler))  # ~10 MB, a valid page
    wanted = ("vllm:num_requests", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
              "vllm:cache_config_info", "vllm:lora_requests_info")
    small = "".join(line + "\n" for line in text.splitlines() if any(w in line for w in wanted))

    def reply(body: str) -> bytes:
        data = body.encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {len(data)}\r\n\r\n"
        return head.encode() + data

    full_reply, small_reply, huge_reply = reply(text), reply(small), reply(huge)

    class Http(asyncio.Protocol):
        huge = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while True:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self.buf = self.buf[:end], self.buf[end + 4 :]
                line = head.split(b"\r\n", 1)[0]
                filtered = honour_filter and (b"name%5B%5D=" in line or b"name[]=" in line)
                if self.huge:
                    self.transport.write(huge_reply)  # type: ignore[attr-defined]
                    continue
                self.transport.write(small_reply if filtered else full_reply)  # type: ignore[attr-defined]

    class Huge(Http):
        huge = True

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(Http, "127.0.0.1", 0, backlog=512) for _ in range(count)]
        servers += [await loop.create_server(Huge, "127.0.0.1", 0, backlog=512) for _ in range(hostile)]
        ports = [s.sockets[0].getsockname()[1] for s in servers]
        print(" ".join(map(str, ports)), flush=True)
        await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin

    asyncio.run(main())


# ---- the poller (this process) -------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """CPU seconds of a process, exact (bench/cpuclock.py)."""
    return cpuclock.process_cpu(pid)


async def measure(ports: list[int], interval: float, seconds: float, server_pid: int,
                  profile: bool, caps: bool = True) -> dict[str, float]:
    from epp.datastore import Datastore
    from epp.metrics.scrape import Scraper

    ds = Datastore("bench")
    ds.set_static_endpoints(f"127.0.0.1:{p}" for p in ports)
    # without caps: read any page whole and never back off (the poller before issue 13.7)
    limits = {} if caps else {"max_page_bytes": 1 << 40, "max_backoff": interval}
    scraper = Scraper(ds, interval=interval, **limits)
    scraper.start()
    await asyncio.sleep(max(1.0, interval * 10))  # warm-up: connections open, filter probed
    prof = cProfile.Profile() if profile else None
    ok0, fail0 = scraper.polls_ok, scraper.polls_failed
    cpu0, wall0, srv0 = time.process_time(), time.monotonic(), proc_cpu(server_pid)
    if prof:
        prof.enable()
    await asyncio.sleep(seconds)
    if prof:
        prof.disable()
    cpu, wall, srv = time.process_time() - cpu0, time.monotonic() - wall0, proc_cpu(server_pid) - srv0
    ok, failed = scraper.polls_ok - ok0, scraper.polls_failed - fail0
    now = time.monotonic()
    ages = sorted(now - ep.metrics.updated for ep in ds.endpoints.values() if ep.metrics is not None)
    await scraper.stop()
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        print(out.getvalue())
    return {"cpu": cpu, "wall": wall, "ok": ok, "failed": failed, "server_cpu": srv,
            "age_p50": ages[len(ages) // 2] if ages else float("nan"), "age_max": ages[-1] if ages else float("nan")}


def run(mode: str, args: argparse.Namespace) -> None:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(args.endpoints), "--honour", "1" if mode == "filtered" else "0",
         "--hostile", str(args.hostile), *([] if args.pin else ["--no-pin"])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None
        ports = [int(p) for p in server.stdout.readline().split()]
        factory = None
        if args.loop == "uvloop":
            import uvloop

            factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            r = runner.run(measure(ports, args.interval, args.seconds, server.pid, args.profile, args.caps))
    finally:
        if server.stdin:
            server.stdin.close()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    target = args.endpoints / args.interval
    polls = r["ok"] / r["wall"]
    hostile = f" + {args.hostile} serving 10 MB ({'capped' if args.caps else 'no caps'})" if args.hostile else ""
    print(f"[{mode}, {args.loop}] {args.endpoints} endpoints{hostile} every {args.interval * 1000:g} ms "
          f"for {r['wall']:.1f} s")
    per_poll = 1e6 * r["cpu"] / max(r["ok"], 1)
    print(f"  poller CPU: {100 * r['cpu'] / r['wall']:.1f}% of one core; {per_poll:.0f} us per poll")
    print(f"  polls/s: {polls:.0f} of {target:.0f} targeted ({100 * polls / target:.0f}%); failed: {r['failed']}")
    print(f"  snapshot age at the end: median {r['age_p50'] * 1000:.0f} ms, max {r['age_max'] * 1000:.0f} ms")
    print(f"  (server process CPU: {100 * r['server_cpu'] / r['wall']:.1f}% of one core, not counted above)")
    print(f"  poller peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoints", type=int, default=100)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--mode", choices=["filtered", "full", "both"], default="both")
    ap.add_argument("--profile", action="store_true", help="print the poller's top functions by own time")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin poller and servers to CPUs")
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                    help="the poller's event loop (the picker's scraper thread: see epp.metrics.scrape.ScrapeThread)")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--honour", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--hostile", type=int, default=0, help="extra pods serving a 10 MB page")
    ap.add_argument("--no-caps", dest="caps", action="store_false",
                    help="no page size cap and no backoff (the poller before issue 13.7)")
    args = ap.parse_args()
    pin = args.pin and len(os.sched_getaffinity(0)) >= 2
    if args.serve:
        if pin:
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[1]})
        serve(args.serve, bool(args.honour), args.hostile)
        return
    if pin:  # the poller on one core, the servers on another (other load on the machine still counts)
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    for mode in (["filtered", "full"] if args.mode == "both" else [args.mode]):
        run(mode, args)


if __name__ == "__main__":
    main()

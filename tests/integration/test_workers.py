"""`--workers N`: N picker processes on one ext_proc port, started and stopped by `python -m epp`
as a real process; the supervisor hands each connection to the worker holding the fewest
(`--worker-connections balanced`, the default) or the kernel spreads them (SO_REUSEPORT, `kernel`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from epp import cpus, tls
from epp.cli import cpu_limit, parse_args
from tests.extproc_client import body_chunks, chat, request_headers, set_headers
from tests.procs import free_port, free_ports, wait_serving

EPS = "10.0.0.1:8000,10.0.0.2:8000"


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


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def loop_ns(pid: int) -> int:
    """CPU time of a process's main thread (its serving loop), ns (/proc/<pid>/schedstat)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def assert_both_served(kids: list[int], before: dict[int, int]) -> None:
    """Connections reached every worker: each loop's CPU since `before` is a real share of the
    busiest one's, not just its timers (ns from schedstat: 60 cheap requests fit in one 10 ms tick)."""
    used = {k: loop_ns(k) - before[k] for k in kids}
    assert min(used.values()) > 0.1 * max(used.values()), used


async def two_workers(pid: int) -> list[int]:
    """The supervisor's two worker processes, once both exist (bounded wait)."""
    kids: list[int] = []
    for _ in range(100):
        kids = children(pid)
        if len(kids) == 2:
            break
        await asyncio.sleep(0.1)
    assert len(kids) == 2
    return kids


async def route_once(port: int, content: str = "hi") -> str:
    """One routed request on a new connection (the kernel picks the worker per connection)."""
    # a local subchannel pool: channels in one process would share one connection otherwise
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        call = ep_grpc.ExternalProcessorStub(ch).Process()
        for m in [request_headers(), *body_chunks(chat("m", content))]:
            await call.write(m)
        await call.done_writing()
        replies = [r async for r in call]
    return set_headers(replies[0])["x-gateway-destination-endpoint"]


async def serve_pages(apps):  # type: ignore[no-untyped-def]
    """Each aiohttp app on its own loopback port: (runners, addresses)."""
    from aiohttp import web

    runners, addrs = [], []
    for app in apps:
        r = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await r.setup()
        await web.TCPSite(r, "127.0.0.1", 0).start()
        runners.append(r)
        addrs.append(f"127.0.0.1:{r.addresses[0][1]}")
    return runners, addrs


def stop_supervisor(p: subprocess.Popen[bytes]) -> None:
    """SIGTERM the supervisor; killed if it does not end."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


async def stop_all(p: subprocess.Popen[bytes], runners) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM the supervisor (killed if it does not end), then the page servers."""
    try:
        stop_supervisor(p)
    finally:
        for r in runners:
            await r.cleanup()


def test_flags():
    # not given: the CPU limit (1 on a machine without one, as CI's); tests/test_cpus.py has the rules
    assert parse_args(["--pool-name", "p", "--grpc-port", "9002"]).workers == cpus.default_workers()[0]
    assert parse_args(["--pool-name", "p", "--grpc-port", "0"]).workers == 1
    assert parse_args(["--pool-name", "p"]).worker_prefix_notes is True
    assert parse_args(["--pool-name", "p", "--worker-prefix-notes=false"]).worker_prefix_notes is False
    assert parse_args(["--pool-name", "p", "--workers", "auto"]).workers == cpu_limit() >= 1
    with pytest.raises(SystemExit):
        parse_args(["--pool-name", "p", "--workers", "2", "--grpc-port", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--pool-name", "p", "--workers", "2", "--ha-enable-leader-election"])


def grpc_conns(pid: int, port: int) -> int:
    """Established TCP connections a process holds on local port `port` (/proc/<pid>/fd, /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.read().splitlines()[1:]:
                cols = line.split()
                if cols[9] in inodes and cols[3] == "01" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    n += 1
    return n


@pytest.mark.parametrize("spread", ["balanced", "kernel"])
async def test_two_workers_share_the_port_and_stop_together(spread: str):
    port, hport = free_ports(2)
    p = subprocess.Popen([sys.executable, "-m", "epp", "--workers", "2", "--pool-name", "p", "--endpoints", EPS,
                          "--grpc-port", str(port), "--grpc-health-port", str(hport), "--metrics-port", "0",
                          "--bind-address", "127.0.0.1", "--secure-serving=false", "--log-format", "text",
                          "--drain-timeout", "0s", "--shutdown-grace", "1s", "--worker-connections", spread],
                         stderr=subprocess.DEVNULL)
    try:
        await wait_serving(hport)
        kids = await two_workers(p.pid)
        await asyncio.sleep(1.0)  # both listening (the first may be ready before the second)
        before = {k: loop_ns(k) for k in kids}
        routed = await asyncio.gather(*(route_once(port) for _ in range(120)))
        assert set(routed) <= set(EPS.split(","))
        assert_both_served(kids, before)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 0
        for _ in range(50):
            if not [k for k in kids if alive(k)]:
                break
            time.sleep(0.1)
        assert not [k for k in kids if alive(k)]
    finally:
        if p.poll() is None:
            p.kill()  # the workers follow (PR_SET_PDEATHSIG)
            p.wait(timeout=10)


async def test_two_connections_always_reach_two_workers(tmp_path):
    """A gateway of two Envoy threads opens two connections: one per worker, every time (the
    kernel's hash puts both on one worker half the time), and a closed one's worker gets the next."""
    port, hport = free_ports(2)
    pair = tls.self_signed(["localhost"])  # one certificate for both workers (each would make its own)
    (tmp_path / "tls.crt").write_bytes(pair.cert)
    (tmp_path / "tls.key").write_bytes(pair.key)
    p = subprocess.Popen([sys.executable, "-m", "epp", "--workers", "2", "--pool-name", "p", "--endpoints", EPS,
                          "--grpc-port", str(port), "--grpc-health-port", str(hport), "--metrics-port", "0",
                          "--bind-address", "127.0.0.1", "--log-format", "text", "--cert-path", str(tmp_path),
                          "--drain-timeout", "0s", "--shutdown-grace", "1s"], stderr=subprocess.DEVNULL)
    creds = grpc.ssl_channel_credentials(root_certificates=pair.cert)
    opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.ssl_target_name_override", "localhost")]

    async def channel() -> grpc.aio.Channel:
        ch = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=opts)
        await ch.channel_ready()
        return ch

    async def counts(want: list[int] | None = None, total: int | None = None) -> list[int]:
        """Each worker's connections once they are `want` (or add up to `total`), bounded."""
        got: list[int] = []
        for _ in range(100):
            got = [grpc_conns(k, port) for k in kids]
            if got == want or sum(got) == total:
                break
            await asyncio.sleep(0.05)
        return got

    async def close(ch: grpc.aio.Channel) -> None:
        await ch.close()
        await asyncio.sleep(0.3)  # the worker sees the end and tells the supervisor (milliseconds)

    try:
        await wait_serving(hport)
        kids = await two_workers(p.pid)
        await asyncio.sleep(1.0)  # both taking connections
        for _ in range(4):
            chans = [await channel() for _ in range(2)]
            assert await counts([1, 1]) == [1, 1]
            for ch in chans:
                await close(ch)
            assert await counts([0, 0]) == [0, 0]
        a, b = await channel(), await channel()
        third = await channel()
        assert sorted(await counts(total=3)) == [1, 2]
        await close(third)  # on the worker that held 1: both hold 1 again
        assert await counts([1, 1]) == [1, 1]
        held_a = [grpc_conns(k, port) for k in kids]
        await close(a)
        after = await counts(total=1)
        again = await channel()  # goes where a left
        assert await counts([1, 1]) == [1, 1], (held_a, after)
        for ch in (b, again):
            await ch.close()
    finally:
        stop_supervisor(p)


@pytest.fixture
def cgroup_with_cpu_limit():  # type: ignore[no-untyped-def]
    """A real cgroup of this machine limited to 1.5 CPUs (v1 cfs quota, or v2 cpu.max), removed after;
    the test is skipped where cgroups cannot be made (no root, a read-only cgroupfs)."""
    with open("/proc/self/mountinfo") as f:
        mounts = cpus._mounts(f.read())  # the same discovery the picker uses
    made = None
    for m in mounts:
        d = os.path.join(m.point, f"epp-test-{os.getpid()}")
        try:
            os.mkdir(d)
        except OSError:
            continue
        try:
            if m.v2:
                with open(os.path.join(d, "cpu.max"), "w") as f:
                    f.write("150000 100000")
            else:
                with open(os.path.join(d, "cpu.cfs_quota_us"), "w") as f:
                    f.write("150000")
        except OSError:
            os.rmdir(d)
            continue
        made = d
        break
    if made is None:
        pytest.skip("no cgroup with a CPU limit can be made here")
    try:
        yield made
    finally:
        for _ in range(50):  # the cgroup goes once its processes have ended
            try:
                os.rmdir(made)
                break
            except OSError:
                time.sleep(0.1)


async def test_the_default_is_one_worker_per_cpu_of_the_limit(cgroup_with_cpu_limit):  # type: ignore[no-untyped-def]
    port, hport = free_ports(2)
    procs = os.path.join(cgroup_with_cpu_limit, "cgroup.procs")

    def enter() -> None:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    p = subprocess.Popen([sys.executable, "-m", "epp", "--pool-name", "p", "--endpoints", EPS,
                          "--grpc-port", str(port), "--grpc-health-port", str(hport), "--metrics-port", "0",
                          "--bind-address", "127.0.0.1", "--secure-serving=false", "--log-format", "json",
                          "--drain-timeout", "0s", "--shutdown-grace", "1s"],
                         stderr=subprocess.PIPE, preexec_fn=enter)
    try:
        await wait_serving(hport)
        kids = await two_workers(p.pid)  # 1.5 CPUs: 2 workers, no --workers given
        routed = await asyncio.gather(*(route_once(port) for _ in range(40)))
        assert set(routed) <= set(EPS.split(","))
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
        assert p.returncode == 0
        lines = [line for line in err.decode().splitlines() if '"msg": "workers"' in line or '"msg":"workers"' in line]
        assert len(lines) == 1 and "1.5 CPUs" in lines[0], err.decode()[-2000:]  # said once, by worker 0
        assert not [k for k in kids if alive(k)]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def test_a_worker_that_cannot_start_takes_the_rest_down():
    busy = free_port()
    # a port bound without SO_REUSEPORT by someone else: no worker can listen, the supervisor exits non-zero
    with socket.socket() as s:
        s.bind(("127.0.0.1", busy))
        s.listen()
        p = subprocess.run([sys.executable, "-m", "epp", "--workers", "2", "--pool-name", "p", "--endpoints", EPS,
                            "--grpc-port", str(busy), "--grpc-health-port", "0", "--metrics-port", "0",
                            "--bind-address", "127.0.0.1", "--secure-serving=false"],
                           capture_output=True, timeout=60)
    assert p.returncode != 0


async def test_workers_die_with_a_killed_supervisor():
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    before = set(os.listdir(shm)) if shm else set()
    port, hport = free_ports(2)
    p = subprocess.Popen([sys.executable, "-m", "epp", "--workers", "2", "--pool-name", "p", "--endpoints", EPS,
                          "--grpc-port", str(port), "--grpc-health-port", str(hport), "--metrics-port", "0",
                          "--bind-address", "127.0.0.1", "--secure-serving=false", "--drain-timeout", "0s",
                          "--shutdown-grace", "1s"], stderr=subprocess.DEVNULL)
    kids: list[int] = []

    def share_files(sockets: bool = False) -> list[str]:
        """The share's file (and with `sockets`, the workers' ipc:// socket files next to it)."""
        new = set(os.listdir(shm)) - before if shm else set()
        return [f for f in new if f.startswith("epp-workers-") and (sockets or ".peer" not in f)]

    try:
        await wait_serving(hport)
        kids = await two_workers(p.pid)
        for _ in range(100):  # bounded: both workers map the share, then the supervisor drops its name
            if not share_files():
                break
            await asyncio.sleep(0.1)
    finally:
        p.kill()  # SIGKILL: no chance to pass anything on
        p.wait(timeout=10)
    for _ in range(100):  # bounded: the kernel sends each worker SIGTERM (PR_SET_PDEATHSIG)
        if not [k for k in kids if alive(k)]:
            break
        await asyncio.sleep(0.1)
    assert not [k for k in kids if alive(k)]
    assert not share_files(sockets=True)  # a SIGKILL leaves no share file or socket behind


async def test_two_workers_poll_each_model_server_once_and_both_route_on_its_page():
    """Worker 0 scrapes; worker 1 routes on the pages it shares (a server with a long queue is
    avoided by both), and each server is polled at one picker's rate, not two; worker 0's /metrics
    counts both workers' requests. The share's file name is gone once both workers have mapped it."""
    from aiohttp import web

    from tests.integration.test_scheduling_live import vllm_page

    hits = {"busy": 0, "idle": 0}

    def server(name: str, waiting: float):  # type: ignore[no-untyped-def]
        async def metrics(_: web.Request) -> web.Response:
            hits[name] += 1
            return web.Response(text=vllm_page(waiting=waiting), content_type="text/plain")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app

    runners, where = await serve_pages([server("busy", 1000.0), server("idle", 0.0)])
    addrs = dict(zip(("busy", "idle"), where, strict=True))
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    before = set(os.listdir(shm)) if shm else set()
    port, hport, mport = free_ports(3)
    p = subprocess.Popen([sys.executable, "-m", "epp", "--workers", "2", "--pool-name", "p",
                          "--endpoints", f"{addrs['busy']},{addrs['idle']}",
                          "--grpc-port", str(port), "--grpc-health-port", str(hport), "--metrics-port", str(mport),
                          "--bind-address", "127.0.0.1", "--secure-serving=false", "--log-format", "text",
                          "--refresh-metrics-interval", "50ms", "--refresh-metrics-idle-interval", "0",
                          "--refresh-metrics-quiet-interval", "0",
                          "--drain-timeout", "0s", "--shutdown-grace", "1s"], stderr=subprocess.DEVNULL)
    try:
        await wait_serving(hport)
        kids = await two_workers(p.pid)
        await asyncio.sleep(1.0)  # both listening, pages shared
        if shm:  # both workers mapped the share: its name is gone already, the sharing goes on
            assert not [f for f in set(os.listdir(shm)) - before if f.startswith("epp-workers-") and ".peer" not in f]
        cpu0 = {k: loop_ns(k) for k in kids}
        routed = await asyncio.gather(*(route_once(port) for _ in range(120)))
        assert set(routed) == {addrs["idle"]}  # every worker saw the busy server's queue
        assert_both_served(kids, cpu0)
        # worker 0's /metrics counts every worker's decisions (each worker's page merged in)
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode())
        attempts = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("inference_extension_scheduler_attempts_total{"))
        assert attempts == 120, attempts
        h0, t0 = dict(hits), time.monotonic()
        await asyncio.sleep(2.0)
        rate = (hits["idle"] - h0["idle"]) / (time.monotonic() - t0)
        assert 5 < rate < 30, rate  # one poller at ~20/s (two would be ~40/s)
    finally:
        await stop_all(p, runners)
    if shm:
        assert not [f for f in set(os.listdir(shm)) - before if f.startswith("epp-workers-")]


async def vllm_pages(n: int):  # type: ignore[no-untyped-def]
    """`n` loopback servers of a vLLM metrics page: (runners, addresses)."""
    from aiohttp import web

    from tests.integration.test_scheduling_live import vllm_page

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=vllm_page(), content_type="text/plain")

    def app() -> web.Application:
        a = web.Application()
        a.router.add_get("/metrics", metrics)
        return a

    return await serve_pages([app() for _ in range(n)])


def two_worker_picker(addrs: list[str], config: str) -> tuple[subprocess.Popen[bytes], int, int]:
    """`python -m epp --workers 2` over static `addrs` with `config`: (process, ext_proc port, health port)."""
    port, hport = free_ports(2)
    p = subprocess.Popen([sys.executable, "-m", "epp", "--workers", "2", "--pool-name", "p",
                          "--endpoints", ",".join(addrs), "--grpc-port", str(port), "--grpc-health-port", str(hport),
                          "--metrics-port", "0", "--bind-address", "127.0.0.1", "--secure-serving=false",
                          "--log-format", "text", "--config-text", config, "--drain-timeout", "0s",
                          "--shutdown-grace", "1s"],
                         stderr=subprocess.DEVNULL)
    return p, port, hport


PREFIX_ONLY = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 1}
  - {pluginRef: max-score-picker}
"""


async def test_two_workers_keep_one_prefix_placement():
    """A prefix routed by one worker is followed by both: what a worker's prefix index learns reaches
    the other within milliseconds (epp.peers notes over the share's ipc:// sockets), so N workers
    place a shared prompt as one picker does. Without it the other worker's first request of the
    prefix is cold there and, in this profile (prefix affinity alone), goes to a pod at random."""
    runners, addrs = await vllm_pages(4)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    before = set(os.listdir(shm)) if shm else set()
    p, port, hport = two_worker_picker(addrs, PREFIX_ONLY)
    try:
        await wait_serving(hport)
        kids = await two_workers(p.pid)
        await asyncio.sleep(1.5)  # both listening, pages scraped, the siblings' sockets connected
        cpu0 = {k: loop_ns(k) for k in kids}
        for round_ in range(5):
            system = f"round {round_}: you answer questions about the attached manual. " * 60
            first = await route_once(port, system + "first question")
            await asyncio.sleep(0.3)
            # each on a new connection, which the kernel gives to either worker
            later = [await route_once(port, system + f"question {i}") for i in range(40)]
            assert set(later) == {first}, (round_, first, later)
        # both workers served (their serving loops ran; the kernel spreads the new connections)
        assert all(loop_ns(k) - cpu0[k] > 20_000_000 for k in kids), {k: loop_ns(k) - cpu0[k] for k in kids}
    finally:
        await stop_all(p, runners)
    if shm:  # neither the share nor the workers' sockets are left behind
        assert not [f for f in set(os.listdir(shm)) - before if f.startswith("epp-workers-")]


BACKLOG_ONLY = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: prefill-backlog-scorer
  parameters: {tokensPerSecond: 1000}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 0.001}
  - {pluginRef: prefill-backlog-scorer, weight: 1}
  - {pluginRef: max-score-picker}
"""


async def test_two_workers_count_each_others_prefills():
    """The prefill-backlog scorer's clocks cross the workers (their shared memory): a long cold prompt
    held in flight keeps its pod busy for ~6 s on either worker's clock, so every later request goes
    to the other pod whichever worker takes its connection. With per-worker clocks the worker that
    did not route the long prompt would see two idle pods and tie at random."""
    runners, addrs = await vllm_pages(2)
    p, port, hport = two_worker_picker(addrs, BACKLOG_ONLY)
    try:
        await wait_serving(hport)
        kids = await two_workers(p.pid)
        await asyncio.sleep(1.5)  # both listening, pages scraped
        cpu0 = {k: loop_ns(k) for k in kids}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            call = ep_grpc.ExternalProcessorStub(ch).Process()
            for m in [request_headers(), *body_chunks(chat("m", "a long cold document. " * 1100))]:
                await call.write(m)
            busy = None
            async for r in call:  # up to the reply that carries the destination
                busy = set_headers(r).get("x-gateway-destination-endpoint")
                if busy:
                    break
            assert busy in addrs
            # each on a new connection, which either worker may take; each finishes at once
            later = [await route_once(port, f"short {i}") for i in range(12)]
            await call.done_writing()
        assert busy not in later, (busy, later)
        assert all(loop_ns(k) - cpu0[k] > 0 for k in kids)
    finally:
        await stop_all(p, runners)

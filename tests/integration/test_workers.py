"""`--workers N`: N picker processes on one ext_proc port (SO_REUSEPORT), started and stopped by
`python -m epp` as a real process; the kernel spreads connections over them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from epp.cli import cpu_limit, parse_args
from tests.extproc_client import body_chunks, chat, request_headers, set_headers
from tests.procs import free_port, wait_serving

EPS = "10.0.0.1:8000,10.0.0.2:8000"
_TICK = os.sysconf("SC_CLK_TCK")


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


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def route_once(port: int) -> str:
    """One routed request on a new connection (the kernel picks the worker per connection)."""
    # a local subchannel pool: channels in one process would share one connection otherwise
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        call = ep_grpc.ExternalProcessorStub(ch).Process()
        for m in [request_headers(), *body_chunks(chat("m", "hi"))]:
            await call.write(m)
        await call.done_writing()
        replies = [r async for r in call]
    return set_headers(replies[0])["x-gateway-destination-endpoint"]


def test_flags():
    assert parse_args(["--pool-name", "p"]).workers == 1
    assert parse_args(["--pool-name", "p", "--workers", "auto"]).workers == cpu_limit() >= 1
    with pytest.raises(SystemExit):
        parse_args(["--pool-name", "p", "--workers", "2", "--grpc-port", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--pool-name", "p", "--workers", "2", "--ha-enable-leader-election"])


async def test_two_workers_share_the_port_and_stop_together():
    port, hport = free_port(), free_port()
    p = subprocess.Popen([sys.executable, "-m", "epp", "--workers", "2", "--pool-name", "p", "--endpoints", EPS,
                          "--grpc-port", str(port), "--grpc-health-port", str(hport), "--metrics-port", "0",
                          "--bind-address", "127.0.0.1", "--secure-serving=false", "--log-format", "text",
                          "--drain-timeout", "0s", "--shutdown-grace", "1s"], stderr=subprocess.DEVNULL)
    try:
        await wait_serving(hport)
        for _ in range(100):  # both workers up (bounded)
            kids = children(p.pid)
            if len(kids) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(kids) == 2
        await asyncio.sleep(1.0)  # both listening (the first may be ready before the second)
        before = {k: cpu_ticks(k) for k in kids}
        routed = await asyncio.gather(*(route_once(port) for _ in range(120)))
        assert set(routed) <= set(EPS.split(","))
        used = {k: cpu_ticks(k) - before[k] for k in kids}
        assert all(v > 0 for v in used.values()), used  # connections reached both workers
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
    port, hport = free_port(), free_port()
    p = subprocess.Popen([sys.executable, "-m", "epp", "--workers", "2", "--pool-name", "p", "--endpoints", EPS,
                          "--grpc-port", str(port), "--grpc-health-port", str(hport), "--metrics-port", "0",
                          "--bind-address", "127.0.0.1", "--secure-serving=false", "--drain-timeout", "0s",
                          "--shutdown-grace", "1s"], stderr=subprocess.DEVNULL)
    kids: list[int] = []
    try:
        await wait_serving(hport)
        for _ in range(100):
            kids = children(p.pid)
            if len(kids) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(kids) == 2
    finally:
        p.kill()  # SIGKILL: no chance to pass anything on
        p.wait(timeout=10)
    for _ in range(100):  # bounded: the kernel sends each worker SIGTERM (PR_SET_PDEATHSIG)
        if not [k for k in kids if alive(k)]:
            break
        await asyncio.sleep(0.1)
    assert not [k for k in kids if alive(k)]

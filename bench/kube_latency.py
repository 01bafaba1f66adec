"""Kubernetes source: event-to-routing latency, and memory/CPU with a large namespace.

The API-server emulator (tests/sources/apiserver.py) runs in a child process so this process only
pays for the picker's side (client threads + event loop); both use CLOCK_MONOTONIC, so the child's
"event written to the watch stream" timestamp and this process's "endpoint removed from the
Datastore" timestamp are on one clock.

1. latency: a pool pod turns NotReady (the emulator writes the MODIFIED event on the pod watch) →
   the endpoint leaves Datastore.endpoints. p50/p99/max over N trials (goal: ≤ 100 ms).
2. scale: 1,000 pods in the namespace, 200 of them in the pool (server-side label selector):
   RSS growth and CPU for start + initial list, then for a burst of updates (every pool pod: two
   annotation changes, NotReady, Ready; plus one update of every non-pool pod, which the server's
   selector filters out).
3. failover: two LeaderElectors; the leader dies without releasing the Lease (a crash) → time from
   its last successful renewal to the follower leading, over several trials, against the lease
   duration (scaled-down timings: lease 3 s, renew deadline 2 s, retry 0.5 s).
Prints figures; asserts nothing.
usage: python bench/kube_latency.py [--trials 50] [--pods 1000] [--pool 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEL = {"app": "vllm"}
OTHER = {"app": "batch"}


# ---- child: the emulator, driven over stdin/stdout ----------------------------------------------
def serve() -> None:
    from tests.sources.apiserver import ApiServer, pod, pool_v1

    api = ApiServer()
    sent: dict[tuple[str, str], int] = {}  # (pod name, resourceVersion) -> monotonic ns written
    cond = threading.Condition()

    def on_sent(typ: str, obj: dict[str, Any], _t: float) -> None:
        if obj.get("kind") == "Pod":
            md = obj["metadata"]
            with cond:
                sent[(md["name"], md["resourceVersion"])] = time.monotonic_ns()
                cond.notify_all()

    api.on_sent = on_sent
    api.start()
    print(json.dumps({"url": api.url, "token": api.token}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        reply: dict[str, Any] = {}
        if cmd["cmd"] == "populate":
            api.create(pool_v1("pool", SEL, [8000]))
            for i in range(cmd["total"]):
                labels = SEL if i < cmd["pool"] else OTHER
                api.create(pod(f"pod-{i}", f"10.1.{i >> 8}.{i & 255}", labels))
        elif cmd["cmd"] == "ready":
            obj = api.set_pod_ready(cmd["name"], cmd["ready"])
            key = (cmd["name"], obj["metadata"]["resourceVersion"])
            with cond:
                cond.wait_for(lambda key=key: key in sent, timeout=10)
                reply["sent_ns"] = sent.pop(key, None)
        elif cmd["cmd"] == "burst":
            for i in range(cmd["pool"]):
                name = f"pod-{i}"
                for k in range(2):
                    api.patch("v1", "Pod", name, {"metadata": {"annotations": {"bench/seq": str(k)}}})
                api.set_pod_ready(name, False)
                api.set_pod_ready(name, True)
            for i in range(cmd["pool"], cmd["total"]):
                api.patch("v1", "Pod", f"pod-{i}", {"metadata": {"annotations": {"bench/seq": "1"}}})
            with cond:
                sent.clear()
        elif cmd["cmd"] == "quit":
            break
        print(json.dumps(reply), flush=True)
    api.stop()


# ---- parent: the picker side --------------------------------------------------------------------
def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


class Child:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("emulator child exited")
        data: dict[str, Any] = json.loads(line)
        return data

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    async def acall(self, **cmd: Any) -> dict[str, Any]:
        return await asyncio.to_thread(self.call, **cmd)

    def close(self) -> None:
        try:
            self.call(cmd="quit")
        except Exception:
            pass
        self.proc.terminate()
        self.proc.wait(timeout=10)


def kubeconfig(info: dict[str, Any], path: Path) -> str:
    import yaml

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "bench",
        "clusters": [{"name": "bench", "cluster": {"server": info["url"]}}],
        "users": [{"name": "bench", "user": {"token": info["token"]}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}],
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


async def until(pred: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.0005)


async def main(args: argparse.Namespace) -> None:
    from epp.datastore import Datastore
    from epp.sources.kube import KubeSource
    from epp.sources.kube_watch import WatchTiming

    child = Child()
    tmp = Path(tempfile.mkdtemp())
    kc = kubeconfig(child.info, tmp / "kubeconfig")
    timing = WatchTiming(watch_timeout=60)
    try:
        # warm-up against an empty namespace: client imports and first-call setup are not per-pod costs
        warm = KubeSource(Datastore("pool", "warm"), pool_name="pool", namespace="warm", kubeconfig=kc, timing=timing)
        await warm.start()
        await warm.wait_synced(30)
        await warm.stop()

        await child.acall(cmd="populate", total=args.pods, pool=args.pool)
        ds = Datastore("pool", "default")
        removed_at: dict[str, int] = {}
        ds.subscribe(lambda added, removed: removed_at.update({e.pod: time.monotonic_ns() for e in removed}))

        rss0, cpu0, wall0 = rss_kib(), time.process_time(), time.monotonic()
        src = KubeSource(ds, pool_name="pool", namespace="default", kubeconfig=kc, timing=timing)
        await src.start()
        assert await src.wait_synced(60)
        cpu_sync, wall_sync, rss_sync = time.process_time() - cpu0, time.monotonic() - wall0, rss_kib() - rss0
        assert len(ds.endpoints) == args.pool, len(ds.endpoints)

        # 1. NotReady event written → endpoint gone
        lat_ms: list[float] = []
        for t in range(args.trials):
            name = f"pod-{t % args.pool}"
            key = f"default/{name}"
            removed_at.pop(key, None)
            reply = await child.acall(cmd="ready", name=name, ready=False)
            await until(lambda key=key: key in removed_at)
            lat_ms.append((removed_at[key] - reply["sent_ns"]) / 1e6)
            await child.acall(cmd="ready", name=name, ready=True)
            await until(lambda: len(ds.endpoints) == args.pool)

        # 2. a burst of updates
        rss1, cpu1, wall1 = rss_kib(), time.process_time(), time.monotonic()
        removed_at.pop("default/pod-0", None)
        await child.acall(cmd="burst", total=args.pods, pool=args.pool)
        await child.acall(cmd="ready", name="pod-0", ready=False)  # the last event: wait for it
        await until(lambda: "default/pod-0" in removed_at, 60)
        cpu_burst, wall_burst, rss_burst = time.process_time() - cpu1, time.monotonic() - wall1, rss_kib() - rss1
        events = args.pool * 4 + 1
        await src.stop()

        # 3. failover after a crash
        from epp.sources.leader import LeaderElector, LeaseTiming

        timing_l = LeaseTiming(lease_duration=3, renew_deadline=2, retry_period=0.5)
        failover: list[float] = []
        for trial in range(args.failovers):
            lease = f"bench-{trial}"
            a = LeaderElector(namespace="default", name=lease, identity="a", kubeconfig=kc, timing=timing_l)
            b = LeaderElector(namespace="default", name=lease, identity="b", kubeconfig=kc, timing=timing_l)
            await a.start()
            await until(lambda a=a: a.is_leader, 30)
            await b.start()
            await asyncio.sleep(1.0 + trial * 0.37 % 0.5)  # b observes a renewing, at varied phases
            await a.stop(release=False)  # a crash: the Lease still names a
            last = a._last_renew
            await until(lambda b=b: b.is_leader, 30)
            failover.append(time.monotonic() - last)
            await b.stop()
    finally:
        child.close()

    print(f"kube source, {args.pods} pods in the namespace, {args.pool} in the pool (emulator in a child process)")
    print(
        f"  NotReady event → endpoint removed, {len(lat_ms)} trials: p50 {pct(lat_ms, 50):.2f} ms  "
        f"p99 {pct(lat_ms, 99):.2f} ms  max {max(lat_ms):.2f} ms  (goal ≤ 100 ms)"
    )
    print(
        f"  start + initial list/sync: wall {wall_sync * 1000:.0f} ms, CPU {cpu_sync * 1000:.0f} ms, "
        f"RSS +{rss_sync / 1024:.1f} MiB"
    )
    print(
        f"  burst: {events} pool-pod events (+{args.pods - args.pool} non-pool updates filtered by the server): "
        f"wall {wall_burst * 1000:.0f} ms, CPU {cpu_burst * 1000:.0f} ms "
        f"({cpu_burst / events * 1e6:.0f} µs/event), RSS +{rss_burst / 1024:.1f} MiB"
    )
    print(f"  RSS now {rss_kib() / 1024:.1f} MiB (process total, incl. interpreter and kubernetes client)")
    if failover:
        print(f"  failover after a leader crash, {len(failover)} trials: min {min(failover):.2f} s  "
              f"max {max(failover):.2f} s from its last renewal (lease duration 3 s, retry 0.5 s)")


if __name__ == "__main__":
    if "--serve" in sys.argv:
        serve()
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--pool", type=int, default=200)
    ap.add_argument("--failovers", type=int, default=5)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    asyncio.run(main(ap.parse_args()))

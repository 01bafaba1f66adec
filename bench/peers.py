"""Live peer benchmark: our picker behind Envoy against SGLang's and vLLM's Rust routers, same servers.

    .venv/bin/python bench/peers.py --quick        # < 3 min: 3 workloads at 90%, cache-aware peers, 1 repeat
    .venv/bin/python bench/peers.py                # `make bench-peers`: ours and the cache-aware peers on
                                                   # every workload, 30 s cells, 2 repeats: ~45 min here
    options: --workloads shared-prefix ...  --loads 70 90  --policies ours envoy-rr ...  --repeats 2
             --seconds 30  --warmup 2  --config-text NAME=YAML|@FILE  --variant NAME (our picker with another
             profile as policy ours:NAME; repeatable)
             --json PATH  --markdown PATH  --no-plots  --report PATH (tables of a saved run)
             --request-log PATH (one JSON line per request sent: group, pod, TTFT; for diagnosis)
             --des-variants (our profile variants on the same workloads in the discrete-event twin)
             --des-live SEEDS (the live cells' own short schedule in the twin, over SEEDS seeds)
             --replay LOG (a --request-log's cells in the twin with the logged pods: does the twin match?)

Every cell (workload x load x policy x repeat) gets fresh processes: 4 simulated vLLM servers
(`python -m epp.sim`, Llama-3.1-8B on one H100 in real time, 4096 KV blocks = 65,536 tokens each, as
`make demo` runs them) and the router under test:

  ours            Envoy + our picker, the config `python -m epp envoy-config` generates (epp.demo.Stack:
                  its default processing profile, ext_proc over TLS, ORIGINAL_DST), the default scheduling
                  profile unless --config-text;
  envoy-rr        the same Envoy with the picker taken out (STATIC cluster, ROUND_ROBIN);
  sglang-cache    `python -m sglang_router.launch_router --policy cache_aware` (defaults: cache_threshold 0.3,
                  balance_abs_threshold 64, balance_rel_threshold 1.5: character radix tree over the text);
  sglang-rr       the same router, --policy round_robin;
  vllm-cache      `vllm-router --policy cache_aware` (same thresholds; its tree is over token ids it gets
                  from each request's /v1/{chat/}completions/render call to a server);
  vllm-rr         the same router, --policy round_robin.

Load: open-loop arrivals (times fixed in advance by the workload's generator, Poisson unless the
workload is bursty or multi-turn) at 70% / 90% of round-robin capacity. Capacity is measured in the
discrete-event twin of the same servers and workload (bench/routing_quality.capacity: the highest rate
round-robin keeps up with, within 10%), because a live search would cost more than the whole run;
it is cached in bench/results/peers_capacity.json (--recompute-capacity). Every request is a
streaming chat completion (`stream_options.include_usage`); a warm-up of --warmup seconds at half
the rate comes first and is left out.

Figures per cell, over the measured requests: TTFT p50/p90/p99 (client: to the first content
chunk), e2e p50/p90/p99, output tokens/s, prefix-cache hit rate (vllm:prefix_cache_hits_total /
queries_total deltas from the simulators' /metrics), per-pod spread (requests each simulator served:
coefficient of variation), errors, CPU per request of the router's processes (the CPU clocks of
the router's process group, bench/cpuclock.py, Envoy included for ours and envoy-rr, less the idle
rate measured for 1 s after the traffic) and /proc/loadavg at the start and the end (the machine is
shared: the noise is stated with every figure). Repeats are interleaved (policy order rotates per
repeat); tables show medians over repeats and the spread of p90 TTFT ((max - min) / median).

LoRA: the servers all serve the same 8 adapters (2 GPU slots each); our picker routes by adapter
residency, the peers route the text only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import math
import os
import shlex
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpuclock  # noqa: E402

from epp.demo import Child, Stack, spawn, stop_child, wait_for_line  # noqa: E402
from epp.sim.config import DEFAULT_MODEL, EngineConfig  # noqa: E402
from epp.sim.des import SimRequest  # noqa: E402
from epp.sim.workload import bursty, long_context, lora_mix, multi_turn, poisson, shared_prefix  # noqa: E402

PODS = 4
KV_BLOCKS = 4096  # 65,536 tokens per server (epp.demo's): the shared prompts do not fit on every pod
ADAPTERS = tuple(f"adapter-{i:02d}" for i in range(8))
MAX_LORAS = 2
RESULTS = ROOT / "bench" / "results"
PLOTS = ROOT / "bench" / "plots"
CAPACITY_FILE = RESULTS / "peers_capacity.json"
POLICY_ORDER = ("ours", "envoy-rr", "sglang-cache", "sglang-rr", "vllm-cache", "vllm-rr")
# our picker as active-active replicas behind the one Envoy, without and with --ha-peers (not in the default run)
REPLICA_POLICIES = ("ours-x2", "ours-x2-peers", "ours-x4", "ours-x4-peers")
WORKER_POLICIES = ("ours-w2",)  # one picker run with --workers 2 (its CPU counts every worker: one group)
CACHE_AWARE = ("ours", "sglang-cache", "vllm-cache")
IDLE_S = 1.0  # idle CPU is measured over this long before the traffic

Stream = Iterator[tuple[float, SimRequest]]


# ---- workloads ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LiveWorkload:
    """A request mix for 4 live servers: `make(n, rate, seed)` yields (arrival s, SimRequest)."""

    name: str
    note: str
    adapters: tuple[str, ...] = ()

    def make(self, n: int, rate: float, seed: int) -> Stream:
        return _STREAMS[self.name](n, rate, seed)

    def engine(self) -> EngineConfig:
        return EngineConfig(num_gpu_blocks=KV_BLOCKS, loras=self.adapters, max_loras=MAX_LORAS)


def _mixed(n: int, rate: float, seed: int) -> Stream:
    # 70% chat over 48 shared system prompts (~144k tokens together), 30% unrelated prompts, merged by time
    a = shared_prefix(n, rate * 0.7, groups=48, prefix_chars=12000, suffix_chars=800, max_tokens=64, seed=seed)
    b = poisson(n, rate * 0.3, prompt_chars=6000, max_tokens=64, seed=seed + 7)
    merged = heapq.merge(a, b, key=lambda item: item[0])
    for i, (t, req) in enumerate(merged):
        if i >= n:
            return
        req.request_id = f"req-{i}"
        yield t, req


_STREAMS = {
    "shared-prefix": lambda n, rate, seed: shared_prefix(n, rate, groups=16, prefix_chars=24000, suffix_chars=1200,
                                                         max_tokens=64, zipf=1.0, seed=seed),
    "multi-turn": lambda n, rate, seed: multi_turn(n, rate, systems=16, system_chars=8000, zipf=1.0,
                                                   user_chars=(200, 1600), reply_tokens=(32, 128), turns=6.0,
                                                   think_s=3.0, max_context_chars=60000, seed=seed),
    "mixed": _mixed,
    "long-context": lambda n, rate, seed: long_context(n, rate, long_share=0.02, long_chars=126976,
                                                       short_chars=8192, max_tokens=64, long_max_tokens=128,
                                                       seed=seed),
    "bursty": lambda n, rate, seed: bursty(n, rate, period=4.0, on_fraction=0.25, groups=16, zipf=1.0,
                                           prefix_chars=24000, suffix_chars=4000, max_tokens=64, seed=seed),
    "lora": lambda n, rate, seed: lora_mix(n, rate, adapters=ADAPTERS, zipf=1.0, base_share=0.0,
                                           template_chars=2048, prompt_chars=8000, max_tokens=64, seed=seed),
}

WORKLOADS: tuple[LiveWorkload, ...] = (
    LiveWorkload("shared-prefix", "16 groups, Zipf(1); 6,000-token shared prefix + 300 tokens; 64 output tokens"),
    LiveWorkload("multi-turn", "chats over 16 Zipf(1) system prompts of 2,000 tokens, ~6 turns, 3 s think time; "
                               "each turn repeats the conversation + 50-400 tokens; 32-128 output tokens"),
    LiveWorkload("mixed", "70% chat over 48 shared 3,000-token system prompts (+200 tokens), 30% unrelated "
                          "1,500-token prompts; 64 output tokens"),
    LiveWorkload("long-context", "2% 31,744-token documents (128 output tokens), the rest 2,048-token prompts "
                                 "(64 output tokens); nothing shared"),
    LiveWorkload("bursty", "on/off: all arrivals in the first second of every 4 s; 16 Zipf(1) groups of 6,000 "
                           "tokens + 1,000; 64 output tokens"),
    LiveWorkload("lora", f"{len(ADAPTERS)} adapters, Zipf(1), {MAX_LORAS} GPU slots per server; 512-token "
                         "per-adapter template + 2,000 tokens; 64 output tokens", adapters=ADAPTERS),
)


def workload(name: str) -> LiveWorkload:
    for w in WORKLOADS:
        if w.name == name:
            return w
    raise KeyError(name)


def schedule(w: LiveWorkload, rate: float, seconds: float, warmup: float,
             seed: int) -> list[tuple[float, bool, SimRequest]]:
    """(send time s, measured?, request): the stream's first requests spread over `warmup` seconds
    (half the rate: caches fill without a backlog), then `seconds` of it at `rate`."""
    n_warm = max(1, round(rate * 0.5 * warmup)) if warmup > 0 else 0
    n = max(1, round(rate * seconds))
    items = list(w.make(n_warm + n, rate, seed))
    warm, meas = items[:n_warm], items[n_warm:]
    out = [(t * 2.0, False, req) for t, req in warm]
    base = warm[-1][0] * 2.0 + 1.0 / rate if warm else 0.0
    first = meas[0][0] if meas else 0.0
    out += [(base + t - first, True, req) for t, req in meas]
    return out


# ---- capacity (discrete-event twin) ------------------------------------------------------------------
def des_capacity(w: LiveWorkload, seed: int, n: int = 1500, precision: float = 0.1) -> float:
    """Round-robin's capacity (req/s) on 4 such servers, from bench/routing_quality's search."""
    import routing_quality as rq

    def make(n_: int, rate: float, _servers: int, seed_: int) -> Stream:
        return w.make(n_, rate, seed_)

    twin = rq.Workload(w.name, make, w.note, engine=w.engine())
    cap, _ = rq.capacity(twin, PODS, n, seed, precision)
    return cap


def capacities(names: Sequence[str], seed: int, recompute: bool) -> dict[str, float]:
    cached: dict[str, float] = {}
    if CAPACITY_FILE.exists() and not recompute:
        cached = json.loads(CAPACITY_FILE.read_text()).get("capacity", {})
    missing = [n for n in names if n not in cached]
    for name in missing:
        t0 = time.perf_counter()
        cached[name] = des_capacity(workload(name), seed)
        log(f"capacity {name}: {cached[name]:.1f} req/s (discrete-event twin, {time.perf_counter() - t0:.0f} s)")
    if missing:
        CAPACITY_FILE.parent.mkdir(parents=True, exist_ok=True)
        CAPACITY_FILE.write_text(json.dumps({"seed": seed, "servers": PODS, "kv_blocks": KV_BLOCKS,
                                             "capacity": cached}, indent=1, sort_keys=True))
    return cached


# ---- processes ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sim_args(w: LiveWorkload) -> list[str]:
    args = ["--num-gpu-blocks", str(KV_BLOCKS), "--max-loras", str(MAX_LORAS)]
    if w.adapters:
        args += ["--lora", ",".join(w.adapters)]
    return args


class PickerStack(Stack):
    """epp.demo's stack with every simulator serving the workload's adapters (the demo gives two
    adapters to its last pod only)."""

    adapters: tuple[str, ...] = ()

    async def _start_sim(self, name: str, argv: list[str], loras: tuple[str, ...]) -> Any:
        clean: list[str] = []
        skip = False
        for a in argv:
            if skip:
                skip = False
                continue
            if a == "--lora":
                skip = True
                continue
            clean.append(a)
        if self.adapters:
            clean += ["--lora", ",".join(self.adapters)]
        return await super()._start_sim(name, clean, self.adapters)


@dataclass
class Running:
    """The processes of one cell: the router's URL, the simulators' URLs, and what to measure CPU of."""

    url: str
    sims: list[str]
    router_pids: list[int]
    stop: Any  # async () -> None
    workdir: Path | None = None


async def _wait_http(url: str, child: Child | None, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 1}
    last = ""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while loop.time() < deadline:
            if child is not None and child.proc.returncode is not None:
                raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
            try:
                async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                    if r.status == 200:
                        await r.read()
                        return
                    last = f"{r.status} {(await r.text())[:200]}"
            except (aiohttp.ClientError, TimeoutError) as e:
                last = str(e)
            await asyncio.sleep(0.2)
    raise RuntimeError(f"no request got through {url} in {timeout:g} s (last: {last})")


async def start_sims(w: LiveWorkload, workdir: Path) -> list[Child]:
    py = sys.executable
    children = await asyncio.gather(*(spawn(f"pod-{i}", [py, "-m", "epp.sim", "--host", "127.0.0.1", "--port", "0",
                                                          "--name", f"pod-{i}", "--seed", str(i), *sim_args(w)],
                                            workdir) for i in range(PODS)))
    return list(children)


async def sim_urls(children: Sequence[Child]) -> list[str]:
    import re

    pattern = re.compile(r"SIM READY name=\S+ url=(http://\S+)")
    return [(await wait_for_line(c, pattern, 30)).group(1) for c in children]


def peer_argv(policy: str, port: int, metrics_port: int, workers: Sequence[str]) -> list[str]:
    """The command line of a peer router (see the module docstring)."""
    kind, mode = policy.split("-", 1)
    pol = "cache_aware" if mode == "cache" else "round_robin"
    common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers, "--policy", pol,
              "--prometheus-port", str(metrics_port), "--prometheus-host", "127.0.0.1",
              "--worker-startup-check-interval", "1"]
    if kind == "sglang":
        return [sys.executable, "-m", "sglang_router.launch_router", *common, "--log-level", "warn"]
    script = Path(sys.executable).parent / "vllm-router"
    head = [str(script)] if script.exists() else [sys.executable, "-c",
                                                   "import sys; from vllm_router.launch_router import main; "
                                                   "sys.exit(main())"]
    return [*head, *common, "--log-level", "warning"]


def peer_installed(policy: str) -> bool:
    import importlib.util

    module = "sglang_router" if policy.startswith("sglang") else "vllm_router"
    return importlib.util.find_spec(module) is not None


async def start_cell(policy: str, w: LiveWorkload, picker_config: str = "") -> Running:
    """Start the simulators and the router for one cell; the caller must `await running.stop()`."""
    import tempfile

    if policy in ("ours", "envoy-rr", *REPLICA_POLICIES, *WORKER_POLICIES) or policy.startswith("ours:"):
        replicas = int(policy.split("-")[1][1:]) if policy in REPLICA_POLICIES else 1
        stack = PickerStack(policy="round-robin" if policy == "envoy-rr" else "default", pods=PODS,
                            sim_args=sim_args(w), replicas=replicas, peers=policy.endswith("-peers"),
                            picker_args=[*(["--config-text", picker_config] if picker_config else []),
                                         # --workers needs a fixed port (the last --grpc-port counts)
                                         *(["--grpc-port", str(free_port()), "--workers", "2"]
                                           if policy in WORKER_POLICIES else [])])
        stack.adapters = w.adapters
        try:
            await stack.start()
        except BaseException:
            await stack.stop()
            raise
        pids = [c.proc.pid for c in stack.children if c.name == "envoy" or c.name.startswith("picker")]
        return Running(stack.url, [p.url for p in stack.endpoints], pids, stack.stop, stack.workdir)

    workdir = Path(tempfile.mkdtemp(prefix="epp-peers-"))
    children: list[Child] = []

    async def stop() -> None:
        routers = [c for c in children if not c.name.startswith("pod-")]
        await asyncio.gather(*(stop_child(c, 5.0) for c in routers), return_exceptions=True)
        await asyncio.gather(*(stop_child(c, 2.0) for c in children if c not in routers), return_exceptions=True)

    try:
        children.extend(await start_sims(w, workdir))
        urls = await sim_urls(children)
        port = free_port()
        router = await spawn(policy, peer_argv(policy, port, free_port(), urls), workdir)
        children.append(router)
        url = f"http://127.0.0.1:{port}"
        await _wait_http(url, router)
    except BaseException:
        await stop()
        raise
    return Running(url, urls, [router.proc.pid], stop, workdir)


# ---- CPU ---------------------------------------------------------------------------------------------
def group_cpu(pgids: Sequence[int]) -> float:
    """CPU seconds (user + system) of every live process in the process groups `pgids` (each child
    of the benchmark leads its own group), exact to the nanosecond (bench/cpuclock.py)."""
    return cpuclock.group_cpu(pgids)


def picker_variants(p: argparse.ArgumentParser, specs: Sequence[str]) -> dict[str, list[str]]:
    """`--variant NAME="FLAGS"` values (bench/path_cost.py, bench/e2e_wrk.py) as {"ours:NAME": flags};
    a malformed one is a usage error."""
    out: dict[str, list[str]] = {}
    for v in specs:
        name, sep, flags = v.partition("=")
        if not sep or not name:
            p.error(f"--variant {v!r}: expected NAME=\"FLAGS\"")
        out[f"ours:{name}"] = shlex.split(flags)
    return out


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return math.nan


# ---- the client --------------------------------------------------------------------------------------
@dataclass(slots=True)
class Sent:
    """One request as the client saw it."""

    measured: bool
    status: int = 0
    ttft: float | None = None
    e2e: float = 0.0
    tokens: int = 0
    pod: str = ""
    error: str = ""
    rid: str = ""  # the x-request-id the server answered with (--request-log: joins the server's record)


async def send_chat(session: aiohttp.ClientSession, url: str, req: SimRequest, measured: bool) -> Sent:
    """One streaming chat completion; TTFT is the first content chunk."""
    body = {"model": req.model or DEFAULT_MODEL, "messages": [{"role": "user", "content": req.prompt}],
            "max_tokens": req.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    res = Sent(measured)
    t0 = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body,
                                headers={"x-request-id": req.request_id}) as r:
            res.status = r.status
            res.pod = r.headers.get("x-sim-server", "")
            res.rid = r.headers.get("x-request-id", "")
            if r.status != 200:
                res.error = (await r.text())[:200]
            else:
                async for line in r.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    chunk = json.loads(line[6:])
                    for c in chunk.get("choices") or ():
                        if (c.get("delta") or {}).get("content"):
                            if res.ttft is None:
                                res.ttft = time.perf_counter() - t0
                            res.tokens += 1
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        res.status, res.error = res.status or 599, f"{type(e).__name__}: {e}"[:200]
    res.e2e = time.perf_counter() - t0
    if res.status == 200 and res.ttft is None:
        res.status, res.error = 598, "stream ended without content"
    return res


async def sim_served(session: aiohttp.ClientSession, sims: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Every simulator's served records, by request id."""
    out: dict[str, dict[str, Any]] = {}
    for url in sims:
        async with session.get(f"{url}/sim/served") as r:
            for rec in (await r.json())["served"]:
                out[rec["request_id"]] = rec
    return out


async def sim_counters(session: aiohttp.ClientSession, sims: Sequence[str]) -> list[tuple[float, float, int]]:
    """Per simulator: (prefix-cache hit tokens, queried tokens, requests served so far)."""
    names = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total")
    out = []
    for url in sims:
        values = dict.fromkeys(names, 0.0)
        async with session.get(f"{url}/metrics") as r:
            text = await r.text()
        for line in text.splitlines():
            for n in names:
                if line.startswith(n) and line[len(n)] in " {":
                    values[n] += float(line.rsplit(" ", 1)[1])
        async with session.get(f"{url}/sim/served", params={"since": str(1 << 62)}) as r:
            total = int((await r.json())["total"])
        out.append((values[names[0]], values[names[1]], total))
    return out


REQUEST_LOG: Path | None = None  # --request-log


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _cv(values: Sequence[float]) -> float:
    mean = statistics.fmean(values) if values else 0.0
    return statistics.pstdev(values) / mean if mean > 0 else 0.0


async def run_cell(policy: str, w: LiveWorkload, rate: float, seconds: float, warmup: float, seed: int,
                   picker_config: str = "") -> dict[str, Any]:
    """One cell: fresh processes, warm-up, `seconds` of open-loop traffic at `rate`, figures."""
    plan = schedule(w, rate, seconds, warmup, seed)
    running = await start_cell(policy, w, picker_config)
    load0 = loadavg()
    try:
        results: list[Sent] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=120)) as session:
            loop = asyncio.get_running_loop()
            start = loop.time()
            tasks: list[asyncio.Task[Sent]] = []
            before: list[tuple[float, float, int]] | None = None
            cpu0 = 0.0
            t_measure = 0.0
            for at, measured, req in plan:
                if measured and before is None:
                    delay = at - (loop.time() - start)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    # the warm-up's requests are still draining; counters from here on are the measured window's
                    before = await sim_counters(session, running.sims)
                    cpu0 = group_cpu(running.router_pids)
                    t_measure = loop.time()
                delay = at - (loop.time() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(send_chat(session, running.url, req, measured)))
            sent_for = loop.time() - t_measure
            results = list(await asyncio.gather(*tasks))
            window = loop.time() - t_measure
            cpu = group_cpu(running.router_pids) - cpu0
            after = await sim_counters(session, running.sims)
            # idle after the traffic, not before it: a router may still be busy starting up then
            idle0 = group_cpu(running.router_pids)
            await asyncio.sleep(IDLE_S)
            idle_rate = (group_cpu(running.router_pids) - idle0) / IDLE_S  # CPU s per s with no traffic
            served = await sim_served(session, running.sims) if REQUEST_LOG is not None else {}
        load1 = loadavg()
    finally:
        await running.stop()
        if running.workdir is not None:
            import shutil

            shutil.rmtree(running.workdir, ignore_errors=True)
    measured = [r for r in results if r.measured]
    ok = [r for r in measured if r.status == 200]
    assert before is not None
    hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    queries = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    per_pod = [a[2] - b[2] for a, b in zip(after, before, strict=True)]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    e2e = [r.e2e for r in ok]
    busy_cpu = max(0.0, cpu - idle_rate * window)
    if REQUEST_LOG is not None:  # --request-log: one line per request, for diagnosis
        import hashlib

        with REQUEST_LOG.open("a") as f:
            for (at, _, req), r in zip(plan, results, strict=True):
                group = hashlib.md5(req.prompt[:300].encode("utf-8", "surrogatepass")).hexdigest()[:6]
                f.write(json.dumps({"workload": w.name, "rate": rate, "policy": policy, "seed": seed,
                                    "warmup": warmup, "id": req.request_id, "at": at,
                                    "measured": r.measured, "group": group, "chars": len(req.prompt),
                                    "pod": r.pod, "status": r.status, "ttft": r.ttft, "e2e": r.e2e,
                                    # the engine's own (simulated) TTFT and queue time: wall - sim = the
                                    # path's hop plus any time the machine kept the server waiting
                                    "sim_ttft": served.get(r.rid, {}).get("ttft"),
                                    "sim_queue": served.get(r.rid, {}).get("queue")}) + "\n")
    return {
        "policy": policy, "workload": w.name, "rate": rate, "seconds": seconds, "sent_rate": len(measured) / sent_for
        if sent_for > 0 else 0.0, "requests": len(measured), "ok": len(ok),
        "errors": len(measured) - len(ok), "error_samples": sorted({r.error for r in measured if r.error})[:3],
        "ttft_p50": _pct(ttft, 0.5), "ttft_p90": _pct(ttft, 0.9), "ttft_p99": _pct(ttft, 0.99),
        "e2e_p50": _pct(e2e, 0.5), "e2e_p90": _pct(e2e, 0.9), "e2e_p99": _pct(e2e, 0.99),
        "output_tok_s": sum(r.tokens for r in ok) / window if window > 0 else 0.0,
        "hit_rate": hits / queries if queries else 0.0,
        "per_pod": per_pod, "pod_cv": _cv([float(p) for p in per_pod]),
        "cpu_ms_per_req": 1000.0 * busy_cpu / len(ok) if ok else math.nan,
        "cpu_idle_pct": 100.0 * idle_rate, "loadavg": [load0, load1],
    }


# ---- the matrix ------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Plan:
    workloads: list[str]
    loads: list[int]
    policies: list[str]
    repeats: int
    seconds: float
    warmup: float
    seed: int
    configs: dict[str, str] = field(default_factory=dict)  # extra "ours:NAME" policies -> picker config


async def run_matrix(plan: Plan, caps: dict[str, float], out_json: Path | None) -> dict[str, Any]:
    data: dict[str, Any] = {"plan": asdict(plan), "capacity": {w: caps[w] for w in plan.workloads}, "cells": [],
                            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count()}
    t0 = time.perf_counter()
    policies = list(plan.policies)
    for rep in range(plan.repeats):
        for wname in plan.workloads:
            w = workload(wname)
            for load in plan.loads:
                rate = caps[wname] * load / 100.0
                k = rep % len(policies)  # rotate the order: no policy always runs first (or last)
                for policy in policies[k:] + policies[:k]:
                    cfg = plan.configs.get(policy.split(":", 1)[1], "") if policy.startswith("ours:") else ""
                    try:
                        cell = await run_cell(policy, w, rate, plan.seconds, plan.warmup, plan.seed + rep, cfg)
                    except RuntimeError as e:
                        log(f"{wname} {load}% {policy} rep {rep}: FAILED {e}")
                        cell = {"policy": policy, "workload": wname, "failed": str(e)[:500]}
                    cell.update(load=load, repeat=rep)
                    data["cells"].append(cell)
                    if "failed" not in cell:
                        log(f"{wname} {load}% {policy} rep {rep}: TTFT p50/p90 {cell['ttft_p50'] * 1e3:.0f}/"
                            f"{cell['ttft_p90'] * 1e3:.0f} ms, hit {cell['hit_rate'] * 100:.0f}%, "
                            f"err {cell['errors']}, cpu {cell['cpu_ms_per_req']:.2f} ms/req, load "
                            f"{cell['loadavg'][0]:.1f}-{cell['loadavg'][1]:.1f}")
                    if out_json is not None:  # saved as it goes: an interrupted run keeps its cells
                        out_json.parent.mkdir(parents=True, exist_ok=True)
                        out_json.write_text(json.dumps(data, indent=1))
    data["wall_s"] = time.perf_counter() - t0
    if out_json is not None:
        out_json.write_text(json.dumps(data, indent=1))
    return data


# ---- reporting -------------------------------------------------------------------------------------
KEYS = ("ttft_p50", "ttft_p90", "ttft_p99", "e2e_p50", "e2e_p90", "e2e_p99", "output_tok_s", "hit_rate", "pod_cv",
        "cpu_ms_per_req", "errors")


def aggregate(data: dict[str, Any]) -> dict[tuple[str, int, str], dict[str, float]]:
    """Medians over repeats per (workload, load, policy), plus the p90 TTFT spread and load averages."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for c in data["cells"]:
        if "failed" in c:
            continue
        groups.setdefault((c["workload"], int(c["load"]), c["policy"]), []).append(c)
    out: dict[tuple[str, int, str], dict[str, float]] = {}
    for key, cells in groups.items():
        agg = {k: statistics.median(float(c[k]) for c in cells) for k in KEYS}
        p90 = [c["ttft_p90"] for c in cells]
        agg["spread"] = (max(p90) - min(p90)) / agg["ttft_p90"] if len(p90) > 1 and agg["ttft_p90"] > 0 else math.nan
        agg["repeats"] = float(len(cells))
        agg["load_min"] = min(min(c["loadavg"]) for c in cells)
        agg["load_max"] = max(max(c["loadavg"]) for c in cells)
        agg["requests"] = statistics.median(c["requests"] for c in cells)
        out[key] = agg
    return out


def _ms(v: float) -> str:
    return "–" if math.isnan(v) else f"{v * 1000:.0f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _ordered_policies(names: Sequence[str]) -> list[str]:
    known = [p for p in POLICY_ORDER if p in names]
    return known + sorted(p for p in names if p not in POLICY_ORDER)


def render(data: dict[str, Any]) -> list[str]:
    agg = aggregate(data)
    plan = data["plan"]
    caps = data["capacity"]
    out = [f"Live peer run: {PODS} simulated vLLM servers (real time) per cell, {plan['seconds']:g} s measured after "
           f"{plan['warmup']:g} s warm-up at half the rate, {plan['repeats']} repeat(s) interleaved, seed "
           f"{plan['seed']}; started {data.get('started', '?')}, {data.get('wall_s', 0):.0f} s wall, "
           f"{data.get('cpus', '?')} CPUs shared with other work (load average per row)."]
    rows = [[w, f"{caps[w]:.1f}", *(f"{caps[w] * ld / 100:.1f}" for ld in plan["loads"]), workload(w).note]
            for w in plan["workloads"]]
    out.append("Capacity (round-robin, discrete-event twin) and the rates run (req/s):\n\n"
               + table(["workload", "capacity", *(f"{ld}%" for ld in plan["loads"]), "requests"], rows))
    header = ["policy", "TTFT p50 ms", "p90", "p99", "e2e p50 ms", "p90", "p99", "out tok/s", "hit %", "pod CV",
              "router CPU ms/req", "p90 spread", "errors", "load avg"]
    for wname in plan["workloads"]:
        for load in plan["loads"]:
            names = _ordered_policies([p for (w, ld, p) in agg if w == wname and ld == load])
            if not names:
                continue
            rows = []
            for p in names:
                m = agg[(wname, load, p)]
                rows.append([p, _ms(m["ttft_p50"]), _ms(m["ttft_p90"]), _ms(m["ttft_p99"]), _ms(m["e2e_p50"]),
                             _ms(m["e2e_p90"]), _ms(m["e2e_p99"]), f"{m['output_tok_s']:.0f}",
                             f"{m['hit_rate'] * 100:.1f}", f"{m['pod_cv']:.2f}", f"{m['cpu_ms_per_req']:.2f}",
                             "–" if math.isnan(m["spread"]) else f"{m['spread'] * 100:.0f}%",
                             f"{m['errors']:.0f}", f"{m['load_min']:.1f}–{m['load_max']:.1f}"])
            rate = caps[wname] * load / 100
            out.append(f"**{wname}, {load}% ({rate:.1f} req/s)**\n\n" + table(header, rows))
    # the goal: ours at or below the best peer's p90 TTFT
    rows = []
    for wname in plan["workloads"]:
        for load in plan["loads"]:
            if (wname, load, "ours") not in agg:
                continue
            peers = {p: agg[(wname, load, p)]["ttft_p90"] for p in ("sglang-cache", "vllm-cache")
                     if (wname, load, p) in agg}
            if not peers:
                continue
            best = min(peers, key=lambda p: peers[p])
            ours = agg[(wname, load, "ours")]
            ratio = peers[best] / ours["ttft_p90"]
            rows.append([f"{wname} {load}%", _ms(ours["ttft_p90"]), f"{best} {_ms(peers[best])}", f"{ratio:.2f}×",
                         "–" if math.isnan(ours["spread"]) else f"{ours['spread'] * 100:.0f}%",
                         "met" if ratio >= 1.0 else "**missed**"])
    if rows:
        out.append("Our p90 TTFT against the best cache-aware peer (ratio > 1: ours is lower):\n\n"
                   + table(["cell", "ours p90 ms", "best peer p90 ms", "peer / ours", "our spread", "≤ best peer"],
                           rows))
    return out


def plot(data: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install '.[bench]')", file=sys.stderr)
        return None
    agg = aggregate(data)
    plan = data["plan"]
    loads = plan["loads"]
    wls = plan["workloads"]
    names = _ordered_policies(sorted({p for (_, _, p) in agg}))
    fig, axes = plt.subplots(1, len(loads), figsize=(5.5 * len(loads) + 1, 4.2), squeeze=False)
    width = 0.8 / max(1, len(names))
    for ax, load in zip(axes[0], loads, strict=True):
        for k, p in enumerate(names):
            ys = [agg[(w, load, p)]["ttft_p90"] * 1000 if (w, load, p) in agg else 0.0 for w in wls]
            ax.bar([i + k * width for i in range(len(wls))], ys, width, label=p)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(wls))], wls, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("p90 TTFT (ms, log)")
        ax.set_title(f"{load}% of round-robin capacity")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Live: p90 time to first token, 4 simulated servers (median of repeats)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- variants of our profile ------------------------------------------------------------------------
# The default profile before the second round (commit 9c554a0): every variant below is a change to it,
# as measured in docs/benchmarks.md; `previous-default` runs it unchanged.
PREVIOUS_DEFAULT = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: lora-affinity-scorer
- type: inflight-load-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: lora-affinity-scorer, weight: 3, enabledWhen: poolServesAdapters}
  - {pluginRef: inflight-load-scorer, weight: 1}
  - {pluginRef: max-score-picker}
loadGuard:
  enabled: false
"""


def _default_doc() -> dict[str, Any]:
    import yaml

    doc = yaml.safe_load(PREVIOUS_DEFAULT)
    assert isinstance(doc, dict)
    return doc


def _weights(doc: dict[str, Any]) -> dict[str, Any]:
    return {e["pluginRef"]: e for e in doc["schedulingProfiles"][0]["plugins"]}


def _drop(doc: dict[str, Any], ref: str) -> None:
    doc["plugins"] = [p for p in doc["plugins"] if p["type"] != ref]
    prof = doc["schedulingProfiles"][0]
    prof["plugins"] = [e for e in prof["plugins"] if e["pluginRef"] != ref]


def _v_prefix6(doc: dict[str, Any]) -> None:
    _weights(doc)["prefix-cache-scorer"]["weight"] = 6


def _v_no_kv(doc: dict[str, Any]) -> None:
    _drop(doc, "kv-cache-utilization-scorer")


def _v_own_load(doc: dict[str, Any]) -> None:
    # no scraped signal in the decision: prefix and adapter affinity against our own in-flight counts
    _drop(doc, "kv-cache-utilization-scorer")
    _drop(doc, "queue-scorer")
    _weights(doc)["inflight-load-scorer"]["weight"] = 2


def _prefix_params(doc: dict[str, Any]) -> dict[str, Any]:
    for p in doc["plugins"]:
        if p["type"] == "prefix-cache-scorer":
            return p.setdefault("parameters", {})  # type: ignore[no-any-return]
    raise KeyError("prefix-cache-scorer")


def _v_longmatch(doc: dict[str, Any]) -> None:
    # match up to 1024 blocks (64K characters, where the prompt text is cut) instead of 256
    _prefix_params(doc)["maxPrefixBlocksToMatch"] = 1024


def _v_no_inflight(doc: dict[str, Any]) -> None:
    _drop(doc, "inflight-load-scorer")


def _v_prefix6_long(doc: dict[str, Any]) -> None:
    _v_prefix6(doc)
    _v_longmatch(doc)


def _v_nohit(doc: dict[str, Any], weight: int = 2) -> None:
    # cold requests (no prefix cached anywhere) spread over the pods least recently given one,
    # as the peers send them to the smallest tree; warm requests score alike everywhere
    doc["plugins"].insert(-1, {"type": "no-hit-lru-scorer"})
    doc["schedulingProfiles"][0]["plugins"].insert(-1, {"pluginRef": "no-hit-lru-scorer", "weight": weight})


def _v_best(doc: dict[str, Any]) -> None:
    _v_prefix6(doc)
    _v_longmatch(doc)
    _v_nohit(doc)


def _v_best1(doc: dict[str, Any]) -> None:
    _v_prefix6(doc)
    _v_longmatch(doc)
    _v_nohit(doc, weight=1)


def _v_nohit1(doc: dict[str, Any]) -> None:
    _v_nohit(doc, weight=1)


def _v_long_nohit1(doc: dict[str, Any]) -> None:
    _v_longmatch(doc)
    _v_nohit(doc, weight=1)


def _v_sticky(doc: dict[str, Any], penalty_ms: float = 1000) -> None:
    # hard affinity like the peers' cache-aware policies: keep the pods holding >= 50% of the prompt's
    # prefix unless their in-flight prefill is `penalty_ms` worse than the best other pod's
    doc["plugins"].insert(0, {"type": "prefix-cache-affinity-filter",
                              "parameters": {"affinityThreshold": 0.5, "maxTTFTPenaltyMs": penalty_ms}})
    doc["schedulingProfiles"][0]["plugins"].insert(0, {"pluginRef": "prefix-cache-affinity-filter"})


def _queue_params(doc: dict[str, Any]) -> dict[str, Any]:
    for p in doc["plugins"]:
        if p["type"] == "queue-scorer":
            return p.setdefault("parameters", {})  # type: ignore[no-any-return]
    raise KeyError("queue-scorer")


def _set_weight(doc: dict[str, Any], ref: str, weight: float) -> None:
    _weights(doc)[ref]["weight"] = weight


def _round2(doc: dict[str, Any]) -> None:
    # the second round's changes besides the queue scorer's
    _v_long_nohit1(doc)
    _set_weight(doc, "kv-cache-utilization-scorer", 1)
    _set_weight(doc, "no-hit-lru-scorer", 0.5)


def _sticky_default(penalty_ms: float) -> Callable[[dict[str, Any]], None]:
    # the current default with the hard affinity in front
    def change(doc: dict[str, Any]) -> None:
        _round2(doc)
        _v_sticky(doc, penalty_ms)
    return change


def _v_q(spread: float, live: bool, extra: Callable[[dict[str, Any]], None] | None = None
         ) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        q = _queue_params(doc)
        if spread:
            q["minSpread"] = spread
        if live:
            q["countInflight"] = True
        if extra is not None:
            extra(doc)
    return change


def _round2_default(doc: dict[str, Any]) -> None:
    """The default of the second round (2026-12-02 to 12-03): today's without its prefill-backlog-scorer."""
    import yaml

    from epp.scheduling.config import DEFAULT_CONFIG_TEXT

    doc.clear()
    doc.update(yaml.safe_load(DEFAULT_CONFIG_TEXT))
    _drop(doc, "prefill-backlog-scorer")


def _backlog(weight: float, **params: Any) -> Callable[[dict[str, Any]], None]:
    """The second round's default plus prefill-backlog-scorer at `weight` with `params` (the default
    since 2026-12-04 is backlog-cold; from 2026-12-03 it was backlog1.5-hit50-move4s-idle)."""
    def change(doc: dict[str, Any]) -> None:
        _round2_default(doc)
        entry: dict[str, Any] = {"type": "prefill-backlog-scorer"}
        if params:
            entry["parameters"] = dict(params)
        doc["plugins"].insert(-1, entry)
        doc["schedulingProfiles"][0]["plugins"].insert(-1, {"pluginRef": "prefill-backlog-scorer", "weight": weight})
    return change


VARIANTS = {"prefix6": _v_prefix6, "no-kv": _v_no_kv, "own-load": _v_own_load, "sticky": _v_sticky,
            "longmatch": _v_longmatch, "no-inflight": _v_no_inflight, "prefix6-long": _v_prefix6_long,
            "nohit": _v_nohit, "prefix6-long-nohit": _v_best, "prefix6-long-nohit1": _v_best1,
            "nohit1": _v_nohit1, "long-nohit1": _v_long_nohit1,
            "q4": _v_q(4, False), "q8": _v_q(8, False), "qlive": _v_q(0, True), "q4-live": _v_q(4, True),
            "q8-live": _v_q(8, True), "q8-live-long-nohit1": _v_q(8, True, _v_long_nohit1),
            "q4-live-long-nohit1": _v_q(4, True, _v_long_nohit1),
            "q4-live-noinf": _v_q(4, True, _v_no_inflight), "q2-live": _v_q(2, True),
            "q4-live-noinf-long-nohit1": _v_q(4, True, lambda d: (_v_no_inflight(d), _v_long_nohit1(d))),
            "q4-live-long": _v_q(4, True, _v_longmatch), "q4-live-nohit1": _v_q(4, True, _v_nohit1),
            "q4-live-long-nohit1-p4": _v_q(4, True, lambda d: (_v_long_nohit1(d),
                                                                _set_weight(d, "prefix-cache-scorer", 4))),
            "q4-live-long-nohit1-kv1": _v_q(4, True, lambda d: (_v_long_nohit1(d),
                                                                 _set_weight(d, "kv-cache-utilization-scorer", 1))),
            "q6-live-long-nohit1": _v_q(6, True, _v_long_nohit1),
            # the default since the second round: q4-live-long-nohit1-kv1 with no-hit-lru at half weight
            "new-default": _v_q(4, True, _round2), "spread2-default": _v_q(2, True, _round2),
            "spread3-default": _v_q(3, True, _round2),
            # fewer moves of a warm prefix under a burst: the queue counts fully only from a spread of 8,
            # or the prefix match weighs 4 (issue 18, bursty)
            "spread8-default": _v_q(8, True, _round2), "spread16-default": _v_q(16, True, _round2),
            "p4-default": _v_q(4, True, lambda d: (_round2(d), _set_weight(d, "prefix-cache-scorer", 4))),
            "sticky500": _v_q(4, True, _sticky_default(500)), "sticky1000": _v_q(4, True, _sticky_default(1000)),
            "sticky2000": _v_q(4, True, _sticky_default(2000)),
            "previous-default": lambda d: None,
            "round2-default": _round2_default,  # the default until 2026-12-03 (no prefill-backlog-scorer)
            # prefill-backlog-scorer on the round-2 default (backlog-cold is today's default);
            # ttft2 / own10 = with ownShare 1 / 0.1
            "backlog1": _backlog(1), "backlog2": _backlog(2), "backlog3": _backlog(3),
            "backlog2-scale50ms": _backlog(2, scaleSeconds=0.05), "ttft2": _backlog(2, ownShare=1.0),
            "own10": _backlog(2, ownShare=0.1),
            "backlog2-hit50": _backlog(2, minHit=0.5), "backlog2-hit80": _backlog(2, minHit=0.8),
            "ttft2-hit50": _backlog(2, ownShare=1.0, minHit=0.5), "backlog1-hit50": _backlog(1, minHit=0.5),
            "backlog1.25-hit50": _backlog(1.25, minHit=0.5), "backlog1.5-hit50": _backlog(1.5, minHit=0.5),
            "backlog1.75-hit50": _backlog(1.75, minHit=0.5),
            "backlog2-hit50-scale40ms": _backlog(2, minHit=0.5, scaleSeconds=0.04),
            "backlog2-hit50-move1s": _backlog(2, minHit=0.5, moveEverySeconds=1.0),
            "backlog2-hit50-move4s": _backlog(2, minHit=0.5, moveEverySeconds=4.0),
            "backlog1.5-hit50-move4s": _backlog(1.5, minHit=0.5, moveEverySeconds=4.0),
            "backlog1.5-hit50-move4s-idle": _backlog(1.5, minHit=0.5, moveEverySeconds=4.0, moveToIdleOnly=True),
            "backlog1.5-hit50-idle": _backlog(1.5, minHit=0.5, moveToIdleOnly=True),
            "backlog2-hit50-idle": _backlog(2, minHit=0.5, moveToIdleOnly=True),
            # the default's limits on moving a warm prefix, but cold prompts scored by the backlog too
            # (so a burst's cold prefills go to different pods; issue 18, bursty)
            "backlog1.5-hit0-move4s-idle": _backlog(1.5, moveEverySeconds=4.0, moveToIdleOnly=True),
            # the default since 2026-12-04 (coldPrompts: prompts cached nowhere are scored by the backlog
            # too, a scraped queue counted; backlog1.5-hit50-move4s-idle is the default before it)
            "backlog-cold": _backlog(1.5, minHit=0.5, moveEverySeconds=4.0, moveToIdleOnly=True, coldPrompts=True),
            # the engine twice as fast / half as fast as the scorer's rate assumes (robustness)
            "idle-tps10k": _backlog(1.5, minHit=0.5, moveEverySeconds=4.0, moveToIdleOnly=True,
                                    tokensPerSecond=10000),
            "idle-tps40k": _backlog(1.5, minHit=0.5, moveEverySeconds=4.0, moveToIdleOnly=True,
                                    tokensPerSecond=40000)}


def variant_text(name: str) -> str:
    """The previous default profile with the named change (see VARIANTS), as EndpointPickerConfig YAML."""
    import yaml

    doc = _default_doc()
    VARIANTS[name](doc)
    return yaml.safe_dump(doc, sort_keys=False)


# ---- the peers' cache-aware policy, as a discrete-event policy ------------------------------------------
class CacheAwareTwin:
    """What SGLang's and vLLM's `cache_aware` do, for the discrete-event twin (from their documented
    options, not their code): load = the router's own in-flight count per worker; when
    max - min load > `abs_threshold` and max > `rel_threshold` x min, the least loaded worker; else the
    worker whose tree shares the longest prefix with the request (character-exact; here in
    `grain`-character steps, 4 by default, a token), if that share exceeds `cache_threshold`; else
    the least loaded worker. The chosen worker's tree gets the request's text. Trees are never
    evicted (their eviction runs every 60-120 s against a 32-64M-character budget).

    The cold rule is the installed router's, found by replaying a live cell (`--replay`): its
    placements in the twin give the TTFTs its servers reported (p90 599 against 606 ms, bursty 70%),
    and its cold choices follow the least load, not the smallest tree its older documentation
    describes (`cold="smallest-tree"`, an ablation; the twin of sessions before 2026-12-03's last
    used it, and so gave the peers a worse bursty p90 than they reach live)."""

    def __init__(self, cache_threshold: float = 0.3, abs_threshold: int = 64, rel_threshold: float = 1.5,
                 grain: int = 4, cold: str = "least-load") -> None:
        self.cache_threshold = cache_threshold
        self.cold = cold  # least-load (the installed router) | smallest-tree (its older documentation)
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold
        self.grain = grain
        self._trees: list[set[int]] = []
        self._sizes: list[int] = []

    def _prefixes(self, text: str) -> list[int]:
        import xxhash

        h = 0
        out = []
        g = self.grain
        for i in range(0, len(text) - g + 1, g):
            h = xxhash.xxh3_64_intdigest(text[i:i + g].encode("utf-8", "surrogatepass"), seed=h)
            out.append(h)
        return out

    def choose(self, request: SimRequest, servers: Sequence[Any]) -> int:
        n = len(servers)
        if not self._trees:
            self._trees = [set() for _ in range(n)]
            self._sizes = [0] * n
        text = (request.model or "") + "\x00" + request.prompt
        keys = self._prefixes(text)
        loads = [s.inflight for s in servers]
        hi, lo = max(loads), min(loads)
        if hi - lo > self.abs_threshold and hi > lo * self.rel_threshold:
            pick = loads.index(lo)
        else:
            matched = []
            for tree in self._trees:
                k = 0
                for h in keys:  # prefixes nest: stop at the first one the tree lacks
                    if h not in tree:
                        break
                    k += 1
                matched.append(k)
            best = max(matched)
            if keys and best / len(keys) > self.cache_threshold:
                pick = min((i for i in range(n) if matched[i] == best), key=lambda i: loads[i])
            elif self.cold == "smallest-tree":
                pick = self._sizes.index(min(self._sizes))
            else:
                pick = loads.index(lo)
        tree = self._trees[pick]
        before = len(tree)
        tree.update(keys)
        self._sizes[pick] += (len(tree) - before) * self.grain
        return pick


class GreedyOracle:
    """A reference for the goals, not a router: each request goes to the server where it would get its
    first token soonest, computed from every engine's exact state at that instant (its cache, what it
    runs, what waits there, and what the in-flight prompts will have cached by the time this one is
    admitted). It sees what no router can (the engines' caches without delay, every prefill's
    progress); it is greedy (it does not plan for the requests behind), so it is a strong reference,
    not the optimum."""

    def __init__(self) -> None:
        self._engines: list[Any] = []

    def bind(self, cluster: Any) -> None:
        """Cluster hook: keep the engines (read at every decision)."""
        self._engines = [s.engine for s in cluster.servers]

    @staticmethod
    def _held(eng: Any, hs: Sequence[int]) -> int:
        held = len(eng.kv.match(hs, len(hs))[0]) if hs else 0
        for seq in (*eng.running, *eng.waiting):  # FIFO: an earlier prompt is cached before this one runs
            k = 0
            for a, b in zip(hs, seq.hashes, strict=False):
                if a != b:
                    break
                k += 1
            held = max(held, k)
        return held

    def estimate(self, eng: Any, request: SimRequest) -> float:
        """Seconds until `request` would see its first token on `eng` (prefill ahead of it, then its own)."""
        from epp.sim.tokens import block_hashes, count_tokens

        cfg = eng.cfg
        hs = block_hashes(request.prompt, cfg.block_size, request.model or cfg.model, cfg.chars_per_token)
        own = max(1, count_tokens(request.prompt, cfg.chars_per_token) - self._held(eng, hs) * cfg.block_size)
        ahead = sum(max(0, s.prompt_tokens - s.num_computed) for s in eng.running)
        for s in eng.waiting:  # their cache hits as of now
            ahead += max(1, s.prompt_tokens - len(eng.kv.match(s.hashes, len(s.hashes))[0]) * cfg.block_size)
        work = ahead + own
        steps = -(-work // cfg.max_num_batched_tokens)
        step = cfg.step_base_ms + cfg.decode_ms_per_seq * (len(eng.running) + len(eng.waiting))
        return (steps * step + work * cfg.prefill_ms_per_token) / 1000.0

    def choose(self, request: SimRequest, servers: Sequence[Any]) -> int:
        """The server with the soonest first token; ties to the fewest in flight."""
        return min(range(len(servers)), key=lambda i: (self.estimate(self._engines[i], request), servers[i].inflight))


# ---- discrete-event variants -------------------------------------------------------------------------
def des_variants(names: Sequence[str], loads: Sequence[int], caps: dict[str, float], seed: int, n: int,
                 configs: dict[str, str], ablate: bool = False, oracle: bool = False) -> list[str]:
    """Our default, the reference and each --config-text variant on the live workloads in the
    discrete-event twin (virtual time; no hop, no scrape jitter beyond the twin's 50 ms polling);
    `oracle` adds GreedyOracle, a bound for what routing can reach there."""
    import routing_policies as rp
    import routing_quality as rq

    from epp.scheduling.config import load_config

    specs = [rp.policy("round-robin"), rp.PolicySpec("peers' cache_aware (twin)", lambda _s, _r: CacheAwareTwin()),
             rp.policy("reference"), rp.policy("default")]
    if oracle:
        specs.append(rp.PolicySpec("greedy oracle", lambda _s, _r: GreedyOracle()))
    if ablate:  # which part of the peers' policy matters
        specs[2:2] = [rp.PolicySpec("twin, 64-char grain", lambda _s, _r: CacheAwareTwin(grain=64)),
                      rp.PolicySpec("twin, cold to smallest tree",
                                    lambda _s, _r: CacheAwareTwin(cold="smallest-tree")),
                      rp.PolicySpec("twin, balance at 4", lambda _s, _r: CacheAwareTwin(abs_threshold=4))]
    for name, text in configs.items():
        specs.append(rp.picker_spec(f"ours:{name}", lambda t=text: load_config(t), name))
    rows = []
    for wname in names:
        w = workload(wname)

        def make(n_: int, rate: float, _servers: int, seed_: int, _w: LiveWorkload = w) -> Stream:
            return _w.make(n_, rate, seed_)

        twin = rq.Workload(w.name, make, w.note, engine=w.engine())
        for load in loads:
            rate = caps[wname] * load / 100.0
            row = [f"{wname} {load}%"]
            for spec in specs:
                results, busy, _ = rq.simulate(twin, PODS, rate, n, seed, spec)
                m = rq.measure(results, busy, PODS)
                row.append(f"{m['ttft_p50'] * 1000:.0f} / {m['ttft_p90'] * 1000:.0f} ({m['hit_rate'] * 100:.0f}%)")
            rows.append(row)
            log(f"des {wname} {load}% done")
    return ["Discrete-event twin: TTFT p50 / p90 ms (hit %), " + str(n) + " requests per run\n\n"
            + table(["cell", *(s.name for s in specs)], rows)]


def _twin_cell(w: LiveWorkload, plan: list[tuple[float, bool, SimRequest]], seed: int, policy: Any
               ) -> tuple[list[Any], set[str]]:
    """One live cell's schedule (`schedule`: its short warm-up, then the measured seconds) in the
    discrete-event twin under `policy`: the results and the measured requests' ids."""
    import copy

    from epp.sim.des import Cluster

    cluster = Cluster(PODS, policy, engine=w.engine(), seed=seed, poll_interval=0.05)
    if hasattr(policy, "bind"):
        policy.bind(cluster)
    results = cluster.run(iter([(t, copy.deepcopy(req)) for t, _, req in plan]))
    return results, {req.request_id for _, measured, req in plan if measured}


def _p90_ms(results: Sequence[Any], ids: set[str]) -> float:
    return 1000.0 * _pct(sorted(r.ttft for r in results if r.request_id in ids and r.ok), 0.9)


def des_live(names: Sequence[str], loads: Sequence[int], caps: dict[str, float], seed: int, seeds: int,
             seconds: float, warmup: float, configs: dict[str, str]) -> list[str]:
    """The live cells themselves in the discrete-event twin: the same schedule (a `warmup` of a few
    requests, then `seconds` at the rate), one run per seed. The twin with its long warm-up measures
    the steady state; a 30 s live cell is mostly its first bursts' cold prefills, which this shows.
    Per policy: the mean p90 TTFT over the seeds, and in how many seeds it was at or below the
    peers' twin."""
    import routing_policies as rp

    from epp.scheduling.config import load_config

    specs = [rp.PolicySpec("peers' cache_aware (twin)", lambda _s, _r: CacheAwareTwin()), rp.policy("reference"),
             rp.policy("default")]
    for name, text in configs.items():
        specs.append(rp.picker_spec(f"ours:{name}", lambda t=text: load_config(t), name))
    rows = []
    for wname in names:
        w = workload(wname)
        for load in loads:
            rate = caps[wname] * load / 100.0
            p90s: dict[str, list[float]] = {spec.name: [] for spec in specs}
            for s in range(seed, seed + seeds):
                plan = schedule(w, rate, seconds, warmup, s)
                for spec in specs:
                    results, ids = _twin_cell(w, plan, s, spec.make(s, 1))
                    p90s[spec.name].append(_p90_ms(results, ids))
            peer = p90s[specs[0].name]
            row = [f"{wname} {load}%"]
            for spec in specs:
                v = p90s[spec.name]
                wins = sum(a <= b for a, b in zip(v, peer, strict=True))
                row.append(f"{statistics.fmean(v):.0f}" + ("" if spec is specs[0] else f" ({wins}/{len(v)})"))
            rows.append(row)
            log(f"des-live {wname} {load}% done")
    return [f"Discrete-event twin of the live cells ({warmup:g} s warm-up at half the rate, {seconds:g} s measured, "
            f"seeds {seed}-{seed + seeds - 1}): mean p90 TTFT ms (seeds at or below the peers' twin)\n\n"
            + table(["cell", *(s.name for s in specs)], rows)]


class _Replay:
    """A twin policy that sends each request where a live router sent it (request id -> server)."""

    def __init__(self, pods: dict[str, int]) -> None:
        self.pods = pods

    def choose(self, request: SimRequest, servers: Sequence[Any]) -> int:
        return self.pods[request.request_id]


def replay(path: Path, warmup: float) -> list[str]:
    """Each live cell of a --request-log file replayed in the discrete-event twin with the pods the
    router chose: if the twin's TTFTs match what the servers reported (`sim_ttft`), the twin's
    engines are the live ones, and a policy's twin can be judged by the live router's choices.
    `warmup` is for logs that do not say theirs."""
    cells: dict[tuple[str, str, float, int], list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        cells.setdefault((r["workload"], r["policy"], r["rate"], r["seed"]), []).append(r)
    rows = []
    for (wname, policy, rate, seed), logged in cells.items():
        w = workload(wname)
        measured = [r for r in logged if r["measured"]]
        seconds = len(measured) / rate
        plan = schedule(w, rate, seconds, logged[0].get("warmup", warmup), seed)
        if any("id" not in r for r in logged):
            rows.append([f"{wname} {policy} seed {seed}", "no request ids in the log (an older log)", "", ""])
            continue
        pods = {r["id"]: int(r["pod"].rsplit("-", 1)[1]) for r in logged if r["status"] == 200}
        if {req.request_id for _, _, req in plan} != set(pods):  # another schedule, or requests that failed
            rows.append([f"{wname} {policy} seed {seed}", "schedule differs from the log", "", ""])
            continue

        results, ids = _twin_cell(w, plan, seed, _Replay(pods))
        served = sorted(r["sim_ttft"] for r in measured if r.get("sim_ttft") is not None)
        wall = sorted(r["ttft"] for r in measured if r.get("ttft") is not None)
        rows.append([f"{wname} {policy} seed {seed}", f"{_p90_ms(results, ids):.0f}",
                     f"{1000 * _pct(served, 0.9):.0f}" if served else "–", f"{1000 * _pct(wall, 0.9):.0f}"])
    return ["Live cells replayed in the twin (the logged pods): p90 TTFT ms\n\n"
            + table(["cell", "twin, same placements", "servers' own (sim_ttft)", "client"], rows)]


def routing_quality_check(variants: dict[str, str], loads: Sequence[int], servers: int, n: int,
                          seed: int) -> list[str]:
    """The variants on bench/routing_quality.py's own workloads (its servers: 500k-token caches),
    against its reference and default profiles and the peers' twin: p90 TTFT, ms."""
    import routing_policies as rp
    import routing_quality as rq

    from epp.scheduling.config import load_config

    specs = [rp.PolicySpec("peers' cache_aware (twin)", lambda _s, _r: CacheAwareTwin()), rp.policy("reference"),
             rp.policy("default")]
    for name, text in variants.items():
        specs.append(rp.picker_spec(f"ours:{name}", lambda t=text: load_config(t), name))
    rows = []
    for w in rq.WORKLOADS:
        cap, _ = rq.capacity(w, servers, n, seed, 0.1)
        for load in loads:
            row = [f"{w.name} {load}%"]
            for spec in specs:
                results, busy, _ = rq.simulate(w, servers, cap * load / 100.0, n, seed, spec)
                m = rq.measure(results, busy, servers)
                row.append(f"{m['ttft_p50'] * 1000:.0f} / {m['ttft_p90'] * 1000:.0f}")
            rows.append(row)
            log(f"routing-quality {w.name} {load}% done")
    return [f"bench/routing_quality.py workloads, {servers} servers, {n} requests, seed {seed}: TTFT p50 / p90 ms\n\n"
            + table(["cell", *(s.name for s in specs)], rows)]


# ---- main --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="< 3 min: 3 workloads at 90%%, cache-aware peers, 1 repeat")
    ap.add_argument("--workloads", nargs="*", choices=[w.name for w in WORKLOADS])
    ap.add_argument("--loads", type=int, nargs="*")
    ap.add_argument("--policies", nargs="*",
                    help=f"from {', '.join(POLICY_ORDER + REPLICA_POLICIES + WORKER_POLICIES)} and ours:NAME "
                         "(--config-text)")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--seconds", type=float, help="measured seconds per cell")
    ap.add_argument("--warmup", type=float, help="warm-up seconds per cell (half the rate)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--config-text", action="append", default=[], metavar="NAME=YAML",
                    help="also run our picker with this EndpointPickerConfig as policy ours:NAME")
    ap.add_argument("--variant", action="append", default=[], choices=sorted(VARIANTS),
                    help="also run our picker with this built-in change to the default profile (ours:NAME)")
    ap.add_argument("--recompute-capacity", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--request-log", type=Path, help="append one JSON line per request sent (live cells)")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--report", type=Path, help="no runs: the tables (and plot) of a saved --json file")
    ap.add_argument("--des-variants", action="store_true", help="discrete-event twin only: our profile variants")
    ap.add_argument("--des-requests", type=int, default=1500)
    ap.add_argument("--routing-quality", action="store_true",
                    help="discrete-event only: the --variant profiles on bench/routing_quality.py's workloads")
    ap.add_argument("--twin-ablation", action="store_true", help="with --des-variants: parts of the peers' policy")
    ap.add_argument("--oracle", action="store_true",
                    help="with --des-variants: a greedy full-knowledge oracle (what routing could reach at best)")
    ap.add_argument("--des-live", type=int, default=0, metavar="SEEDS",
                    help="discrete-event only: the live cells' own schedule (--warmup, --seconds) over SEEDS seeds "
                         "from --seed, ours and its --variant profiles against the peers' twin")
    ap.add_argument("--replay", type=Path, metavar="LOG",
                    help="no runs: replay a --request-log file's cells in the twin with the logged pods")
    args = ap.parse_args(argv)

    configs: dict[str, str] = {}
    for item in args.config_text:
        name, sep, text = item.partition("=")
        if not sep or not name or not text.strip():
            ap.error("--config-text takes NAME=YAML")
        if text.startswith("@"):
            text = Path(text[1:]).read_text()
        configs[name] = text
    for name in args.variant:
        configs[name] = variant_text(name)
    if args.quick:
        wls, loads, repeats, seconds, warmup = ["shared-prefix", "multi-turn", "mixed"], [90], 1, 6.0, 2.0
        policies = ["ours", "envoy-rr", "sglang-cache", "vllm-cache"]
    else:
        # 30 s cells: in 6 s a shared-prefix cell's p90 was decided by where a few cold prefills
        # landed (docs/benchmarks.md); the round-robin baselines on request (--policies)
        wls, loads, repeats, seconds, warmup = [w.name for w in WORKLOADS], [70, 90], 2, 30.0, 2.0
        policies = list(CACHE_AWARE)
    wls = args.workloads or wls
    loads = args.loads or loads
    policies = args.policies or [*policies, *(f"ours:{n}" for n in configs)]
    for p in policies:
        if p not in POLICY_ORDER + REPLICA_POLICIES + WORKER_POLICIES and not (
                p.startswith("ours:") and p[5:] in configs):
            ap.error(f"unknown policy {p!r}")
    missing = [p for p in policies if p.split("-")[0] in ("sglang", "vllm") and not peer_installed(p)]
    if missing:
        log(f"not installed, left out: {', '.join(missing)} (pip install '.[bench]')")
        policies = [p for p in policies if p not in missing]
    global REQUEST_LOG
    REQUEST_LOG = args.request_log
    stem = "peers_quick" if args.quick else "peers"
    out_json = args.json or RESULTS / f"{stem}.json"
    out_md = args.markdown or RESULTS / f"{stem}.md"

    if args.routing_quality:
        parts = routing_quality_check(configs, args.loads or [85, 95], 8, args.des_requests, args.seed)
        text = "\n\n".join(parts) + "\n"
        print(text)
        if args.markdown:
            args.markdown.write_text(text)
        return 0
    if args.replay or args.des_live:
        if args.replay:
            parts = replay(args.replay, args.warmup if args.warmup is not None else warmup)
        else:
            parts = des_live(wls, loads, capacities(wls, args.seed, args.recompute_capacity), args.seed,
                             args.des_live, args.seconds or seconds, args.warmup if args.warmup is not None else warmup,
                             configs)
        text = "\n\n".join(parts) + "\n"
        print(text)
        if args.markdown:
            args.markdown.write_text(text)
        return 0
    if args.report:
        data = json.loads(args.report.read_text())
    else:
        caps = capacities(wls, args.seed, args.recompute_capacity)
        if args.des_variants:
            parts = des_variants(wls, loads, caps, args.seed, args.des_requests, configs, args.twin_ablation,
                                 args.oracle)
            text = "\n\n".join(parts) + "\n"
            print(text)
            if args.markdown:
                args.markdown.write_text(text)
            return 0
        plan = Plan(wls, loads, policies, args.repeats or repeats, args.seconds or seconds,
                    args.warmup if args.warmup is not None else warmup, args.seed, configs)
        data = asyncio.run(run_matrix(plan, caps, out_json))
    parts = render(data)
    text = "\n\n".join(parts) + "\n"
    print(text)
    if not args.report or args.markdown:
        out_md.parent.mkdir(parents=True, exist_ok=True)
        out_md.write_text(text)
    if not args.no_plots:
        path = plot(data, args.plot or PLOTS / f"{stem}.png")
        if path is not None:
            print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    failed = [c for c in data["cells"] if "failed" in c]
    return 1 if failed and len(failed) == len(data["cells"]) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

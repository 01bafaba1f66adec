"""Precise prefix-cache routing (engine KV events) against the approximate index and an oracle.

    .venv/bin/python bench/precise_prefix.py --quick        # 8 servers, a few minutes
    .venv/bin/python bench/precise_prefix.py                # more requests per run
    options: --workloads multi-tenant multi-turn-long shared-prefix multi-turn  --requests N
             --delay SECONDS (KV event delivery, default 0.01)  --seed S  --no-plots  --replicas 1 2 4

Discrete-event simulator (epp.sim.des), virtual time, deterministic per seed; the same workload is
replayed against every policy on identical clusters (metrics polled every 50 ms). Policies:
- random; load-only (our default profile without prefix affinity); reference (GIE's default
  profile, approximate index, auto-tuned to each pod's `num_gpu_blocks` as GIE v1.5 does);
  `reference, LRU 31250` (the same with llm-d's deploy configs' index: `autoTune: false`,
  `lruCapacityPerServer: 31250`, more than 3× a simulated pod's cache); default (our default
  profile, approximate index);
- precise: our default profile with `precise-prefix-cache-scorer` in place of the approximate
  prefix scorer: every server publishes its KV events in vLLM's wire format (epp.sim.kvevents),
  delivered `--delay` virtual seconds after each engine step and decoded into each picker replica's
  own index (every replica hears every event); token ids from the sim's tokenizer; speculative
  entries on (TTL 2 s from the pick, llm-d's lifetime); `precise, held in flight` the same with
  `speculativeHoldInFlight: true` (entries held while their request is in flight, until the
  endpoint's BlockStored for the block or the request's finish, then the TTL);
- oracle: the same profile, prefix score read from the engines' caches directly at decision time;
  `oracle, in flight` also counts every prompt waiting or running on an engine as cached there
  (what it will hold before a request sent now is admitted): knowledge of the caches and of the
  prefills under way, which no event stream can give earlier.
- `default / precise / oracle, minSpread 2`: the same three with the queue scorer's `minSpread: 2`,
  docs/scheduling.md's setting for pools of 8+ pods with a few hot prefixes (the default's 4 suits 4).
Active-active: precise with 2 and 4 picker replicas, requests split round-robin between them, each
with its own index and in-flight counts: `unscaled` as they are, then with `inflight-load-scorer`
`replicas: N` (each replica's counts × N), then that and the producer's `rendezvousOnMiss` (a prefix
no endpoint holds scores 1.0 on its rendezvous home, the same from every replica), then `peers`
(`--ha-peers`: each replica hears the others' routes, finishes and plugin notes `--peer-delay`
later); the approximate default the same way without and with peers.

Workloads: `multi-tenant` (llm-d's: 150 tenants × 6,000-token shared context + 100-token question,
uniform popularity, 8 servers whose caches hold ~1.37× the shared contexts, i.e. KV demand ~73%),
`multi-tenant-heavy` (the same at 6× the rate, 144 req/s: near the servers' capacity),
`multi-turn-long` (agentic sessions growing to ~120 K characters, far past the approximate index's
cut), and the existing `shared-prefix` and `multi-turn` of bench/routing_quality.py.

Writes bench/results/precise_prefix.{json,md} (--quick: bench/results/quick/) and a plot in
bench/plots/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from routing_policies import PickerPolicy, _doc  # noqa: E402
from routing_quality import POLL_INTERVAL, Workload, _track_busy, measure, n_warm, warmed, workload  # noqa: E402

import epp.producers.precise_prefix  # noqa: E402,F401  (registers the precise plugin types)
from epp.datastore import Endpoint  # noqa: E402
from epp.producers.precise_prefix import PrecisePrefixCacheScorer  # noqa: E402
from epp.scheduling.config import DEFAULT_CONFIG_TEXT, REFERENCE_CONFIG_TEXT, load_config  # noqa: E402
from epp.scheduling.cycle import Cycle  # noqa: E402
from epp.scheduling.registry import SCORER, BuildContext, NoParams, register  # noqa: E402
from epp.sim.config import EngineConfig  # noqa: E402
from epp.sim.des import Cluster  # noqa: E402
from epp.sim.kvevents import attach_des  # noqa: E402
from epp.sim.policies import RandomChoice  # noqa: E402
from epp.sim.tokens import block_hashes  # noqa: E402
from epp.sim.workload import multi_turn, shared_prefix  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PLOTS = ROOT / "bench" / "plots"
_ENGINES: dict[str, Any] = {}  # address -> Engine, for the oracle (set per run)


# ---- the oracle: the engines' caches, exactly and at once ----------------------------------------
@register("oracle-prefix-scorer", SCORER)
class OraclePrefixScorer(NoParams):
    """Share of the prompt's blocks each server's engine holds right now (a benchmark-only scorer)."""

    BOUNDED = True
    IN_FLIGHT = False

    def __init__(self, name: str, params: None, ctx: BuildContext) -> None:
        self.name = name

    def score(self, cycle: Cycle, endpoints: Sequence[Endpoint]) -> list[float]:
        out = []
        req = cycle.request
        for ep in endpoints:
            eng = _ENGINES.get(ep.address)
            if eng is None:
                out.append(0.0)
                continue
            cfg = eng.cfg
            key = f"oracle:{cfg.block_size}"
            hs = req.scratch.get(key)
            if hs is None:
                hs = req.scratch[key] = block_hashes(req.prompt, cfg.block_size, req.model or cfg.model)
            if not hs:
                out.append(0.0)
                continue
            held = len(eng.kv.match(hs, len(hs))[0])
            if self.IN_FLIGHT:
                for seq in (*eng.running, *eng.waiting):
                    held = max(held, _common(hs, seq.hashes))
            out.append(held / len(hs))
        req.scratch[f"prefix-scores:{self.name}"] = (endpoints, out)  # as prefix scorers leave it (no-hit-lru)
        return out


@register("oracle-inflight-prefix-scorer", SCORER)
class OracleInFlightPrefixScorer(OraclePrefixScorer):
    """The oracle that also sees what each engine is computing: a prompt waiting or running there
    counts as cached (it will be before a request sent now is admitted, the queue being FIFO)."""

    IN_FLIGHT = True


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ---- configurations ----------------------------------------------------------------------------
def _swap_prefix(new: dict[str, Any]) -> str:
    doc = _doc(DEFAULT_CONFIG_TEXT)
    for p in doc["plugins"]:
        if p["type"] == "prefix-cache-scorer":
            p.clear()
            p.update(new)
        elif p["type"] in ("no-hit-lru-scorer", "prefill-backlog-scorer"):  # read it by name and type
            p["parameters"] = {**(p.get("parameters") or {}), "prefixPluginName": new["type"],
                               "prefixPluginType": new["type"]}
    for prof in doc["schedulingProfiles"]:
        for e in prof["plugins"]:
            if e["pluginRef"] == "prefix-cache-scorer":
                e["pluginRef"] = new["type"]
    return yaml.safe_dump(doc, sort_keys=False)


def _load_only() -> str:
    doc = _doc(DEFAULT_CONFIG_TEXT)
    gone = ("prefix-cache-scorer", "no-hit-lru-scorer", "prefill-backlog-scorer")  # the others read the first
    doc["plugins"] = [p for p in doc["plugins"] if p["type"] not in gone]
    for prof in doc["schedulingProfiles"]:
        prof["plugins"] = [e for e in prof["plugins"] if e["pluginRef"] not in gone]
    return yaml.safe_dump(doc, sort_keys=False)


PRECISE = {"type": "precise-prefix-cache-scorer",
           "parameters": {"tokenizer": {"backend": "sim"}, "speculativeIndexing": True}}
PRECISE_HOME = {"type": "precise-prefix-cache-scorer",
                "parameters": {"tokenizer": {"backend": "sim"}, "speculativeIndexing": True, "rendezvousOnMiss": True}}
PRECISE_HOLD = {"type": "precise-prefix-cache-scorer",
                "parameters": {"tokenizer": {"backend": "sim"}, "speculativeIndexing": True,
                               "speculativeHoldInFlight": True}}
PRECISE_NOSPEC = {"type": "precise-prefix-cache-scorer", "parameters": {"tokenizer": {"backend": "sim"}}}
def _inflight_replicas(text: str, n: int) -> str:
    """`text` with the in-flight scorer told there are n active-active replicas (its counts × n)."""
    doc = _doc(text)
    for p in doc["plugins"]:
        if p["type"] == "inflight-load-scorer":
            p.setdefault("parameters", {})["replicas"] = n
    return yaml.safe_dump(doc, sort_keys=False)


def _min_spread(text: str, spread: float) -> str:
    """`text` with the queue scorer's minSpread set: docs/scheduling.md's setting for pools of 8+
    pods with a few hot prefixes is 2 (the default's 4 suits 4 pods)."""
    doc = _doc(text)
    for p in doc["plugins"]:
        if p["type"] == "queue-scorer":
            p.setdefault("parameters", {})["minSpread"] = spread
    return yaml.safe_dump(doc, sort_keys=False)


def _reference_deploy() -> str:
    """GIE's default profile with the approximate index as llm-d's deploy configs set it: no auto-tune,
    `lruCapacityPerServer: 31250` (far more than a simulated pod's cache: after evictions the index
    still believes the evicted prefixes are there)."""
    doc = _doc(REFERENCE_CONFIG_TEXT)
    for p in doc["plugins"]:
        if p["type"] == "prefix-cache-scorer":
            p["parameters"] = {"autoTune": False, "lruCapacityPerServer": 31250, "blockSizeTokens": 16}
    return yaml.safe_dump(doc, sort_keys=False)


CONFIGS = {
    "load-only": _load_only,
    "reference": lambda: REFERENCE_CONFIG_TEXT,
    "reference, LRU 31250": _reference_deploy,
    "default": lambda: DEFAULT_CONFIG_TEXT,
    "precise": lambda: _swap_prefix(PRECISE),
    "precise, held in flight": lambda: _swap_prefix(PRECISE_HOLD),
    "precise, no speculation": lambda: _swap_prefix(PRECISE_NOSPEC),
    "precise, rendezvous on miss": lambda: _swap_prefix(PRECISE_HOME),
    "oracle": lambda: _swap_prefix({"type": "oracle-prefix-scorer"}),
    "oracle, in flight": lambda: _swap_prefix({"type": "oracle-inflight-prefix-scorer"}),
    # the same three with the 8+-pod setting of the queue scorer (minSpread 2)
    "default, minSpread 2": lambda: _min_spread(DEFAULT_CONFIG_TEXT, 2),
    "precise, minSpread 2": lambda: _min_spread(_swap_prefix(PRECISE), 2),
    "oracle, minSpread 2": lambda: _min_spread(_swap_prefix({"type": "oracle-prefix-scorer"}), 2),
}


# ---- workloads ---------------------------------------------------------------------------------
def _multi_tenant(n: int, rate: float, servers: int, seed: int):  # type: ignore[no-untyped-def]
    return shared_prefix(n, rate, groups=150, prefix_chars=24000, suffix_chars=400, max_tokens=64, seed=seed)


def _multi_turn_long(n: int, rate: float, servers: int, seed: int):  # type: ignore[no-untyped-def]
    return multi_turn(n, rate, systems=4, system_chars=70000, zipf=1.0, user_chars=(1000, 4000),
                      reply_tokens=(128, 512), turns=8.0, think_s=4.0, max_context_chars=120000, seed=seed)


MULTI_TENANT_HEAVY = 6.0  # × the multi-tenant rate: 144 req/s, near what 8 servers sustain at these hit rates
# KV demand: 150 × 6,000 tokens of shared context against 8 × 9,632 blocks × 16 tokens: 73%
MULTI_TENANT_BLOCKS = 9632
WORKLOADS = {
    "multi-tenant": (Workload("multi-tenant", _multi_tenant, "150 tenants × 6,000-token shared context + 100 "
                              "tokens, uniform; the shared contexts fill 73% of the "
                              "cluster's KV cache",
                              EngineConfig(num_gpu_blocks=MULTI_TENANT_BLOCKS)), 24.0),
    "multi-tenant-heavy": (Workload("multi-tenant-heavy", _multi_tenant, "the multi-tenant workload at 6× the "
                                    "rate (near the servers' capacity at these hit rates)",
                                    EngineConfig(num_gpu_blocks=MULTI_TENANT_BLOCKS)), 24.0 * MULTI_TENANT_HEAVY),
    "multi-turn-long": (Workload("multi-turn-long", _multi_turn_long,
                                 "agentic sessions: 4 Zipf(1) tool preambles of 17,500 tokens (70K chars, past "
                                 "the approximate index's cut), 8 turns on average of 250-1,000 new tokens plus "
                                 "128-512-token replies, contexts to ~120K chars",
                                 EngineConfig()), 10.0),
    "shared-prefix": (workload("shared-prefix"), 45.0),
    "multi-turn": (workload("multi-turn"), 50.0),
}


def run_one(w: Workload, rate: float, servers: int, n: int, seed: int, policy: str, delay: float,
            replicas: int = 1, inflight_replicas: int = 1, peer_delay: float | None = None) -> dict[str, float]:
    if policy == "random":
        pol: Any = RandomChoice(seed)
    else:
        text = CONFIGS[policy]()
        if inflight_replicas > 1:
            text = _inflight_replicas(text, inflight_replicas)
        pol = PickerPolicy(load_config(text), replicas=replicas, seed=seed, peer_delay=peer_delay)
    cluster = Cluster(servers, pol, engine=w.engine, seed=seed, poll_interval=POLL_INTERVAL)
    _ENGINES.clear()
    _ENGINES.update({s.endpoint.address: s.engine for s in cluster.servers})
    producers: list[Any] = []
    delivered = [0]
    if isinstance(pol, PickerPolicy):
        pol.bind(cluster)
        if policy.startswith("precise"):
            def deliver(address: str, model: str, payload: bytes) -> None:
                if not producers:  # replicas are made on the first request
                    for rep in pol._replicas:
                        for ws in rep.scheduler.scorers:
                            if isinstance(ws.scorer, PrecisePrefixCacheScorer):
                                producers.append(ws.scorer.producer)
                delivered[0] += 1
                for p in producers:
                    p.feed(address, model, payload)
            attach_des(cluster, deliver, delay)
    busy = _track_busy(cluster)
    t0 = time.process_time()
    results = cluster.run(warmed(w.make(n + n_warm(n), rate, servers, seed), n_warm(n)))
    cpu = time.process_time() - t0
    m = measure(results, busy, servers)
    m["cpu_s"] = cpu
    m["event_messages"] = float(delivered[0])
    if producers:
        st = producers[0].kv_index.stats
        m["stored_blocks"] = float(st.stored_blocks)
        m["index_entries"] = float(producers[0].kv_index.entries)
        m["speculated"] = float(st.speculated)
        m["speculative_expired"] = float(st.speculative_expired)
        m["speculative_expired_unconfirmed"] = float(st.speculative_expired_unconfirmed)
        m["speculative_confirmed"] = float(st.speculative_confirmed)
    return m


ORDER = ("random", "load-only", "reference", "reference, LRU 31250", "default", "precise", "precise, held in flight",
         "precise, no speculation",
         "precise, rendezvous on miss", "oracle", "oracle, in flight", "default, minSpread 2", "precise, minSpread 2",
         "oracle, minSpread 2")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    ap.add_argument("--policies", nargs="+", default=list(ORDER))
    ap.add_argument("--servers", type=int, default=8)
    ap.add_argument("--requests", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--replicas", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--rate-scale", type=float, default=1.0)
    ap.add_argument("--peer-delay", type=float, default=0.001,
                    help="--ha-peers rows: seconds until a replica hears a peer's route (default 1 ms)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    n = args.requests or (1500 if args.quick else 4000)
    out_dir = RESULTS / "quick" if args.quick else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"servers": args.servers, "requests": n, "delay_s": args.delay, "seed": args.seed,
                            "runs": {}}
    for wname in args.workloads:
        w, rate = WORKLOADS[wname]
        rate *= args.rate_scale
        runs: dict[str, Any] = {}
        for pname in args.policies:
            t = time.time()
            runs[pname] = run_one(w, rate, args.servers, n, args.seed, pname, args.delay)
            spec = runs[pname].get("speculative_expired")
            extra = (f"  spec expired {spec:.0f} (unconfirmed {runs[pname]['speculative_expired_unconfirmed']:.0f})"
                     if spec is not None else "")
            print(f"{wname:16s} {pname:24s} p90 TTFT {runs[pname]['ttft_p90'] * 1000:8.0f} ms  "
                  f"hit {runs[pname]['hit_rate']:.2f}  ({time.time() - t:.0f} s){extra}", flush=True)
        if "precise" in args.policies:
            for r in args.replicas:
                # as deployed before the fix (each replica's own in-flight counts), then with the
                # in-flight scorer told the replica count (its counts × r)
                # in-flight scorer told the replica count (its counts × r), then that and
                # rendezvousOnMiss (every replica sends a cold prefix to the same home)
                for key, pname, scale, peer in ((f"precise ×{r} replicas, unscaled", "precise", 1, None),
                                                (f"precise ×{r} replicas", "precise", r, None),
                                                (f"precise ×{r} replicas, rendezvous on miss",
                                                 "precise, rendezvous on miss", r, None),
                                                (f"precise ×{r} replicas, peers", "precise", 1, args.peer_delay),
                                                (f"default ×{r} replicas", "default", 1, None),
                                                (f"default ×{r} replicas, peers", "default", 1, args.peer_delay)):
                    if pname not in args.policies:
                        continue
                    runs[key] = run_one(w, rate, args.servers, n, args.seed, pname, args.delay, replicas=r,
                                        inflight_replicas=scale, peer_delay=peer)
                    print(f"{wname:16s} {key:24s} p90 TTFT {runs[key]['ttft_p90'] * 1000:8.0f} ms  "
                          f"hit {runs[key]['hit_rate']:.2f}", flush=True)
        data["runs"][wname] = {"rate": rate, "note": w.note, "policies": runs}
        (out_dir / "precise_prefix.json").write_text(json.dumps(data, indent=1))
    md = render(data)
    (out_dir / "precise_prefix.md").write_text(md)
    print(md)
    if not args.no_plots:
        plot(data, (PLOTS / "quick" if args.quick else PLOTS) / "precise_prefix.png")
    return 0


def _ratio(r: float) -> str:
    """Two decimals, or a power of ten where that would print 0.00 (an oracle that collapsed)."""
    return f"{r:.2f}" if r >= 0.01 else f"{r:.1e}"


def render(data: dict[str, Any]) -> str:
    lines = [f"Precise prefix routing: {data['servers']} servers, {data['requests']} measured requests per run, "
             f"KV events delivered {data['delay_s'] * 1000:g} ms after each engine step, seed {data['seed']}. "
             "Latencies in virtual time.", ""]
    for wname, wd in data["runs"].items():
        lines += [f"**{wname}** at {wd['rate']:g} req/s — {wd['note']}", "",
                  "| policy | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | e2e p90 s | hit rate | tok/s |",
                  "|---|---|---|---|---|---|---|"]
        for pname, m in wd["policies"].items():
            lines.append(f"| {pname} | {m['ttft_p50'] * 1000:.0f} | {m['ttft_p90'] * 1000:.0f} | "
                         f"{m['ttft_p99'] * 1000:.0f} | {m['e2e_p90']:.2f} | {m['hit_rate']:.2f} | "
                         f"{m['output_tok_s']:.0f} |")
        pol = wd["policies"]
        if "precise" in pol and "oracle" in pol and "default" in pol:
            p, o, a = pol["precise"]["ttft_p90"], pol["oracle"]["ttft_p90"], pol["default"]["ttft_p90"]
            lines += ["", f"precise / oracle p90 TTFT: {p / o:.2f}; default (approximate) / precise: {a / p:.2f}"]
            if "oracle, in flight" in pol:
                lines.append(f"precise / oracle, in flight p90 TTFT: {p / pol['oracle, in flight']['ttft_p90']:.2f}")
            k2 = ("precise, minSpread 2", "oracle, minSpread 2", "default, minSpread 2")
            if all(k in pol for k in k2):
                p2, o2, a2 = (pol[k]["ttft_p90"] for k in k2)
                lines.append(f"with minSpread 2: precise / oracle p90 TTFT {_ratio(p2 / o2)}, precise / the plain "
                             f"oracle {_ratio(p2 / o)}; default (approximate) / precise {_ratio(a2 / p2)}")
            for r in (2, 4):
                for k in (f"precise ×{r} replicas, unscaled", f"precise ×{r} replicas"):
                    if k in pol:
                        lines.append(f"{k} / one replica p90 TTFT: {pol[k]['ttft_p90'] / p:.2f}")
                k = f"precise ×{r} replicas, peers"
                if k in pol:
                    lines.append(f"{k} / one replica p90 TTFT: {pol[k]['ttft_p90'] / p:.2f}")
                for k in (f"default ×{r} replicas", f"default ×{r} replicas, peers"):
                    if k in pol:
                        lines.append(f"{k} / one replica (default) p90 TTFT: {pol[k]['ttft_p90'] / a:.2f}")
                k, one = f"precise ×{r} replicas, rendezvous on miss", "precise, rendezvous on miss"
                if k in pol and one in pol:
                    lines.append(f"{k} / one replica (precise / same option) p90 TTFT: "
                                 f"{pol[k]['ttft_p90'] / p:.2f} / {pol[k]['ttft_p90'] / pol[one]['ttft_p90']:.2f}")
            for ref in ("reference", "reference, LRU 31250"):
                if ref in pol:
                    lines.append(f"{ref} (approximate) / precise p90 TTFT: {pol[ref]['ttft_p90'] / p:.2f}")
        lines.append("")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no plot)")
        return
    wls = list(data["runs"])
    fig, axes = plt.subplots(1, len(wls), figsize=(4.2 * len(wls), 4), squeeze=False)
    for ax, wname in zip(axes[0], wls, strict=True):
        pol = data["runs"][wname]["policies"]
        names = list(pol)
        vals = [pol[k]["ttft_p90"] * 1000 for k in names]
        ax.barh(range(len(names)), vals, color=["#d62728" if k.startswith("precise") else
                                                "#2ca02c" if k.startswith("oracle") else "#7f7f7f" for k in names])
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("p90 TTFT (ms, log)")
        ax.set_title(wname, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    raise SystemExit(main())

"""Routing quality: the picker's scheduling against proxy baselines and the reference profile.

    .venv/bin/python bench/routing_quality.py --quick      # `make bench`: 8 servers, < ~3 min
    .venv/bin/python bench/routing_quality.py              # `make bench-full`: the whole matrix
    options: --servers 8 32  --loads 50 70 85 95  --workloads shared-prefix ...  --requests N
             --seed S  --no-plots  --json PATH  --markdown PATH  --tiny (smoke test)

Everything runs in the discrete-event simulator (epp.sim.des) in virtual time, deterministic for a
seed: the same seeded workload is replayed against every policy on identical clusters (servers
shaped like an 8B model on one H100, epp.sim.config's defaults; metrics polled every 50 ms, each
server at its own seeded phase).

Every run starts with a warm-up: a quarter as many requests as are measured, at half the rate
(caches fill without a backlog building), then the measured requests at the full rate; the
warm-up and the first 5% of the measured requests are left out of the figures.

Capacity (per cluster size and workload): the highest arrival rate at which round-robin keeps up,
i.e. its backlog (requests arrived and not finished, sampled at each arrival) grows, over the
measured requests, by less than 5% of the arrival rate (least-squares slope: it completes ≥ ~95%
of what arrives); found by doubling, then bisection to 5% (10% with --quick). Loads are fractions
of that rate.

Reported: TTFT p50/p90/p99 and end-to-end p50/p90 (virtual seconds), output tokens/s, prefix-cache
hit rate (prompt tokens the engines found cached), 429 rate (admission; only requests marked
sheddable can be refused, and the main workloads mark none), and load spread (the coefficient of
variation of per-server busy time, and of requests per server).

Writes: markdown tables on stdout and to bench/results/routing_quality.md, every figure to
bench/results/routing_quality.json (`--report` renders a saved one again), PNG plots to
bench/plots/ with matplotlib (the `bench` extra; skipped with a note when missing). A --quick run
writes to bench/results/quick/ and bench/plots/quick/ instead, so it never replaces the figures
docs/benchmarks.md shows.
The full run takes 32 servers only at the 85% and 95% loads (each run costs 4×).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from routing_policies import POLICIES, REPLICA_POLICIES, PickerPolicy, PolicySpec, policy  # noqa: E402

from epp.sim.config import EngineConfig  # noqa: E402
from epp.sim.des import Cluster, RequestResult, SimRequest  # noqa: E402
from epp.sim.workload import bursty, long_context, lora_mix, multi_turn, shared_prefix  # noqa: E402

WARMUP_SHARE = 0.25  # warm-up requests (at half the rate) per measured request
SETTLE = 0.05  # share of the measured requests, first by arrival, also left out (the step up to full rate)
POLL_INTERVAL = 0.05  # s: the picker's and the reference's metrics refresh
ADAPTERS = tuple(f"adapter-{i:02d}" for i in range(15))
PLOTS = ROOT / "bench" / "plots"
RESULTS = ROOT / "bench" / "results"
ROUND_ROBIN = policy("round-robin")
STABLE_GROWTH = 0.05  # backlog growth per second, as a share of the arrival rate, that counts as falling behind

Stream = Iterator[tuple[float, SimRequest]]


@dataclass(frozen=True, slots=True)
class Workload:
    """A named request mix: `make(n, rate, servers, seed)` yields the requests."""

    name: str
    make: Callable[[int, float, int, int], Stream]
    note: str
    engine: EngineConfig = field(default_factory=EngineConfig)


def _shared_prefix(n: int, rate: float, servers: int, seed: int, zipf: float = 1.0) -> Stream:
    # 8 groups per server: more than one server's cache holds under round-robin (8 × 8 × 6k tokens
    # with 500k-token caches), a comfortable fit when each group stays on a few servers.
    return shared_prefix(n, rate, groups=8 * servers, prefix_chars=24000, suffix_chars=4800, max_tokens=128,
                         zipf=zipf, seed=seed)


def _shared_prefix_mild(n: int, rate: float, servers: int, seed: int) -> Stream:
    return _shared_prefix(n, rate, servers, seed, zipf=0.6)


def _multi_turn(n: int, rate: float, servers: int, seed: int) -> Stream:
    return multi_turn(n, rate, systems=16, system_chars=8000, zipf=1.0, user_chars=(200, 1600),
                      reply_tokens=(64, 256), turns=6.0, think_s=6.0, seed=seed)


def _lora(n: int, rate: float, servers: int, seed: int) -> Stream:
    return lora_mix(n, rate, adapters=ADAPTERS, zipf=1.0, base_share=0.0, template_chars=2048, prompt_chars=2048,
                    max_tokens=128, seed=seed)


def _long_context(n: int, rate: float, servers: int, seed: int) -> Stream:
    return long_context(n, rate, long_share=0.02, long_chars=126976, short_chars=4096, max_tokens=128,
                        long_max_tokens=256, seed=seed)


def _bursty(n: int, rate: float, servers: int, seed: int, sheddable: float = 0.0) -> Stream:
    return bursty(n, rate, period=4.0, on_fraction=0.25, groups=4 * servers, zipf=1.0, prefix_chars=8192,
                  suffix_chars=2048, max_tokens=128, sheddable=sheddable, seed=seed)


WORKLOADS: tuple[Workload, ...] = (
    Workload("shared-prefix", _shared_prefix,
             "8 groups per server, Zipf(1) popular (the top group is ~1/5 of the traffic with 8 servers, "
             "more than one server takes); 6,000-token shared system prompt + 1,200-token question; "
             "128 output tokens"),
    Workload("multi-turn", _multi_turn,
             "conversations over 16 Zipf(1) system prompts of 2,000 tokens; 6 turns on average, each "
             "repeating the whole conversation + 50-400 new tokens; 64-256 output tokens; 6 s think time"),
    Workload("lora", _lora,
             "15 adapters, Zipf(1) popular, max_loras 4; 512-token per-adapter template + 512 tokens; "
             "128 output tokens",
             EngineConfig(loras=ADAPTERS, max_loras=4)),
    Workload("long-context", _long_context,
             "2% of requests carry a 31,744-token document (256 output tokens), the rest 1,024-token "
             "prompts (128 output tokens); nothing shared"),
    Workload("bursty", _bursty,
             "on/off arrivals: everything in the first second of every 4 s (4× the mean rate); "
             "4 groups per server, Zipf(1), 2,048-token shared prefix + 512 tokens; 128 output tokens"),
)
# Full mode only: shared-prefix with mildly skewed popularity (no group outgrows a server).
MILD = Workload("shared-prefix-mild", _shared_prefix_mild,
                "as shared-prefix with Zipf(0.6) popularity (the top group is ~7% of the traffic)")


def workload(name: str) -> Workload:
    for w in (*WORKLOADS, MILD):
        if w.name == name:
            return w
    raise KeyError(name)


# ---- running -----------------------------------------------------------------------------------
def _track_busy(cluster: Cluster) -> list[float]:
    """Per-server busy time (sum of step durations), accumulated as the run goes."""
    busy = [0.0] * len(cluster.servers)
    for i, s in enumerate(cluster.servers):
        begin = s.engine.begin_step

        def counted(now: float, _begin: Callable[[float], float | None] = begin, _i: int = i) -> float | None:
            d = _begin(now)
            if d is not None:
                busy[_i] += d
            return d

        s.engine.begin_step = counted  # type: ignore[method-assign]
    return busy


def warmed(stream: Stream, n_warm: int, slow: float = 2.0) -> Stream:
    """The stream with its first `n_warm` requests spread over `slow` times their time (a warm-up at
    1/slow of the rate that fills the caches without building a backlog) and the rest moved after."""
    shift = 0.0
    last = 0.0
    for i, (t, req) in enumerate(stream):
        if i < n_warm:
            last = t
            yield t * slow, req
        else:
            if i == n_warm:
                shift = last * (slow - 1.0)
            yield t + shift, req


def n_warm(n: int) -> int:
    """Warm-up requests before `n` measured ones."""
    return int(n * WARMUP_SHARE)


def simulate(w: Workload, servers: int, rate: float, n: int, seed: int, spec: PolicySpec, replicas: int = 1,
             stream: Stream | None = None) -> tuple[list[RequestResult], list[float], Any]:
    """One run: a fresh cluster and policy, the seeded workload (warm-up, then `n` requests at `rate`);
    results and per-server busy times."""
    pol = spec.make(seed, replicas)
    cluster = Cluster(servers, pol, engine=w.engine, seed=seed, poll_interval=POLL_INTERVAL)
    if isinstance(pol, PickerPolicy):
        pol.bind(cluster)
    busy = _track_busy(cluster)
    if stream is None:
        stream = w.make(n + n_warm(n), rate, servers, seed)
    results = cluster.run(warmed(stream, n_warm(n)))
    if isinstance(pol, PickerPolicy) and pol.outstanding:
        raise RuntimeError(f"{spec.name}: {pol.outstanding} requests never finished")
    return results, busy, pol


def _pct(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


def _cv(values: Sequence[float]) -> float:
    mean = statistics.fmean(values) if values else 0.0
    return statistics.pstdev(values) / mean if mean > 0 else 0.0


def measure(results: Sequence[RequestResult], busy: Sequence[float], servers: int) -> dict[str, float]:
    """The reported figures of one run (see the module docstring)."""
    by_arrival = sorted(results, key=lambda r: r.arrival)
    n = round(len(by_arrival) / (1.0 + WARMUP_SHARE))
    measured = by_arrival[len(by_arrival) - n + int(n * SETTLE):]
    ok = [r for r in measured if r.ok]
    refused = sum(1 for r in measured if r.status == 429)
    failed = sum(1 for r in measured if not r.ok and r.status != 429)
    ttft = sorted(r.ttft for r in ok)
    e2e = sorted(r.e2e for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    all_ok = [r for r in results if r.ok]
    span = max(r.finished or 0.0 for r in all_ok) - min(r.arrival for r in results) if all_ok else 0.0
    per_server = [0] * servers
    for r in results:
        if r.server >= 0:
            per_server[r.server] += 1
    return {
        "requests": len(measured),
        "ttft_p50": _pct(ttft, 0.5), "ttft_p90": _pct(ttft, 0.9), "ttft_p99": _pct(ttft, 0.99),
        "e2e_p50": _pct(e2e, 0.5), "e2e_p90": _pct(e2e, 0.9),
        "output_tok_s": sum(r.output_tokens for r in all_ok) / span if span > 0 else 0.0,
        "hit_rate": cached / prompt if prompt else 0.0,
        "rate_429": refused / len(measured) if measured else 0.0,
        "failed": float(failed),
        "busy_cv": _cv(busy),
        "requests_cv": _cv(per_server),
        "preemptions": float(sum(r.preemptions for r in ok)),
    }


def in_system(results: Sequence[RequestResult]) -> list[tuple[float, int]]:
    """(arrival time, requests arrived and not finished just after it) for every arrival, in order."""
    arrivals = sorted(r.arrival for r in results)
    finishes = sorted(r.finished if r.finished is not None else r.arrival for r in results)
    out, j = [], 0
    for k, t in enumerate(arrivals):
        while j < len(finishes) and finishes[j] <= t:
            j += 1
        out.append((t, k + 1 - j))
    return out


def _stable(w: Workload, servers: int, rate: float, n: int, seed: int) -> bool:
    """Round-robin keeps up at `rate`: over the measured requests, the backlog (requests arrived and
    not finished, sampled at each arrival) grows by less than 5% of the arrival rate (least-squares
    slope), i.e. it completes at least ~95% of what arrives."""
    results, _, _ = simulate(w, servers, rate, n, seed, ROUND_ROBIN)
    samples = in_system(results)[-n:]
    ts = [t for t, _ in samples]
    bs = [float(b) for _, b in samples]
    t_mean, b_mean = statistics.fmean(ts), statistics.fmean(bs)
    var = sum((t - t_mean) ** 2 for t in ts)
    slope = sum((t - t_mean) * (b - b_mean) for t, b in zip(ts, bs, strict=True)) / var if var > 0 else 0.0
    return slope < STABLE_GROWTH * rate


def capacity(w: Workload, servers: int, n: int, seed: int, precision: float = 0.05) -> tuple[float, int]:
    """The highest arrival rate round-robin sustains (see the module docstring), within `precision`;
    also the number of runs it took."""
    rate = 4.0 * servers
    runs = 1
    first = _stable(w, servers, rate, n, seed)
    lo, hi = (rate, 2.0 * rate) if first else (rate / 2.0, rate)
    while runs < 16:  # bracket: double (or halve) until the verdict flips
        runs += 1
        probe = hi if first else lo
        ok = _stable(w, servers, probe, n, seed)
        if ok != first:
            break
        lo, hi = (hi, 2.0 * hi) if first else (lo / 2.0, lo)
    else:
        raise RuntimeError(f"{w.name}: no rate where round-robin's verdict changes")
    while hi / lo > 1.0 + precision:
        mid = math.sqrt(lo * hi)
        runs += 1
        if _stable(w, servers, mid, n, seed):
            lo = mid
        else:
            hi = mid
    return lo, runs


# ---- reporting ---------------------------------------------------------------------------------
def _ms(v: float) -> str:
    if math.isnan(v):
        return "–"
    return f"{v * 1000:.0f}" if v < 10 else f"{v:.1f} s"


def _s(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.2f}"


COLUMNS = ("policy", "TTFT p50 ms", "p90", "p99", "e2e p50 s", "p90", "out tok/s", "hit %", "429 %",
           "busy CV", "req CV")


def _row(name: str, m: dict[str, float]) -> list[str]:
    return [name, _ms(m["ttft_p50"]), _ms(m["ttft_p90"]), _ms(m["ttft_p99"]), _s(m["e2e_p50"]), _s(m["e2e_p90"]),
            f"{m['output_tok_s']:.0f}", f"{m['hit_rate'] * 100:.1f}", f"{m['rate_429'] * 100:.1f}",
            f"{m['busy_cv']:.2f}", f"{m['requests_cv']:.2f}"]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


@dataclass
class Report:
    """Collects markdown sections while printing them."""

    parts: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        print(text, flush=True)
        self.parts.append(text)

    def text(self) -> str:
        return "\n\n".join(self.parts) + "\n"


def goals(data: dict[str, Any], servers: int, loads: Sequence[int]) -> list[list[str]]:
    """The issue's goals for our default, checked per workload: rows for a markdown table."""
    runs = data["runs"][str(servers)]
    runs = {w: runs[w] for w in _ordered(list(runs), [w.name for w in (*WORKLOADS, MILD)])}
    rows: list[list[str]] = []
    for wname, by_load in runs.items():
        if "85" in by_load:
            m = by_load["85"]
            ratio = m["round-robin"]["ttft_p90"] / m["default"]["ttft_p90"]
            rows.append([f"p90 TTFT ≥ 3× better than round-robin at 85% ({wname})", f"{ratio:.2f}×",
                         "met" if ratio >= 3 else "**missed**"])
    for wname in ("shared-prefix", "shared-prefix-mild"):
        for load in loads:
            m = runs.get(wname, {}).get(str(load))
            if m is None:
                continue
            ratio = m["reference"]["ttft_p90"] / m["default"]["ttft_p90"]
            rows.append([f"p90 TTFT ≥ 1.5× better than reference ({wname}, {load}%)", f"{ratio:.2f}×",
                         "met" if ratio >= 1.5 else "**missed**"])
    worse = []
    for wname, by_load in runs.items():
        for load in _loads(by_load):
            m = by_load[load]
            for key in REGRESSION_KEYS:
                d = m["default"][key] / m["reference"][key] - 1.0
                if d > 0.03:
                    worse.append(f"{wname} {load}% {key.replace('_', ' ')} {d * 100:+.0f}%")
    rows.append(["never > 3% worse than reference (TTFT p50/p90, e2e p50/p90; every workload and load)",
                 "; ".join(worse) or "nowhere worse", "**missed**" if worse else "met"])
    return rows


REGRESSION_KEYS = ("ttft_p50", "ttft_p90", "e2e_p50", "e2e_p90")


def plot(data: dict[str, Any], out: Path, names: Sequence[str]) -> list[Path]:
    """PNG figures: p90 TTFT against load per workload (one file per cluster size), p90 TTFT at 85%
    relative to round-robin, and the replica study. Returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plots; pip install '.[bench]')", file=sys.stderr)
        return []
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    styles = {"random": ":", "round-robin": ":", "least-request-p2c": "--", "reference": "-"}
    wl_order = [w.name for w in (*WORKLOADS, MILD)]
    for servers, runs in data["runs"].items():
        wl = _ordered(list(runs), wl_order)
        cols = min(3, len(wl))
        rows_n = -(-len(wl) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n + 0.8), squeeze=False)
        flat = [ax for row in axes for ax in row]
        for ax, wname in zip(flat, wl, strict=False):
            loads = sorted(runs[wname], key=int)
            for pname in names:
                ys = [runs[wname][ld][pname]["ttft_p90"] * 1000 for ld in loads]
                ax.plot([int(ld) for ld in loads], ys, styles.get(pname, "-"), marker="o", ms=3, label=pname,
                        lw=2.4 if pname == "default" else 1.2)
            ax.set_yscale("log")
            ax.set_title(wname)
            ax.set_xlabel("load, % of capacity")
            ax.set_ylabel("p90 TTFT (ms, log)")
            ax.grid(True, which="both", alpha=0.3)
        for ax in flat[len(wl):]:
            ax.axis("off")
        handles, labels = flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(8, len(names)), fontsize=8)
        fig.suptitle(f"p90 time to first token, {servers} servers")
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        path = out / f"routing_ttft_p90_{servers}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        at = [w for w in wl if "85" in runs[w]]  # (in workload order)
        if at:
            fig, ax = plt.subplots(figsize=(9, 3.8))
            width = 0.8 / len(names)
            for k, pname in enumerate(names):
                ys = [runs[w]["85"]["round-robin"]["ttft_p90"] / runs[w]["85"][pname]["ttft_p90"] for w in at]
                ax.bar([i + k * width for i in range(len(at))], ys, width, label=pname)
            ax.axhline(3.0, color="k", lw=0.8, ls="--")
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(at))], at)
            ax.set_yscale("log")
            ax.set_ylabel("round-robin p90 TTFT / policy's (log)")
            ax.set_title(f"p90 TTFT improvement over round-robin at 85% load, {servers} servers (dashed: 3×)")
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            path = out / f"routing_vs_rr_85_{servers}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)

    rep = data.get("replicas")
    if rep:
        wl = _ordered(list(rep), wl_order)
        fig, axes = plt.subplots(1, len(wl), figsize=(4.5 * len(wl), 3.6), squeeze=False)
        for ax, wname in zip(axes[0], wl, strict=True):
            for pname in _ordered(list(rep[wname]), [p.name for p in REPLICA_POLICIES]):
                by_n = rep[wname][pname]
                ns = sorted(by_n, key=int)
                ax.plot([int(x) for x in ns], [by_n[x]["ttft_p90"] * 1000 for x in ns], marker="o", label=pname)
            ax.set_xticks([int(x) for x in sorted(next(iter(rep[wname].values())), key=int)])
            ax.set_xlabel("picker replicas")
            ax.set_title(wname)
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("p90 TTFT (ms)")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle("several picker replicas, 85% load")
        fig.tight_layout()
        path = out / "routing_replicas.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---- main --------------------------------------------------------------------------------------
def _ordered(keys: Sequence[str], order: Sequence[str]) -> list[str]:
    """`keys` in `order` (names missing from it last, sorted): JSON files sort their keys."""
    known = [k for k in order if k in keys]
    return known + sorted(k for k in keys if k not in order)


def _loads(by_load: dict[str, Any]) -> list[str]:
    return sorted(by_load, key=int)


def render(data: dict[str, Any]) -> list[str]:
    """Markdown sections for a run's data (also for a saved JSON file: --report)."""
    order = [p.name for p in POLICIES]
    wl_order = [w.name for w in (*WORKLOADS, MILD)]
    n = data["requests_per_8"]
    sizes = sorted(data["runs"], key=int)
    out = [f"Routing quality: {', '.join(sizes)} servers, seed {data['seed']}, {n} measured requests per run per "
           f"8 servers after {int(n * data['warmup_share'])} warm-up requests at half the rate (the first "
           f"{data['settle']:.0%} of the measured ones also left out), metrics polled every "
           f"{data['poll_interval'] * 1000:.0f} ms. Latencies in virtual time."]
    notes = {w.name: w.note for w in (*WORKLOADS, MILD)}
    for size in sizes:
        caps = data["capacity"][size]
        runs_n = data.get("capacity_runs", {}).get(size, {})
        prec = data.get("precision")
        rows = [[w, f"{caps[w]:.1f}", f"{caps[w] / int(size):.2f}", str(runs_n.get(w, "–")), notes.get(w, "")]
                for w in _ordered(list(caps), wl_order)]
        within = f", within {prec:.0%}" if prec else ""
        out.append(f"### Capacity, {size} servers (highest rate round-robin sustains{within})\n\n"
                   + table(["workload", "req/s", "per server", "runs", "requests"], rows))
        runs = data["runs"][size]
        wls = _ordered(list(runs), wl_order)
        # one compact view: p90 TTFT by load, every workload
        parts = []
        for w in wls:
            loads = _loads(runs[w])
            names = _ordered(list(runs[w][loads[0]]), order)
            rows = [[p, *(_ms(runs[w][ld][p]["ttft_p90"]) for ld in loads)] for p in names]
            parts.append(f"**{w}** (p90 TTFT, ms)\n\n" + table(["policy", *(f"{ld}%" for ld in loads)], rows))
        out.append(f"### p90 TTFT by load, {size} servers\n\n" + "\n\n".join(parts))
        for w in wls:
            parts = []
            for ld in _loads(runs[w]):
                m = runs[w][ld]
                rate = caps[w] * int(ld) / 100
                parts.append(f"**{w}, {size} servers, {ld}% ({rate:.1f} req/s)**\n\n"
                             + table(COLUMNS, [_row(p, m[p]) for p in _ordered(list(m), order)]))
            out.append(f"### {w}, {size} servers\n\n" + "\n\n".join(parts))
        out.extend(_ablation(runs, wls, order, size))
        any_load = next(iter(runs.values()))
        some = next(iter(any_load.values()))
        if {"default", "round-robin", "reference"} <= set(some):
            loads = sorted({int(ld) for w in runs.values() for ld in w})
            out.append(f"### Goals, {size} servers (our default)\n\n"
                       + table(["goal", "measured", ""], goals(data, int(size), loads)))
    rep_data = data.get("replicas") or {}
    if rep_data:
        size = str(data.get("replica_servers", sizes[0]))
        load = data.get("replica_load", 85)
        for w in _ordered(list(rep_data), wl_order):
            rows = []
            for pname in _ordered(list(rep_data[w]), [p.name for p in REPLICA_POLICIES]):
                per = rep_data[w][pname]
                counts = sorted(per, key=int)
                base = per[counts[0]]
                for r in counts:
                    m = per[r]
                    rows.append([pname, r, _ms(m["ttft_p50"]), _ms(m["ttft_p90"]), _ms(m["ttft_p99"]),
                                 f"{m['hit_rate'] * 100:.1f}", f"{(m['ttft_p90'] / base['ttft_p90'] - 1) * 100:+.0f}%",
                                 _s(m["e2e_p90"]), f"{m['busy_cv']:.2f}"])
            out.append(f"### Picker replicas: {w}, {size} servers, {load}% load\n\n"
                       + table(["policy", "replicas", "TTFT p50 ms", "p90", "p99", "hit %", "p90 vs 1 replica",
                                "e2e p90 s", "busy CV"], rows))
    adm = data.get("admission") or {}
    if adm:
        rows = []
        for key in sorted(adm, key=lambda k: (int(k.split("/")[0]), order.index(k.split("/", 1)[1]))):
            ld, pname = key.split("/", 1)
            m, mc = adm[key]["all"], adm[key]["critical"]
            rows.append([f"{ld}%", pname, f"{m['rate_429'] * 100:.1f}", _ms(m["ttft_p90"]), _ms(mc["ttft_p50"]),
                         _ms(mc["ttft_p90"]), _ms(mc["ttft_p99"]), _s(mc["e2e_p90"])])
        out.append(f"### Admission: bursty, 30% of requests sheddable, {sizes[0]} servers\n\n"
                   + table(["load", "policy", "429 % (all)", "TTFT p90 ms (served)", "critical: TTFT p50", "p90",
                            "p99", "e2e p90 s"], rows))
    if "wall_s" in data:
        out.append(f"(ran in {data['wall_s']:.0f} s wall, {data['cpu_s']:.0f} s CPU)")
    return out


def _ablation(runs: dict[str, Any], wls: Sequence[str], order: Sequence[str], size: str) -> list[str]:
    """Each picker variant (and the reference) against our default: p90 TTFT and e2e p90 ratios."""
    others = [p for p in order if p == "reference" or (p.startswith("default, "))]
    rows = []
    for w in wls:
        for ld in _loads(runs[w]):
            if int(ld) < 85:
                continue
            m = runs[w][ld]
            if "default" not in m:
                return []
            base = m["default"]
            cells = [f"{m[p]['ttft_p90'] / base['ttft_p90']:.2f} / {m[p]['e2e_p90'] / base['e2e_p90']:.2f}"
                     if p in m else "–" for p in others]
            rows.append([f"{w} {ld}%", *cells])
    if not rows:
        return []
    return [f"### Variants against our default, {size} servers (p90 TTFT / e2e p90, as a multiple of the "
            f"default's; > 1 is worse)\n\n" + table(["workload, load", *others], rows)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the `make bench` subset (8 servers, fewer requests)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    ap.add_argument("--servers", type=int, nargs="*")
    ap.add_argument("--loads", type=int, nargs="*")
    ap.add_argument("--workloads", nargs="*", choices=[w.name for w in (*WORKLOADS, MILD)])
    ap.add_argument("--policies", nargs="*", choices=[p.name for p in POLICIES])
    ap.add_argument("--requests", type=int, help="requests per run per 8 servers (scaled with servers)")
    ap.add_argument("--replicas", type=int, nargs="*", help="picker replica counts for the replica study")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--plots-dir", type=Path, help="default bench/plots (full), bench/plots/quick (--quick)")
    ap.add_argument("--json", type=Path, help="figures (default bench/results[/quick]/routing_quality.json)")
    ap.add_argument("--markdown", type=Path, help="tables (default bench/results[/quick]/routing_quality.md)")
    ap.add_argument("--report", type=Path, help="no runs: render the tables (and plots) of a saved --json file")
    args = ap.parse_args(argv)

    if args.report:
        data = json.loads(args.report.read_text())
    else:
        data = run(args)
        if not args.tiny:  # results kept next to the plots: full in bench/results, quick in bench/results/quick
            results = RESULTS / "quick" if args.quick else RESULTS
            args.json = args.json or results / "routing_quality.json"
            args.markdown = args.markdown or results / "routing_quality.md"
    rep = Report()
    for section in render(data):
        rep.add(section)
    if not args.no_plots:
        plots_dir = args.plots_dir or (PLOTS / "quick" if args.quick or args.tiny else PLOTS)
        names = _ordered(list(next(iter(next(iter(next(iter(data["runs"].values())).values())).values()))),
                         [p.name for p in POLICIES])
        for path in plot(data, plots_dir, names):
            print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if args.json and not args.report:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1, sort_keys=True))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(rep.text())
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every run the arguments ask for; returns all figures (what --json writes)."""
    if args.tiny:
        servers, loads, n, precision = [4], [85], 240, 0.3
        wls = [workload("shared-prefix"), workload("lora")]
        replicas, replica_wls = [1, 2], ["shared-prefix"]
    elif args.quick:
        servers, loads, n, precision = [8], [85, 95], 1500, 0.1
        wls = list(WORKLOADS)
        replicas, replica_wls = [1, 2, 4], ["shared-prefix", "multi-turn"]
    else:
        servers, loads, n, precision = [8, 32], [50, 70, 85, 95], 4000, 0.05
        wls = [*WORKLOADS, MILD]
        replicas, replica_wls = [1, 2, 4], ["shared-prefix", "multi-turn", "lora"]
    # the big cluster costs 4× per run: only the loads the goals are about, unless --loads says otherwise
    big_loads = [ld for ld in loads if ld >= 85] or loads
    servers = args.servers or servers
    if args.loads:
        loads = big_loads = args.loads
    n = args.requests or n
    wls = [workload(x) for x in args.workloads] if args.workloads else wls
    replicas = args.replicas or replicas
    pols = [p for p in POLICIES if not args.policies or p.name in args.policies]
    seed = args.seed

    t_start, cpu_start = time.perf_counter(), time.process_time()
    data: dict[str, Any] = {"seed": seed, "requests_per_8": n, "loads": loads, "warmup_share": WARMUP_SHARE,
                            "settle": SETTLE, "poll_interval": POLL_INTERVAL, "precision": precision,
                            "capacity": {}, "capacity_runs": {}, "runs": {}, "replicas": {}, "admission": {}}

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:5.0f} s] {msg}", file=sys.stderr, flush=True)

    for size in servers:
        reqs = n * size // 8
        data["capacity"][str(size)] = {}
        data["capacity_runs"][str(size)] = {}
        data["runs"][str(size)] = {}
        for w in wls:
            cap, runs = capacity(w, size, reqs, seed, precision)
            data["capacity"][str(size)][w.name] = cap
            data["capacity_runs"][str(size)][w.name] = runs
            progress(f"capacity {w.name}, {size} servers: {cap:.1f} req/s")
        size_loads = loads if size == servers[0] else big_loads
        for w in wls:
            by_load: dict[str, dict[str, dict[str, float]]] = {}
            cap = data["capacity"][str(size)][w.name]
            for load in size_loads:
                rate = cap * load / 100.0
                by_load[str(load)] = {}
                for spec in pols:
                    results, busy, _ = simulate(w, size, rate, reqs, seed, spec)
                    by_load[str(load)][spec.name] = measure(results, busy, size)
            data["runs"][str(size)][w.name] = by_load
            progress(f"{w.name}, {size} servers done")

    # several picker replicas: each sees part of the traffic and keeps its own state
    size = servers[0]
    reqs = n * size // 8
    load = 85 if 85 in loads else loads[-1]
    data["replica_servers"], data["replica_load"] = size, load
    study = [w for w in wls if w.name in replica_wls]
    if len(replicas) > 1 and study:
        for w in study:
            rate = data["capacity"][str(size)][w.name] * load / 100.0
            data["replicas"][w.name] = {}
            for spec in REPLICA_POLICIES:
                data["replicas"][w.name][spec.name] = {
                    str(r): measure(*simulate(w, size, rate, reqs, seed, spec, replicas=r)[:2], size) for r in replicas}
            progress(f"replicas, {w.name} done")

    # admission: bursty arrivals with sheddable requests, at and beyond capacity
    w = workload("bursty")
    if w in wls and not args.tiny:
        cap = data["capacity"][str(size)][w.name]
        for ld in (95, 110):
            rate = cap * ld / 100.0
            for spec in (policy("round-robin"), policy("reference"), policy("default")):
                stream = _bursty(reqs + n_warm(reqs), rate, size, seed, sheddable=0.3)
                results, busy, _ = simulate(w, size, rate, reqs, seed, spec, stream=stream)
                crit = [r for r in results if r.request is not None and r.request.priority >= 0]
                data["admission"][f"{ld}/{spec.name}"] = {"all": measure(results, busy, size),
                                                          "critical": measure(crit, busy, size)}
        progress("admission done")
    data["wall_s"], data["cpu_s"] = time.perf_counter() - t_start, time.process_time() - cpu_start
    return data


if __name__ == "__main__":
    sys.exit(main())

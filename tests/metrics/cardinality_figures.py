"""Figures (not a test): the picker's /metrics size, series and RSS after 15,000 random client
model names and one 1 MiB name go through Telemetry.routed/finished.

    .venv/bin/python -m tests.metrics.cardinality_figures            # the pool knows no model names
    .venv/bin/python -m tests.metrics.cardinality_figures --known    # the pods report their model
    git show 2083a46~1:epp/telemetry.py > /tmp/old_telemetry.py      # before the label bound:
    .venv/bin/python -m tests.metrics.cardinality_figures --module /tmp/old_telemetry.py

Prints only.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import string
import sys
import time
from types import ModuleType

from prometheus_client import generate_latest

from epp.datastore import Datastore, Metrics
from epp.director import RequestContext
from epp.scheduling.framework import SchedulingRequest


def rss_mib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def load(path: str | None) -> ModuleType:
    if path is None:
        import epp.telemetry

        return epp.telemetry
    spec = importlib.util.spec_from_file_location("telemetry_under_test", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--module", help="a telemetry.py to measure instead of epp.telemetry")
    ap.add_argument("--known", action="store_true", help="the pod reports the model it serves")
    ap.add_argument("--names", type=int, default=15_000)
    args = ap.parse_args()
    telemetry = load(args.module).Telemetry()
    ds = Datastore("pool", "ns")
    ds.set_static_endpoints(["10.0.0.1:8000"])
    ep = ds.endpoints["10.0.0.1:8000"]
    if args.known:
        ep.metrics = Metrics(models=frozenset({"base"}), updated=time.monotonic())
    telemetry.refresh_pool(ds, 2.0)
    rng = random.Random(1)
    names = ["".join(rng.choices(string.ascii_lowercase, k=12)) for _ in range(args.names)] + ["x" * (1 << 20)]
    before = rss_mib()
    for name in names:
        now = time.perf_counter()
        ctx = RequestContext(
            request_id="r", sched=SchedulingRequest(request_id="r", model=name, client_model=name), endpoints=[ep],
            client_model=name, target_model=name, stream=False, api="chat", request_size=100, started=now - 0.2,
            routed_at=now - 0.19, first_byte_at=now - 0.1, served=ep, usage_prompt=10, usage_completion=5,
            response_size=50, status="200")
        telemetry.routed(ctx)
        telemetry.finished(ctx)
    page = generate_latest(telemetry.registry)
    series = sum(1 for line in page.splitlines() if line and not line.startswith(b"#"))
    print(f"{args.module or 'epp.telemetry'}{' (pool knows its model)' if args.known else ''}: "
          f"/metrics {len(page) / 1e6:.1f} MB, {series} series; RSS {before} -> {rss_mib()} MiB")


if __name__ == "__main__":
    main()

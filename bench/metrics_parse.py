"""CPU per /metrics page: our targeted scanner vs prometheus_client's parser, same page, same run.

    .venv/bin/python bench/metrics_parse.py [ROUNDS]

The page is the 40 KB vLLM-shaped page from ../shared/bench-floor/vllm_page.py. Figures are CPU
time (time.process_time) per page, the best of ROUNDS rounds (default 5); no assertions.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "shared" / "bench-floor"))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from vllm_page import page  # noqa: E402

from epp.metrics.engines import ENGINES, read_metrics  # noqa: E402
from epp.metrics.parse import scan  # noqa: E402


def per_call(fn: Callable[[], object], n: int, rounds: int) -> float:
    """Best-of-rounds CPU seconds per call."""
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t) / n)
    return best


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    text = page()
    raw = text.encode()
    old = raw.replace(b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc")
    spec = ENGINES["vllm"]
    filtered = "".join(
        line + "\n" for line in text.splitlines() if any(n in line for n in spec.names)
    ).encode()

    def reference() -> None:
        for fam in text_string_to_metric_families(text):
            for _ in fam.samples:
                pass

    six = list(spec.names)
    rows = [
        ("prometheus_client text_string_to_metric_families (full parse)", per_call(reference, 20, rounds)),
        (f"scan(): the {len(spec.primary_names)} primary vLLM names, bytes in", per_call(
            lambda: scan(raw, spec.primary_names), 2000, rounds)),
        (f"scan(): all {len(six)} names incl. the absent older KV name", per_call(
            lambda: scan(raw, six), 2000, rounds)),
        ("read_metrics(): page -> Metrics (decode + scan + mapping)", per_call(
            lambda: read_metrics(spec, raw, 0.0), 2000, rounds)),
        ("read_metrics(): older vLLM page (gpu_cache_usage_perc)", per_call(
            lambda: read_metrics(spec, old, 0.0), 2000, rounds)),
        (f"read_metrics(): ?name[]= filtered reply ({len(filtered)} B)", per_call(
            lambda: read_metrics(spec, filtered, 0.0), 5000, rounds)),
    ]
    print(f"page: {len(raw)} bytes, {text.count(chr(10))} lines (vllm_page.page()); best of {rounds} rounds, CPU time")
    width = max(len(r[0]) for r in rows)
    base = rows[0][1]
    for label, secs in rows:
        print(f"  {label:<{width}}  {secs * 1e6:9.1f} us/page   ({base / secs:7.0f}x)")
    print("goal: <= 50 us CPU per 40 KB page for the picker's names")


if __name__ == "__main__":
    main()

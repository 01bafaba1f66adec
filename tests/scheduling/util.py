"""Builders shared by the scheduling tests: endpoints with fresh metrics, requests, cycles."""

from __future__ import annotations

import time
from collections.abc import Iterable

from hypothesis import strategies as st

from epp.datastore import Endpoint, Metrics
from epp.scheduling.cycle import Cycle
from epp.scheduling.framework import SchedulingRequest


def ep(n: int, *, waiting: float = 0, running: float = 0, kv: float = 0.0, lora_max: int = 0,
       lora_running: Iterable[str] = (), lora_waiting: Iterable[str] = (), inflight: int = 0,
       inflight_tokens: int = 0, labels: dict[str, str] | None = None, age: float = 0.0,
       metrics: bool = True, scrape_ok: bool = True, block_size: int = 0, num_blocks: int = 0,
       models: Iterable[str] = ()) -> Endpoint:
    """Endpoint 10.0.0.<n>:8000; metrics scraped `age` seconds ago (None with metrics=False).

    age=0 stamps the metrics an hour ahead, so they stay fresh however slowly a test runs."""
    m = None
    now = time.monotonic()
    if metrics:
        m = Metrics(waiting=waiting, running=running, kv_usage=kv, lora_max=lora_max,
                    lora_running=frozenset(lora_running), lora_waiting=frozenset(lora_waiting),
                    block_size=block_size, num_blocks=num_blocks, models=frozenset(models),
                    updated=now + 3600 if age == 0 else now - age)
    ip = f"10.0.0.{n}"
    return Endpoint(address=f"{ip}:8000", ip=ip, port=8000, pod=f"default/pod-{n}", labels=labels or {},
                    metrics=m, scrape_ok=scrape_ok, inflight=inflight, inflight_tokens=inflight_tokens)


def req(prompt: str = "", *, model: str = "m", priority: int = 0, headers: dict[str, str] | None = None,
        rid: str = "r") -> SchedulingRequest:
    return SchedulingRequest(request_id=rid, model=model, priority=priority, headers=headers or {}, prompt=prompt)


def cycle(request: SchedulingRequest | None = None, stale_after: float = 0.2) -> Cycle:
    """A decision's cycle at the current monotonic time."""
    return Cycle(request or req(), time.monotonic(), stale_after)


@st.composite
def endpoints(draw: st.DrawFn, min_size: int = 1, max_size: int = 16) -> list[Endpoint]:
    """Hypothesis strategy: distinct endpoints with arbitrary (sometimes stale or missing) metrics."""
    n = draw(st.integers(min_size, max_size))
    adapters = st.sampled_from("abc")
    row = st.tuples(st.integers(0, 50), st.integers(0, 200), st.floats(0, 1), st.integers(0, 3),
                    st.frozensets(adapters, max_size=3), st.frozensets(adapters, max_size=2),
                    st.integers(0, 40), st.integers(0, 50_000), st.sampled_from([0, 0, 0, 10]), st.booleans())
    out = []
    for i, (w, r, kv, lm, lr, lw, inf, tok, age, has) in enumerate(draw(st.lists(row, min_size=n, max_size=n))):
        out.append(ep(i + 1, waiting=w, running=r, kv=kv, lora_max=lm, lora_running=lr, lora_waiting=lw,
                      inflight=inf, inflight_tokens=tok, age=age, metrics=has or i == 0))
    return out

"""Figures (not a test): RSS and CPU of the poller against an endless chunked stream beside 4 good pods.

    .venv/bin/python -m tests.metrics.hostile_figures 1   # with the page cap and backoff
    .venv/bin/python -m tests.metrics.hostile_figures 0   # without (the poller before issue 13.7)

The hostile server runs in this process too, so the CPU figure includes its side. Prints only.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import replace

from epp.metrics.engines import ENGINES
from epp.metrics.scrape import Scraper
from tests.metrics.cardinality_figures import rss_mib
from tests.metrics.test_hostile import Hostile
from tests.metrics.test_scrape import datastore

SECONDS = 5.0


async def main(caps: bool) -> None:
    h = await Hostile().start()
    routes = ["/good", "/good", "/good", "/good", "/endless"]
    ds = datastore(*(f"127.0.0.1:{p}" for p in h.ports))
    engines = {r: replace(ENGINES["vllm"], name=r, path=r) for r in set(routes)}
    for route, port in zip(routes, h.ports, strict=True):
        ds.endpoints[f"127.0.0.1:{port}"].engine = route
    limits: dict[str, float] = {} if caps else {"max_page_bytes": 1 << 40, "max_backoff": 0.05}
    scraper = Scraper(ds, interval=0.05, engines=engines, **limits)  # type: ignore[arg-type]
    before = peak = rss_mib()
    scraper.start()
    cpu0, t0 = time.process_time(), time.monotonic()
    while time.monotonic() - t0 < SECONDS:
        await asyncio.sleep(0.02)
        peak = max(peak, rss_mib())
    cpu = time.process_time() - cpu0
    await scraper.stop()
    await h.close()
    sent = [n >> 20 for n in h.sent.get("/endless", [])][:6]
    print(f"caps={'on' if caps else 'off'}: RSS before {before} MiB, peak {peak} MiB; process CPU "
          f"{100 * cpu / SECONDS:.0f}% of one core (server included); good polls {scraper.polls_ok}, failed "
          f"{scraper.polls_failed}; MiB written per stream before the poller hung up: {sent}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:] != ["0"]))

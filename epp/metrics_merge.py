"""One `/metrics` page for a picker of several `--workers`: worker 0's page merged with the others'.

Counters, histograms and summaries are summed series by series (a `_created` sample keeps the
earliest time). Gauges are worker 0's, as every worker reads the same pool (its averages, ready pods,
saturation, build info), except the few that count a worker's own requests, which are summed.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

log = logging.getLogger("epp.metrics_merge")

# gauges of a worker's own requests (both names of each): the picker's figure is the sum
SUMMED_GAUGES = frozenset({
    "inference_objective_running_requests", "llm_d_epp_request_running",
    "inference_extension_prefix_indexer_size",
})
SUMMED_GAUGE_SUFFIXES = ("flow_control_queue_size", "flow_control_queue_bytes")
PEER_TIMEOUT = 2.0


def _summed(fam: Metric) -> bool:
    if fam.type in ("counter", "histogram", "summary", "gaugehistogram"):
        return True
    return fam.type == "gauge" and (fam.name in SUMMED_GAUGES or fam.name.endswith(SUMMED_GAUGE_SUFFIXES))


def merge(texts: Sequence[str]) -> bytes:
    """The pages in `texts` (worker 0's first) as one page, in the first page's family order."""
    families: dict[str, Metric] = {}
    series: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            have = families.get(fam.name)
            if have is None:
                families[fam.name] = fam
                series[fam.name] = {(s.name, tuple(sorted(s.labels.items()))): s for s in fam.samples}
                continue
            if have.type != fam.type:
                continue  # not one family: worker 0's wins
            summed = _summed(have)
            table = series[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                old = table.get(key)
                if old is None:
                    table[key] = s
                elif s.name.endswith("_created"):
                    table[key] = old._replace(value=min(old.value, s.value))
                elif summed:
                    table[key] = old._replace(value=old.value + s.value)
    out: list[Metric] = []
    for name, fam in families.items():
        fam.samples = list(series[name].values())
        out.append(fam)

    class _Merged:
        def collect(self) -> Iterator[Metric]:
            return iter(out)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())  # type: ignore[arg-type]
    return generate_latest(registry)


def fetch_pages(ports: Sequence[int], timeout: float = PEER_TIMEOUT) -> list[str]:
    """The other workers' pages (loopback, no auth: they listen on 127.0.0.1 only); a worker that
    does not answer is left out, with a warning."""
    pages: list[str] = []
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
                pages.append(resp.read().decode("utf-8", "replace"))
        except OSError as e:
            log.warning("a worker's metrics were not read; the page lacks its requests",
                        extra={"port": port, "error": str(e)})
    return pages

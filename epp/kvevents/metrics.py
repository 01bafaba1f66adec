"""Prometheus metrics of the precise index and its subscriber, rendered at scrape time from their
counters (nothing on the event path touches prometheus_client).

Names follow llm-d's (`llm_d_router_epp_kv_cache_*`), plus ours for the index size, gaps and
replays. `register(registry, producer)` adds them to a picker's registry (the server wiring calls it
for every precise-prefix-cache-producer).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

P = "llm_d_router_epp_kv_cache_"


class KVEventsCollector(Collector):
    """Reads one producer's index and subscriber stats at each scrape."""

    def __init__(self, producer: Any) -> None:
        self.producer = producer

    def collect(self) -> Iterator[Any]:
        idx = self.producer.kv_index
        st = idx.stats
        name = self.producer.name
        labels = ["producer"]

        def counter(n: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(P + n, doc, labels=labels)
            c.add_metric([name], v)
            return c

        def gauge(n: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(P + n, doc, labels=labels)
            g.add_metric([name], v)
            return g

        yield counter("index_admissions", "KV blocks stored by engine events.", st.stored_blocks)
        yield counter("index_evictions", "KV blocks removed by engine events.", st.removed_blocks)
        yield counter("index_lookup_requests", "Lookups of requests' prefixes.", st.lookups)
        yield counter("index_lookup_hits", "Blocks of looked-up prefixes the best endpoint held.",
                      st.lookup_hit_blocks)
        yield counter("index_lookup_blocks", "Blocks of looked-up prefixes.", st.lookup_blocks)
        yield gauge("index_size", "Engine blocks held in the precise index, over all endpoints.", idx.entries)
        yield gauge("index_speculative_entries", "Speculative entries (routed, not yet confirmed).",
                    idx.speculative_entries)
        yield gauge("events_endpoints", "Endpoints that have published KV events.", len(idx.addresses()))
        yield counter("events_duplicate_stores", "Stores of blocks already held.", st.duplicate_stores)
        yield counter("events_unknown_removals", "Removals of blocks not held.", st.unknown_removals)
        yield counter("events_unknown_parents", "Stores whose parent block was not indexed.", st.unknown_parents)
        yield counter("events_stores_skipped", "Events not indexed (other KV groups, inconsistent).",
                      st.skipped_events)
        yield counter("index_bound_evictions", "Blocks dropped by the index's memory bounds.", st.evicted)
        sub = self.producer.subscriber
        if sub is not None:
            s = sub.stats
            yield gauge("events_active_subscribers", "ZMQ sources listened to.", len(sub.sources()))
            yield counter("events_messages_received", "KV-event messages received.", s.messages)
            yield counter("events_malformed", "Messages that did not decode.", s.malformed)
            yield counter("events_gaps", "Sequence gaps seen.", s.gaps)
            yield counter("events_missed", "Messages the gaps skipped.", s.missed)
            yield counter("events_replays", "Replays requested.", s.replays)
            yield counter("events_replay_failures", "Replays that did not complete.", s.replay_failures)
            yield counter("events_resets", "Event streams that restarted (engine restarts).", s.resets)


def register(registry: CollectorRegistry, producer: Any) -> KVEventsCollector:
    c = KVEventsCollector(producer)
    registry.register(c)
    return c

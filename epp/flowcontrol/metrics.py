"""Flow-control metrics under the reference's names, labels and buckets.

GIE v1.5.0 exports `inference_extension_flow_control_*`; llm-d v0.10.0 the same families as
`llm_d_epp_flow_control_*` (rendered again at scrape time, as epp.telemetry does for the rest) plus
two of its own: `llm_d_epp_flow_control_stale_endpoints{detector}` and
`llm_d_epp_flow_control_requests_total{outcome,priority,inference_pool}`.

Fairness ids come from a client header: at most `max_fairness_ids` distinct values keep their
label, the rest are `other` (as model names are bounded in epp.telemetry).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from epp.flowcontrol.types import Item
from epp.telemetry import MODEL_LABELS, LabelBound, LlmdCopies

QUEUE_DURATION_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                          30.0, 60.0)
CYCLE_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
MAX_FAIRNESS_IDS = 100

_GIE = "inference_extension_flow_control_"
_LLMD = "llm_d_epp_flow_control_"
_COPIED = ("request_queue_duration_seconds", "dispatch_cycle_duration_seconds", "queue_size", "queue_bytes",
           "pool_saturation")


class FlowControlMetrics:
    """The controller's Metrics hooks, on one registry (the picker's)."""

    def __init__(self, registry: CollectorRegistry | None = None, pool_name: str = "", *,
                 detector: str = "utilization-detector", llmd_names: bool = True,
                 max_fairness_ids: int = MAX_FAIRNESS_IDS) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.pool = pool_name
        self.detector = detector
        self.fairness = LabelBound(max_fairness_ids)
        self.models = LabelBound()
        flow_labels = ("fairness_id", "priority", "inference_pool", *MODEL_LABELS)
        self.queue_duration = Histogram(
            _GIE + "request_queue_duration_seconds",
            "Distribution of total time requests spend in the Flow Control layer (from enqueue to final outcome).",
            ("fairness_id", "priority", "outcome", "inference_pool", *MODEL_LABELS),
            buckets=QUEUE_DURATION_BUCKETS, registry=r)
        self.cycle_duration = Histogram(
            _GIE + "dispatch_cycle_duration_seconds",
            "Distribution of time taken for each internal dispatch cycle in the Flow Control layer.",
            buckets=CYCLE_BUCKETS, registry=r)
        self.queue_size = Gauge(_GIE + "queue_size",
                                "Current number of requests actively held in the Flow Control queue.",
                                flow_labels, registry=r)
        self.queue_bytes = Gauge(_GIE + "queue_bytes",
                                 "Current total size in bytes of requests actively held in the Flow Control queue.",
                                 flow_labels, registry=r)
        self.saturation = Gauge(_GIE + "pool_saturation",
                                "Pool saturation signal gating Flow Control dispatch (1.0 is the gating set point; "
                                "an empty pool reads as 1.0).", ("inference_pool",), registry=r)
        self.stale = Gauge(_LLMD + "stale_endpoints",
                           "Number of candidate endpoints whose metrics are missing or older than the staleness "
                           "threshold, as of the most recent saturation evaluation.", ("detector",), registry=r)
        self.requests = Counter(_LLMD + "requests", "Total number of requests processed by the Flow Control layer.",
                                ("outcome", "priority", "inference_pool"), registry=r)
        if llmd_names:
            r.register(LlmdCopies([self.queue_duration, self.cycle_duration, self.queue_size, self.queue_bytes,
                                   self.saturation],
                                  {_GIE + n: (_LLMD + n, {}) for n in _COPIED}))
        self._sat_child = self.saturation.labels(pool_name)
        self._stale_child = self.stale.labels(detector)
        self._gauges: dict[tuple[str, ...], tuple[Any, Any]] = {}

    def _flow(self, item: Item) -> tuple[str, ...]:
        return (self.fairness(item.key.fairness_id), str(item.key.priority), self.pool, self.models(item.model),
                self.models(item.target_model))

    def queued(self, item: Item, delta: int) -> None:
        labels = self._flow(item)
        pair = self._gauges.get(labels)
        if pair is None:
            pair = self._gauges[labels] = (self.queue_size.labels(*labels), self.queue_bytes.labels(*labels))
        pair[0].inc(delta)
        pair[1].inc(delta * item.byte_size)

    def finished(self, item: Item, seconds: float) -> None:
        outcome = item.outcome.value if item.outcome is not None else "NotYetFinalized"
        f = self._flow(item)
        self.queue_duration.labels(f[0], f[1], outcome, self.pool, f[3], f[4]).observe(seconds)
        self.requests.labels(outcome, f[1], self.pool).inc()

    def cycle(self, seconds: float) -> None:
        self.cycle_duration.observe(seconds)

    def watch(self, controller: Any) -> None:
        """Pool saturation and stale endpoints are read from the controller at scrape time (true
        whether or not anything is queued)."""
        self._sat_child.set_function(controller.saturation)
        self._stale_child.set_function(controller.stale_count)

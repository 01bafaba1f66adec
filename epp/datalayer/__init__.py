"""Data layer plugins: where endpoint data comes from (sources) and how it is read (extractors).

The config's `dataLayer.sources[{pluginRef, extractors[{pluginRef}]}]` wires them (see README.md);
`DataLayerConfig` is what the scraper takes from them (`PickerConfig.data_layer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class DataLayerConfig:
    """How to scrape model servers, from the config's metrics-data-source and core-metrics-extractor.

    `port` None = the endpoint's own port; `interval` None = the picker's refresh interval.
    `engine_metrics` is in the `engineMetrics` section's format (epp.metrics.engines.apply_overrides),
    converted from the extractor's `engineConfigs`; `custom_metrics` maps attribute keys to metric
    selectors (engine name -> ((attribute, selector), ...)) for Metrics.custom."""

    scheme: str = "http"
    path: str = "/metrics"
    port: int | None = None
    insecure_skip_verify: bool = True
    ca_cert_path: str = ""
    client_cert_path: str = ""
    client_key_path: str = ""
    interval: float | None = None
    engine_label_key: str = "llm-d.ai/engine-type"
    default_engine: str = "vllm"
    engine_metrics: Mapping[str, Any] = field(default_factory=dict)
    custom_metrics: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    endpoint_notifications: bool = False  # an endpoint-notification-source is wired
    metrics_enabled: bool = True  # False when the config wires sources but no metrics-data-source
    sources: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (source plugin, its extractor plugins)

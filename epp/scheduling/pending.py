"""Plugin types of the reference (GIE v1.5.0, llm-d router v0.10.0) that this picker knows by name
but does not implement yet: a config naming one is refused with "not yet supported (<feature>)"
rather than "unknown plugin type", so the operator learns which feature is missing.

Types registered by a module in `registry.BUILTIN_MODULES` win over this table: when the module of
a pending type lands (the parsers, the request-control plugins), the type simply becomes available.
"""

from __future__ import annotations

PD = "P/D disaggregation"
PRECISE = "precise prefix-cache routing"
FLOW = "flow control"
LATENCY = "latency prediction and SLO routing"
MULTIMODAL = "multimodal embeddings cache"
DCGM = "DCGM GPU metrics"
TOPOLOGY = "topology-aware routing"
MULTICLUSTER = "multi-cluster routing"
DISCOVERY = "endpoint discovery plugins"
PARSERS = "request parsers (epp/parsers)"
REQUEST_CONTROL = "request-control plugins (epp/requestcontrol)"
VLLMGRPC = "vLLM gRPC requests (epp/parsers/vllmgrpc.py)"

_BY_FEATURE: dict[str, tuple[str, ...]] = {
    PD: ("disaggregatedset-rollout-screener", "disaggregatedset-rollout-pod-extractor", "p2p-source-producer"),
    PRECISE: ("precise-prefix-cache-producer", "precise-prefix-cache-scorer", "burst-prefix-cache-producer",
              "tokenizer"),
    FLOW: ("global-strict-fairness-policy", "round-robin-fairness-policy", "program-aware-fairness",
           "fcfs-ordering-policy", "edf-ordering-policy", "slo-deadline-ordering-policy",
           "soft-reflective-ceiling-policy", "priority-holdback-policy", "static-usage-limit-policy",
           "sheddable-eviction-filter", "priority-then-time-eviction-order-policy"),
    LATENCY: ("predicted-latency-producer", "latency-scorer", "slo-headroom-tier-filter", "latency-slo-admitter",
              "context-length-aware", "token-load-scorer"),
    MULTIMODAL: ("mm-embeddings-cache-producer", "mm-embeddings-cache-scorer"),
    DCGM: ("dcgm-data-source", "dcgm-extractor"),
    TOPOLOGY: ("topology-extractor", "topology-affinity-filter", "topology-affinity-scorer"),
    MULTICLUSTER: ("multicluster-metrics-data-source", "multicluster-metrics-extractor",
                   "multicluster-approx-prefix-cache-producer", "multicluster-prefix-cache-scorer",
                   "multicluster-queue-scorer", "multicluster-kv-cache-utilization-scorer",
                   "multicluster-session-affinity-filter", "multicluster-file-discovery"),
    DISCOVERY: ("file-discovery", "k8s-notification-source", "models-data-source", "models-data-extractor",
                "local-syncer", "cross-replica-publisher"),
    PARSERS: ("openai-parser", "passthrough-parser", "anthropic-parser", "vertexai-parser", "vllmhttp-parser"),
    VLLMGRPC: ("vllmgrpc-parser",),
    REQUEST_CONTROL: ("destination-endpoint-served-verifier", "request-attribute-reporter", "agent-identity",
                      "session-id-producer", "inflight-load-producer"),
    "header-based profile selection": ("header-profile-handler",),
    "utilization filter": ("utilization-filter",),
    "label-affinity scoring": ("header-label-affinity-scorer", "by-label", "by-label-selector"),
    "session affinity filter": ("session-affinity-filter",),
}

# type name -> the feature it belongs to
PENDING: dict[str, str] = {t: feature for feature, types in _BY_FEATURE.items() for t in types}

# Prefixes of experimental families: any type starting with one is refused with its feature too.
PENDING_PREFIXES: tuple[tuple[str, str], ...] = (
    ("predicted-latency-", LATENCY),
    ("mm-embeddings-cache-", MULTIMODAL),
    ("dcgm-", DCGM),
    ("topology-", TOPOLOGY),
    ("multicluster-", MULTICLUSTER),
)


def pending_feature(type_name: str) -> str | None:
    """The feature a known-but-unimplemented plugin type belongs to, or None."""
    feature = PENDING.get(type_name)
    if feature is not None:
        return feature
    for prefix, feat in PENDING_PREFIXES:
        if type_name.startswith(prefix):
            return feat
    return None

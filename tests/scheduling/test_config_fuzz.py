"""Arbitrary documents built from the config's own vocabulary: load_config either returns a config
that builds a scheduler, or raises ConfigError — never another exception."""

from __future__ import annotations

import random

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epp.scheduling.config import ConfigError, build_admission, build_scheduler, load_config
from epp.scheduling.registry import REGISTRY, plugin_type

plugin_type("queue-scorer")  # load the registry
TYPES = [*sorted(REGISTRY), "disagg-profile-handler", "nope-scorer", "fcfs-ordering-policy"]
KEYS = ["apiVersion", "kind", "plugins", "schedulingProfiles", "saturationDetector", "dataLayer", "data",
        "flowControl", "parser", "requestHandler", "featureGates", "loadGuard", "engineMetrics", "preset",
        "name", "type", "parameters", "pluginRef", "weight", "sources", "extractors", "parsers", "priorityBands",
        "priority", "maxBytes", "maxRequests", "defaultRequestTTL", "queueDepthThreshold", "kvCacheUtilThreshold",
        "metricsStalenessThreshold", "maxNumOfEndpoints", "prefixMatchInfoProducerName", "threshold",
        "attributeKey", "algorithm", "injectDefaults", "enabledWhen", "mode", "engineConfigs"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
                    st.sampled_from([*TYPES, "1Gi", "200ms", "x", "", "llm-d.ai/v1alpha1", "EndpointPickerConfig"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)), max_leaves=25)


def plugin_entry() -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({"type": st.sampled_from(TYPES)},
                                 optional={"name": st.sampled_from(["a", "b", "queue-scorer"]),
                                           "parameters": st.dictionaries(st.sampled_from(KEYS), scalars, max_size=3)})


docs = st.fixed_dictionaries(
    {"apiVersion": st.sampled_from(["llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1"]),
     "kind": st.just("EndpointPickerConfig")},
    optional={
        "plugins": st.lists(plugin_entry(), max_size=5),
        "schedulingProfiles": st.lists(st.fixed_dictionaries(
            {"name": st.sampled_from(["d", "e"]),
             "plugins": st.lists(st.fixed_dictionaries({"pluginRef": st.sampled_from([*TYPES[:12], "a", "b"])},
                                                       optional={"weight": scalars}), max_size=4)}), max_size=2),
        "saturationDetector": values, "dataLayer": values, "flowControl": values, "parser": values,
        "requestHandler": values, "featureGates": values, "loadGuard": values, "engineMetrics": values,
    })


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs)
def test_load_config_only_raises_config_error(doc):
    try:
        cfg = load_config(yaml.safe_dump(doc))
    except ConfigError as e:
        assert str(e)
        return
    build_scheduler(cfg, rng=random.Random(0))
    build_admission(cfg)

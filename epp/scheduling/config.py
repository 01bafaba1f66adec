"""EndpointPickerConfig: parse and validate the picker's YAML, then build the scheduler and admission.

The shape follows the reference (`apiVersion: inference.networking.x-k8s.io/v1alpha1`,
`kind: EndpointPickerConfig`, `plugins[{name, type, parameters}]`,
`schedulingProfiles[{name, plugins[{pluginRef, weight}]}]`, `saturationDetector`, `featureGates`),
plus sections of our own: `preset`, `loadGuard`, `engineMetrics` (passed through to the metrics
layer), `saturationDetector.headroomGuard` and the profile entry field `enabledWhen`. Every field
is checked; errors are ConfigError whose message starts with the field's path. docs/scheduling.md
describes every field.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from epp.scheduling.admission import Admission
from epp.scheduling.loadguard import LoadGuard
from epp.scheduling.profile import ProfileScheduler, WeightedScorer
from epp.scheduling.registry import (
    FILTER,
    HANDLER,
    PICKER,
    SCORER,
    BuildContext,
    ConfigError,
    NoParams,
    Params,
    plugin_type,
    register,
)
from epp.scheduling.saturation import (
    DEFAULT_KV_THRESHOLD,
    DEFAULT_QUEUE_THRESHOLD,
    DEFAULT_STALENESS,
    SaturationDetector,
)

log = logging.getLogger("epp.scheduling.config")

API_VERSION = "inference.networking.x-k8s.io/v1alpha1"
KIND = "EndpointPickerConfig"
WHEN_ADAPTERS = "poolServesAdapters"
DEFAULT_PICKER = "max-score-picker"

# Sections of the reference's config this picker does not implement: refused by name, not as unknown.
_UNSUPPORTED = ("data", "dataLayer", "flowControl", "requestHandler", "parser")

__all__ = [
    "DEFAULT_CONFIG_TEXT",
    "PRESETS",
    "REFERENCE_CONFIG_TEXT",
    "ConfigError",
    "PickerConfig",
    "build_admission",
    "build_scheduler",
    "load_config",
]


@register("single-profile-handler", HANDLER)
class SingleProfileHandler(NoParams):
    """Accepted for compatibility with reference configs: this picker always runs one profile."""

    def __init__(self, name: str, params: None, ctx: BuildContext) -> None:
        self.name = name


@dataclass(frozen=True, slots=True)
class PluginSpec:
    """A validated `plugins[]` entry; `params` is what the plugin type's parse() returned."""

    name: str
    type: str
    kind: str
    params: Any


@dataclass(frozen=True, slots=True)
class ProfileEntry:
    """One `pluginRef` in a profile; weight applies to scorers only."""

    plugin: str
    weight: float = 1.0
    only_with_lora: bool = False


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    name: str
    entries: tuple[ProfileEntry, ...]


@dataclass(frozen=True, slots=True)
class PickerConfig:
    """A validated picker configuration."""

    plugins: tuple[PluginSpec, ...]
    profile: ProfileSpec
    saturation: SaturationDetector = field(default_factory=SaturationDetector)
    load_guard: LoadGuard = field(default_factory=LoadGuard)
    feature_gates: tuple[str, ...] = ()
    engine_metrics: Mapping[str, Any] | None = None  # consumed by epp.metrics.engines
    preset: str = "default"  # the preset the plugins/profile came from, or "custom"
    raw: Mapping[str, Any] = field(default_factory=dict)  # the parsed document, for logging

    def plugin(self, name: str) -> PluginSpec:
        for p in self.plugins:
            if p.name == name:
                return p
        raise KeyError(name)


# ---- presets -------------------------------------------------------------------------------------
REFERENCE_CONFIG_TEXT = f"""\
apiVersion: {API_VERSION}
kind: {KIND}
# Exactly the reference picker's default profile, with our additions switched off.
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
loadGuard:
  enabled: false
saturationDetector:
  headroomGuard: false
"""

DEFAULT_CONFIG_TEXT = f"""\
apiVersion: {API_VERSION}
kind: {KIND}
# The reference default plus: LoRA affinity when the pool serves adapters (adapter residency is a
# cache like the prefix, same weight) and the in-flight load scorer (spreads bursts between scrapes,
# weight 1: a tie-breaker that never outvotes measured load). The load guard on affinity is off: in
# the routing-quality benchmark (docs/benchmarks.md) it cost prefix hits, and so TTFT, under bursts
# while the soft load scorers already kept popular prefixes from piling up.
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: lora-affinity-scorer
- type: inflight-load-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: lora-affinity-scorer
    weight: 3
    enabledWhen: {WHEN_ADAPTERS}
  - pluginRef: inflight-load-scorer
    weight: 1
  - pluginRef: max-score-picker
loadGuard:
  enabled: false
"""

PRESETS: dict[str, str] = {"default": DEFAULT_CONFIG_TEXT, "reference": REFERENCE_CONFIG_TEXT}


# ---- loading -------------------------------------------------------------------------------------
def load_config(text: str | None) -> PickerConfig:
    """Parse and validate an EndpointPickerConfig; None or blank text gives the default preset."""
    if text is None or not text.strip():
        return preset_config("default")
    return _parse_doc(_yaml(text))


def preset_config(name: str) -> PickerConfig:
    """A named preset ("default" or "reference")."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset \"{name}\"; known: {', '.join(PRESETS)}")
    cfg = _parse_doc(_yaml(PRESETS[name]))
    return dataclasses.replace(cfg, preset=name)


def _yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("", f"not valid YAML{where}: {problem}") from None


def _parse_doc(doc: Any) -> PickerConfig:
    if not isinstance(doc, Mapping):
        raise ConfigError("", f"the config must be a YAML mapping (an {KIND}), got {type(doc).__name__}")
    top = Params(doc, "")
    api = top.get("apiVersion")
    if api != API_VERSION:
        raise ConfigError("apiVersion", f"must be {API_VERSION!r}, got {api!r}")
    kind = top.get("kind")
    if kind != KIND:
        raise ConfigError("kind", f"must be {KIND!r}, got {kind!r}")
    for name in _UNSUPPORTED:
        if name in top.raw:
            raise ConfigError(name, "not supported by this picker")

    preset = top.string("preset", "", choices=tuple(PRESETS)) if top.has("preset") else ""
    top.get("preset")
    has_plugins, has_profiles = top.has("plugins"), top.has("schedulingProfiles")
    if has_plugins != has_profiles:
        missing = "schedulingProfiles" if has_plugins else "plugins"
        raise ConfigError(missing, "required when " + ("plugins" if has_plugins else "schedulingProfiles")
                          + " is given")
    if has_plugins and preset:
        raise ConfigError("preset", "give either a preset or plugins and schedulingProfiles, not both")

    base: Mapping[str, Any] = {}
    if not has_plugins:
        preset = preset or "default"
        base = _yaml(PRESETS[preset])
        plugins, profile = _parse_plugins(base["plugins"], base["schedulingProfiles"])
        top.get("plugins")
        top.get("schedulingProfiles")
    else:
        plugins, profile = _parse_plugins(top.get("plugins"), top.get("schedulingProfiles"))

    base_top = Params(base, "")
    saturation = _parse_saturation(top.sub("saturationDetector"), base_top.get("saturationDetector") or {})
    guard = _parse_guard(top.sub("loadGuard"), base_top.get("loadGuard") or {})

    gates_raw = top.get("featureGates")
    gates: tuple[str, ...] = ()
    if gates_raw is not None:
        if not isinstance(gates_raw, list):
            raise ConfigError("featureGates", f"expected a list of strings, got {type(gates_raw).__name__}")
        for i, g in enumerate(gates_raw):
            if not isinstance(g, str) or not g:
                raise ConfigError(f"featureGates[{i}]", f"expected a non-empty string, got {g!r}")
        gates = tuple(gates_raw)
        if gates:
            log.info("feature gates set (none change this picker's scheduling)", extra={"gates": list(gates)})

    engine = top.get("engineMetrics")
    if engine is not None and not isinstance(engine, Mapping):
        raise ConfigError("engineMetrics", f"expected a mapping, got {type(engine).__name__}")
    top.done()
    return PickerConfig(
        plugins=plugins,
        profile=profile,
        saturation=saturation,
        load_guard=guard,
        feature_gates=gates,
        engine_metrics=dict(engine) if engine is not None else None,
        preset=preset or "custom",
        raw=dict(doc),
    )


def _parse_saturation(p: Params, base: Mapping[str, Any]) -> SaturationDetector:
    b = Params(base, "saturationDetector")
    d = SaturationDetector(
        queue_threshold=b.number("queueDepthThreshold", DEFAULT_QUEUE_THRESHOLD),
        kv_threshold=b.number("kvCacheUtilThreshold", DEFAULT_KV_THRESHOLD),
        stale_after=b.duration("metricsStalenessThreshold", DEFAULT_STALENESS),
        headroom_guard=b.boolean("headroomGuard", True),
    )
    out = SaturationDetector(
        queue_threshold=p.number("queueDepthThreshold", d.queue_threshold, lo=0, lo_open=True),
        kv_threshold=p.number("kvCacheUtilThreshold", d.kv_threshold, lo=0, hi=1, lo_open=True),
        stale_after=p.duration("metricsStalenessThreshold", d.stale_after),
        headroom_guard=p.boolean("headroomGuard", d.headroom_guard),
    )
    p.done()
    return out


def _parse_guard(p: Params, base: Mapping[str, Any]) -> LoadGuard:
    b = Params(base, "loadGuard")
    d = LoadGuard(enabled=b.boolean("enabled", True))
    out = LoadGuard(
        enabled=p.boolean("enabled", d.enabled),
        queue_gap=p.number("queueGap", d.queue_gap, lo=0),
        inflight_gap=p.integer("inflightGap", d.inflight_gap, lo=0),
        inflight_ratio=p.number("inflightRatio", d.inflight_ratio, lo=1),
    )
    p.done()
    return out


def _parse_plugins(raw_plugins: Any, raw_profiles: Any) -> tuple[tuple[PluginSpec, ...], ProfileSpec]:
    if not isinstance(raw_plugins, list) or not raw_plugins:
        raise ConfigError("plugins", "expected a non-empty list of plugins")
    specs: dict[str, PluginSpec] = {}
    for i, raw in enumerate(raw_plugins):
        path = f"plugins[{i}]"
        p = Params(raw, path)
        type_name = p.string("type", "")
        if not type_name:
            raise ConfigError(p.field("type"), "required")
        pt = plugin_type(type_name)
        if pt is None:
            raise ConfigError(p.field("type"), f"unknown plugin type \"{type_name}\"")
        name = p.string("name", type_name)
        if name in specs:
            raise ConfigError(p.field("name"), f"duplicate plugin name \"{name}\"")
        params = pt.cls.parse(Params(p.get("parameters"), p.field("parameters")))
        p.done()
        specs[name] = PluginSpec(name=name, type=type_name, kind=pt.kind, params=params)

    if not isinstance(raw_profiles, list) or not raw_profiles:
        raise ConfigError("schedulingProfiles", "expected a non-empty list of profiles")
    if len(raw_profiles) > 1:
        raise ConfigError("schedulingProfiles", f"this picker runs exactly one profile; got {len(raw_profiles)}")
    path = "schedulingProfiles[0]"
    pp = Params(raw_profiles[0], path)
    pname = pp.string("name", "")
    if not pname:
        raise ConfigError(pp.field("name"), "required")
    refs = pp.get("plugins")
    if not isinstance(refs, list) or not refs:
        raise ConfigError(pp.field("plugins"), "expected a non-empty list of plugin references")
    pp.done()
    entries: list[ProfileEntry] = []
    seen: set[str] = set()
    picker: str | None = None
    for j, raw in enumerate(refs):
        rp = Params(raw, f"{path}.plugins[{j}]")
        ref = rp.get("pluginRef")
        if not isinstance(ref, str) or not ref:
            raise ConfigError(rp.field("pluginRef"), f"expected a plugin name, got {ref!r}")
        spec = specs.get(ref)
        if spec is None:
            raise ConfigError(rp.field("pluginRef"), f"no plugin named \"{ref}\"")
        if ref in seen:
            raise ConfigError(rp.field("pluginRef"), f"plugin \"{ref}\" is listed twice in this profile")
        seen.add(ref)
        if spec.kind == HANDLER:
            raise ConfigError(rp.field("pluginRef"), f"{spec.type} is a profile handler, not a profile plugin")
        weight = _weight(rp, spec)
        when = rp.string("enabledWhen", "", choices=(WHEN_ADAPTERS,)) if rp.has("enabledWhen") else ""
        rp.get("enabledWhen")
        if when and spec.kind != SCORER:
            raise ConfigError(rp.field("enabledWhen"), "only applies to scorers")
        if spec.kind == PICKER:
            if picker is not None:
                raise ConfigError(rp.field("pluginRef"), f"profile already has a picker (\"{picker}\")")
            picker = ref
        rp.done()
        entries.append(ProfileEntry(plugin=ref, weight=weight, only_with_lora=bool(when)))
    if picker is None:
        # As the reference does: a profile without a picker gets the max-score picker.
        name = DEFAULT_PICKER
        while name in specs:
            name = "_" + name
        pt = plugin_type(DEFAULT_PICKER)
        assert pt is not None
        specs[name] = PluginSpec(name, DEFAULT_PICKER, PICKER, pt.cls.parse(Params({}, "")))
        entries.append(ProfileEntry(plugin=name))
    return tuple(specs.values()), ProfileSpec(pname, tuple(entries))


def _weight(rp: Params, spec: PluginSpec) -> float:
    raw = rp.get("weight")
    if raw is None:
        return 1.0
    path = rp.field("weight")
    if spec.kind != SCORER:
        raise ConfigError(path, f"only scorers take a weight; \"{spec.name}\" is a {spec.kind}")
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ConfigError(path, f"expected a number, got {raw!r}")
    w = float(raw)
    if not math.isfinite(w) or w < 0:
        raise ConfigError(path, f"must be a finite number ≥ 0, got {raw!r}")
    return w


# ---- building ------------------------------------------------------------------------------------
def build_scheduler(
    cfg: PickerConfig,
    *,
    has_lora: bool | Callable[[], bool] = False,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ProfileScheduler:
    """A Scheduler running the config's profile. `has_lora` (a value, or a callable asked once per
    request that needs it) switches on scorers marked `enabledWhen: poolServesAdapters`; see
    epp.scheduling.scorers.pool_serves_adapters for a ready-made test over the candidates.
    `clock` is what metric staleness is judged against (the simulator passes its virtual clock)."""
    ctx = BuildContext(rng=rng or random.Random(), detector=cfg.saturation, guard=cfg.load_guard)
    built: dict[str, Any] = {}
    for spec in cfg.plugins:
        pt = plugin_type(spec.type)
        assert pt is not None
        built[spec.name] = pt.cls(spec.name, spec.params, ctx)
    filters, scorers, picker = [], [], None
    for e in cfg.profile.entries:
        plugin = built[e.plugin]
        kind = cfg.plugin(e.plugin).kind
        if kind == FILTER:
            filters.append(plugin)
        elif kind == SCORER:
            scorers.append(WeightedScorer(plugin, e.weight, e.only_with_lora))
        elif kind == PICKER:
            picker = plugin
    assert picker is not None
    lora_fn: Callable[[], bool]
    if callable(has_lora):
        lora_fn = has_lora
    else:
        value = bool(has_lora)

        def lora_fn() -> bool:
            return value

    return ProfileScheduler(cfg.profile.name, filters, scorers, picker,
                            stale_after=cfg.saturation.stale_after, has_lora=lora_fn, clock=clock)


def build_admission(cfg: PickerConfig) -> Admission:
    """The admission check (sheds sheddable requests while the pool is saturated)."""
    return Admission(cfg.saturation)


def describe(cfg: PickerConfig) -> str:
    """One line naming the profile's plugins and weights, for the startup log."""
    parts = []
    for e in cfg.profile.entries:
        spec = cfg.plugin(e.plugin)
        w = f" x{e.weight:g}" if spec.kind == SCORER else ""
        cond = " (with adapters)" if e.only_with_lora else ""
        parts.append(f"{spec.name}{w}{cond}")
    return f"preset={cfg.preset} profile={cfg.profile.name}: " + ", ".join(parts)


"""EndpointPickerConfig: parse and validate the picker's YAML, then build the scheduler and admission.

The shape is the reference's (GIE v1.5.0 and llm-d router v0.10.0): `apiVersion`
(`inference.networking.x-k8s.io/v1alpha1` or `llm-d.ai/v1alpha1`), `kind: EndpointPickerConfig`,
`plugins[{name, type, parameters}]`, `schedulingProfiles[{name, plugins[{pluginRef, weight}]}]`
chosen by a profile-handler plugin, `saturationDetector` (thresholds, or `{pluginRef}`),
`featureGates`, `dataLayer`, `parser` / `requestHandler.parsers`, `flowControl`; plus sections of
our own: `preset`, `loadGuard`, `engineMetrics` (passed through to the metrics layer),
`saturationDetector.headroomGuard` and the profile entry field `enabledWhen`.

Every field is checked and every problem is reported at once (ConfigErrors, each message starting
with the field's path). Plugin types the reference has and this picker does not implement yet are
refused as "not yet supported (<feature>)". docs/scheduling.md describes every field.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from epp.datalayer import DataLayerConfig
from epp.scheduling.admission import Admission
from epp.scheduling.dataparallel import DataParallelParams, DataParallelProfileHandler, DataParallelScheduler
from epp.scheduling.disagg import DisaggParams, DisaggProfileHandler, DisaggScheduler
from epp.scheduling.handlers import DEFAULT_HANDLER, SingleProfileHandler
from epp.scheduling.loadguard import LoadGuard
from epp.scheduling.profile import ProfileScheduler, WeightedScorer
from epp.scheduling.registry import (
    ADMITTER,
    DATA_SOURCE,
    DECIDER,
    EXTRACTOR,
    FILTER,
    FLOW_POLICY,
    HANDLER,
    PARSER,
    PICKER,
    PRODUCER,
    REQUEST_CONTROL,
    SATURATION,
    SCORER,
    BuildContext,
    ConfigError,
    Params,
    did_you_mean,
    lookup,
    plugin_type,
)
from epp.scheduling.saturation import (
    DEFAULT_KV_THRESHOLD,
    DEFAULT_QUEUE_THRESHOLD,
    DEFAULT_STALENESS,
    STALENESS_POLICIES,
    ConcurrencyDetector,
    SaturationDetector,
)

log = logging.getLogger("epp.scheduling.config")

API_VERSION = "inference.networking.x-k8s.io/v1alpha1"
API_VERSION_LLMD = "llm-d.ai/v1alpha1"
API_VERSIONS = (API_VERSION, API_VERSION_LLMD)
KIND = "EndpointPickerConfig"
WHEN_ADAPTERS = "poolServesAdapters"
DEFAULT_PICKER = "max-score-picker"
# Kinds a scheduling profile may list (a saturation detector acts as a filter there, as in the reference).
PROFILE_KINDS = (FILTER, SCORER, PICKER, SATURATION)
# Flow-control policies the reference creates by itself when a band names them without declaring them.
DEFAULT_POLICIES = ("global-strict-fairness-policy", "round-robin-fairness-policy", "fcfs-ordering-policy",
                    "edf-ordering-policy")

__all__ = [
    "API_VERSIONS",
    "DEFAULT_CONFIG_TEXT",
    "PRESETS",
    "REFERENCE_CONFIG_TEXT",
    "ConfigError",
    "ConfigErrors",
    "PickerConfig",
    "build_admission",
    "build_scheduler",
    "load_config",
]


class ConfigErrors(ConfigError):
    """Several problems found in one config; `errors` holds each (field path and message)."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors = tuple(errors)
        first = self.errors[0]
        super().__init__(first.field, first.message)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


def all_errors(e: ConfigError) -> tuple[ConfigError, ...]:
    """The single problems inside a ConfigError (several for ConfigErrors)."""
    return e.errors if isinstance(e, ConfigErrors) else (e,)


class _Problems:
    """Collects ConfigErrors so one pass reports every problem."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def add(self, e: ConfigError) -> None:
        self.errors.extend(all_errors(e))

    def run(self, fn: Callable[..., Any], *args: Any, default: Any = None) -> Any:
        try:
            return fn(*args)
        except ConfigError as e:
            self.add(e)
            return default

    def raise_if_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ConfigErrors(self.errors)


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
class PriorityBand:
    """One `flowControl` priority band (`defaultPriorityBand` has priority None)."""

    priority: int | None
    max_bytes: int | None = None  # None = the reference's default (1G a band)
    max_requests: int | None = None  # None = the reference's default (5000 a band)
    fairness_policy: str = ""  # "" = global-strict-fairness-policy
    ordering_policy: str = ""  # "" = fcfs-ordering-policy


@dataclass(frozen=True, slots=True)
class FlowControlConfig:
    """The `flowControl` section, validated; epp.flowcontrol.build turns it into a controller."""

    max_bytes: int | None = None  # None = unlimited
    max_requests: int | None = None
    default_request_ttl: float | None = None  # seconds
    default_band: PriorityBand | None = None
    default_negative_band: PriorityBand | None = None
    bands: tuple[PriorityBand, ...] = ()
    usage_limit_policy: str = ""
    saturation_detector: str = ""  # a pluginRef
    enable_eviction: bool = False


@dataclass(frozen=True, slots=True)
class PickerConfig:
    """A validated picker configuration.

    `profile` is the profile that runs (the handler's choice among `profiles`); `saturation` is the
    metrics-based detector (its staleness also governs the scorers); `detector` is what admission
    asks (the same object, or a concurrency detector named by pluginRef)."""

    plugins: tuple[PluginSpec, ...]
    profile: ProfileSpec
    saturation: SaturationDetector = field(default_factory=SaturationDetector)
    load_guard: LoadGuard = field(default_factory=LoadGuard)
    feature_gates: tuple[str, ...] = ()
    engine_metrics: Mapping[str, Any] | None = None  # consumed by epp.metrics.engines
    preset: str = "default"  # the preset the plugins/profile came from, or "custom"
    raw: Mapping[str, Any] = field(default_factory=dict)  # the parsed document, for logging
    profiles: tuple[ProfileSpec, ...] = ()
    handler: str = DEFAULT_HANDLER  # the profile handler plugin's name
    detector: SaturationDetector | ConcurrencyDetector | None = None  # None = `saturation`
    detector_plugin: str = ""  # the saturation detector plugin named or declared, "" = thresholds
    data_layer: DataLayerConfig = field(default_factory=DataLayerConfig)
    parser: PluginSpec | None = None
    parsers: tuple[PluginSpec, ...] = ()
    request_control: tuple[PluginSpec, ...] = ()
    admitters: tuple[PluginSpec, ...] = ()
    flow_control: FlowControlConfig | None = None
    api_version: str = API_VERSION
    warnings: tuple[str, ...] = ()

    def plugin(self, name: str) -> PluginSpec:
        for p in self.plugins:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def admission_detector(self) -> SaturationDetector | ConcurrencyDetector:
        return self.detector if self.detector is not None else self.saturation


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
# The reference default, changed where the routing benchmarks (docs/benchmarks.md: the
# discrete-event ones and the live run against the Rust routers) measured it better:
# - queue-scorer minSpread 4: a queue of 2 against 0 was worth the scorer's whole weight and moved
#   warm prefixes to cold pods; now small queues separate pods a little, long ones fully (with 8+
#   pods and hot prefixes that must spread over several, 2 measured better: docs/scheduling.md).
# - queue-scorer countInflight: what this picker sent a pod since its page was scraped counts as
#   queued, so a burst between two scrapes does not pile onto the pod that looked idle.
# - KV use weight 1 (was 2): it moved conversations off the pod holding them as their cache grew.
# - prefix matching over 1,024 blocks (64K characters, where prompts are cut) instead of 256, so
#   long conversations still tell their own pod apart.
# - no-hit-lru-scorer 0.5: prompts cached nowhere go to the pod least recently given one, so they
#   spread and stop evicting hot prefixes (half weight: under LoRA affinity's 0.6 for a loaded adapter).
# - LoRA affinity when the pool serves adapters (adapter residency is a cache like the prefix).
# - in-flight load 1: a tie-breaker from the picker's own counts.
# - prefill-backlog-scorer 1.5 (ours): a pod still computing prefills this picker sent it scores
#   lower, so a hot prefix gets a second pod; only for prompts a pod holds half of (minHit), one
#   copy per 4 s (moveEverySeconds), and only to a pod with no prefill of ours pending (moveToIdleOnly);
#   a prompt cached nowhere is scored by it too, counting a pod's scraped queue (coldPrompts).
# The load guard on affinity is off: it cost prefix hits, and so TTFT, under bursts.
plugins:
- type: queue-scorer
  parameters:
    minSpread: 4
    countInflight: true
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters:
    maxPrefixBlocksToMatch: 1024
- type: lora-affinity-scorer
- type: inflight-load-scorer
- type: no-hit-lru-scorer
- type: prefill-backlog-scorer
  parameters:
    minHit: 0.5
    moveEverySeconds: 4
    moveToIdleOnly: true
    coldPrompts: true
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 1
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: lora-affinity-scorer
    weight: 3
    enabledWhen: {WHEN_ADAPTERS}
  - pluginRef: inflight-load-scorer
    weight: 1
  - pluginRef: no-hit-lru-scorer
    weight: 0.5
  - pluginRef: prefill-backlog-scorer
    weight: 1.5
  - pluginRef: max-score-picker
loadGuard:
  enabled: false
"""

PRESETS: dict[str, str] = {"default": DEFAULT_CONFIG_TEXT, "reference": REFERENCE_CONFIG_TEXT}


# ---- loading -------------------------------------------------------------------------------------
def load_config(text: str | None) -> PickerConfig:
    """Parse and validate an EndpointPickerConfig; None or blank text gives the default preset.
    Raises ConfigError (ConfigErrors when there are several problems)."""
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


@dataclass(slots=True)
class _Plugins:
    """Plugins parsed so far: the valid specs, and the names whose entry had an error (references
    to those are not reported again)."""

    specs: dict[str, PluginSpec] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    broken_types: set[str] = field(default_factory=set)

    def ref(self, value: Any, path: str, kinds: tuple[str, ...], what: str, *,
            implicit: bool = False) -> PluginSpec | None:
        """The plugin `value` names, checked to be of one of `kinds`; None when it cannot be used.
        With `implicit`, an undeclared name that is a plugin type of those kinds means that type with
        default parameters (the reference registers such defaults by itself)."""
        if not isinstance(value, str) or not value:
            raise ConfigError(path, f"expected a plugin name, got {value!r}")
        if value in self.broken:
            return None
        spec = self.specs.get(value)
        if spec is None and implicit:
            pt = lookup(value, path) if (plugin_type(value) is not None or _is_pending(value)) else None
            if pt is not None and pt.kind in kinds:
                spec = PluginSpec(value, value, pt.kind, pt.cls.parse(Params({}, path)))
                self.specs[value] = spec
        if spec is None:
            raise ConfigError(path, f"no plugin named \"{value}\"{_near(value, self.specs)}")
        if spec.kind not in kinds:
            raise ConfigError(path, f"\"{value}\" is a {spec.kind} plugin ({spec.type}); {what}")
        return spec


def _is_pending(type_name: str) -> bool:
    from epp.scheduling.pending import pending_feature

    return pending_feature(type_name) is not None


def _near(name: str, names: Iterable[str]) -> str:
    return did_you_mean(name, list(names))


def _parse_doc(doc: Any) -> PickerConfig:
    if not isinstance(doc, Mapping):
        raise ConfigError("", f"the config must be a YAML mapping (an {KIND}), got {type(doc).__name__}")
    top = Params(doc, "")
    c = _Problems()
    api = top.get("apiVersion")
    if api is not None and api not in API_VERSIONS:  # absent: the reference's loader accepts that too
        c.add(ConfigError("apiVersion", f"must be {' or '.join(map(repr, API_VERSIONS))}, got {api!r}"))
    kind = top.get("kind")
    if kind != KIND:
        c.add(ConfigError("kind", f"must be {KIND!r}, got {kind!r}"))

    preset = c.run(lambda: top.string("preset", "", choices=tuple(PRESETS)), default="") if top.has("preset") else ""
    top.get("preset")
    has_plugins, has_profiles = top.has("plugins"), top.has("schedulingProfiles")
    if has_profiles and not has_plugins:
        c.add(ConfigError("plugins", "required when schedulingProfiles is given"))
    if has_profiles and preset:
        c.add(ConfigError("preset", "give either a preset or plugins and schedulingProfiles, not both"))

    base: Mapping[str, Any] = {}
    if not has_plugins and not has_profiles:
        # A file of tunables only (thresholds, load guard, ...) keeps a preset's plugins and profile.
        preset = preset or "default"
        base = _yaml(PRESETS[preset])
        raw_plugins, raw_profiles = base["plugins"], base["schedulingProfiles"]
        top.get("plugins")
        top.get("schedulingProfiles")
    else:
        raw_plugins, raw_profiles = top.get("plugins"), top.get("schedulingProfiles")

    warnings: list[str] = []
    plugins = _parse_plugins(raw_plugins, c) if has_plugins or not has_profiles else _Plugins()
    if has_plugins and not has_profiles:
        scheduling = [s.name for s in plugins.specs.values() if s.kind in (FILTER, SCORER, PICKER)]
        if not scheduling and plugins.broken:
            raw_profiles = None  # the broken entries are reported; a profile error would be noise
        elif scheduling:
            if preset:
                c.add(ConfigError("preset", "give either a preset or scheduling plugins, not both"))
            # As the reference: one profile "default" of every declared filter, scorer and picker.
            raw_profiles = [{"name": "default", "plugins": [{"pluginRef": n} for n in scheduling]}]
        else:
            # Only data-layer, parser, detector, ... plugins (e.g. an engine-metrics override): keep a
            # preset's scheduling rather than a profile of nothing.
            preset = preset or "default"
            base = _yaml(PRESETS[preset])
            for spec in _parse_plugins(base["plugins"], c).specs.values():
                plugins.specs.setdefault(spec.name, spec)
            raw_profiles = base["schedulingProfiles"]
    profiles = _parse_profiles(raw_profiles, plugins, c, warnings) \
        if (has_plugins or not has_profiles) and raw_profiles is not None else []
    _check_refs(plugins, c)
    handler = _choose_handler(plugins, profiles, c)
    # The profile that runs for every request: the only one, or the disagg handler's decode profile.
    running = profiles[0] if profiles else ProfileSpec("", ())
    hspec = plugins.specs.get(handler)
    if hspec is not None and isinstance(hspec.params, DisaggParams):
        running = next((p for p in profiles if p.name == hspec.params.decode), running)

    base_top = Params(base, "")
    flow = _parse_flow_control(top.sub("flowControl") if _mapping_or_report(top, "flowControl", c) else None,
                               plugins, c) if top.has("flowControl") else None
    top.get("flowControl")
    saturation, detector, detector_plugin = _parse_detectors(top, base_top, plugins, flow, c)
    guard = c.run(lambda: _parse_guard(top.sub("loadGuard"), base_top.get("loadGuard") or {}), default=LoadGuard())

    gates: tuple[str, ...] = c.run(_parse_gates, top.get("featureGates"), default=())
    engine = top.get("engineMetrics")
    if engine is not None and not isinstance(engine, Mapping):
        c.add(ConfigError("engineMetrics", f"expected a mapping, got {type(engine).__name__}"))
        engine = None
    data_layer = _parse_data_layer(top, plugins, c)
    parsers = _parse_parsers(top, plugins, c)
    c.errors.extend(top.unknown())
    c.raise_if_any()

    warnings.extend(_dependency_warnings(plugins, profiles))
    if flow is not None and not gate_enabled(gates, "flowControl"):
        warnings.append("flowControl: given, but featureGates does not name flowControl: requests are not "
                        "queued (admission sheds sheddable requests while the pool is saturated)")
    if flow is not None and flow.enable_eviction:
        warnings.append("flowControl.enableEviction: in-flight eviction is not built; requests already sent "
                        "to a model server are never revoked")
    if not data_layer.metrics_enabled:
        warnings.append("dataLayer: no metrics-data-source is wired: metric-based scorers will see no metrics")
    if gates:
        log.info("feature gates set (flowControl turns flow control on; no other gate changes scheduling)",
                 extra={"gates": list(gates)})
    engine_metrics = _merge_engines(data_layer.engine_metrics, engine)
    specs = tuple(plugins.specs.values())
    return PickerConfig(
        plugins=specs,
        profile=running,
        saturation=saturation,
        load_guard=guard,
        feature_gates=gates,
        engine_metrics=engine_metrics,
        preset=preset or "custom",
        raw=dict(doc),
        profiles=tuple(profiles),
        handler=handler,
        detector=detector,
        detector_plugin=detector_plugin,
        data_layer=data_layer,
        parser=parsers[0] if parsers else None,
        parsers=parsers,
        request_control=tuple(p for p in specs if p.kind == REQUEST_CONTROL),
        admitters=tuple(p for p in specs if p.kind == ADMITTER),
        flow_control=flow,
        api_version=api if isinstance(api, str) else API_VERSION,
        warnings=tuple(warnings),
    )


def _mapping_or_report(top: Params, name: str, c: _Problems) -> bool:
    v = top.raw.get(name)
    if v is not None and not isinstance(v, Mapping):
        c.add(ConfigError(name, f"expected a mapping, got {type(v).__name__}"))
        return False
    return True


def _parse_gates(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("featureGates", f"expected a list of strings, got {type(raw).__name__}")
    for i, g in enumerate(raw):
        if not isinstance(g, str) or not g:
            raise ConfigError(f"featureGates[{i}]", f"expected a non-empty string, got {g!r}")
        name, eq, value = g.partition("=")
        if not name or (eq and value.strip().lower() not in ("true", "false")):
            raise ConfigError(f"featureGates[{i}]", f"expected a gate name or name=true|false, got {g!r}")
    return tuple(raw)


def gate_enabled(gates: Iterable[str], name: str) -> bool:
    """Whether `featureGates` switches `name` on ("name" or "name=true"; "name=false" is off)."""
    on = False
    for g in gates:
        key, eq, value = g.partition("=")
        if key.strip() == name:
            on = not eq or value.strip().lower() == "true"
    return on


def _dependency_warnings(plugins: _Plugins, profiles: list[ProfileSpec]) -> list[str]:
    """Plugins that read another's per-request result and would see nothing as configured."""
    out: list[str] = []
    specs = plugins.specs
    for prof in profiles:
        order = [e.plugin for e in prof.entries]
        for i, name in enumerate(order):
            spec = specs[name]
            if spec.type == "no-hit-lru-scorer":
                src = spec.params.prefix_name
                if src not in order[:i]:
                    out.append(f"profile {prof.name}: no-hit-lru-scorer \"{name}\" reads \"{src}\", which does not run "
                               "before it in this profile: every request will look cold")
            elif spec.type == "prefill-backlog-scorer":
                src = spec.params.prefix_name
                if src not in order[:i]:
                    out.append(f"profile {prof.name}: prefill-backlog-scorer \"{name}\" reads \"{src}\", which does "
                               "not run before it in this profile: every prompt will count as uncached")
    if any(s.type == "prefix-cache-affinity-filter" for s in specs.values()) and \
            not any(s.type == "prefix-cache-scorer" for s in specs.values()):
        out.append("prefix-cache-affinity-filter: no prefix-cache-scorer is declared, so it has no index to read "
                   "and keeps every endpoint")
    return out


def _merge_engines(from_extractor: Mapping[str, Any], section: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """engineConfigs converted from the core-metrics-extractor, with `engineMetrics` winning per signal."""
    if not from_extractor and section is None:
        return None
    out: dict[str, Any] = {k: dict(v) for k, v in from_extractor.items()}
    for name, signals in (section or {}).items():
        if isinstance(signals, Mapping) and isinstance(out.get(name), dict):
            out[name].update(signals)
        else:
            out[name] = signals
    return out


# ---- plugins and profiles ------------------------------------------------------------------------
def _parse_plugins(raw_plugins: Any, c: _Problems) -> _Plugins:
    out = _Plugins()
    if not isinstance(raw_plugins, list) or not raw_plugins:
        c.add(ConfigError("plugins", "expected a non-empty list of plugins"))
        return out
    declared: set[str] = set()
    for i, raw in enumerate(raw_plugins):
        path = f"plugins[{i}]"
        name = type_name = ""
        try:
            p = Params(raw, path)
            type_name = p.string("type", "")
            name = p.string("name", type_name) if type_name else (p.string("name", "") or "")
            if not type_name:
                raise ConfigError(p.field("type"), "required")
            if name in declared:
                name = ""  # the first entry of that name stands
                raise ConfigError(p.field("name"), f"duplicate plugin name \"{p.string('name', type_name)}\"")
            declared.add(name)
            pt = lookup(type_name, p.field("type"))
            params = pt.cls.parse(Params(p.get("parameters"), p.field("parameters")))
            extra = p.unknown()
            if extra:
                raise ConfigErrors(extra) if len(extra) > 1 else extra[0]
            out.specs[name] = PluginSpec(name=name, type=type_name, kind=pt.kind, params=params)
        except ConfigError as e:
            c.add(e)
            if name:
                out.broken.add(name)
            if type_name:
                out.broken_types.add(type_name)
    return out


def _check_refs(plugins: _Plugins, c: _Problems) -> None:
    """Plugins whose parameters name other plugins (`refs`): each name must exist with a fitting type."""
    for spec in plugins.specs.values():
        pt = plugin_type(spec.type)
        refs = getattr(pt.cls, "refs", None) if pt is not None else None
        if refs is None:
            continue
        for param, target, types in refs(spec.params):
            path = f"plugins[{spec.name}].parameters.{param}"
            if target in plugins.broken:
                continue
            other = plugins.specs.get(target)
            if other is None:
                c.add(ConfigError(path, f"no plugin named \"{target}\"{_near(target, plugins.specs)}"))
            elif other.type not in types:
                c.add(ConfigError(path, f"\"{target}\" is a {other.type}; expected {' or '.join(types)}"))


def _parse_profiles(raw_profiles: Any, plugins: _Plugins, c: _Problems, warnings: list[str]) -> list[ProfileSpec]:
    if not isinstance(raw_profiles, list) or not raw_profiles:
        c.add(ConfigError("schedulingProfiles", "expected a non-empty list of profiles"))
        return []
    out: list[ProfileSpec] = []
    names: set[str] = set()
    for i, raw in enumerate(raw_profiles):
        path = f"schedulingProfiles[{i}]"
        try:
            pp = Params(raw, path)
            pname = pp.string("name", "")
            if not pname:
                raise ConfigError(pp.field("name"), "required")
            if pname in names:
                raise ConfigError(pp.field("name"), f"duplicate profile name \"{pname}\"")
            names.add(pname)
            refs = pp.get("plugins")
            if not isinstance(refs, list) or not refs:
                raise ConfigError(pp.field("plugins"), "expected a non-empty list of plugin references")
            c.errors.extend(pp.unknown())
        except ConfigError as e:
            c.add(e)
            continue
        entries = _parse_entries(refs, path, plugins, c, warnings)
        if entries is not None:
            out.append(ProfileSpec(pname, entries))
    return out


def _parse_entries(refs: list[Any], path: str, plugins: _Plugins, c: _Problems,
                   warnings: list[str]) -> tuple[ProfileEntry, ...] | None:
    entries: list[ProfileEntry] = []
    seen: set[str] = set()
    picker: str | None = None
    ok = True
    for j, raw in enumerate(refs):
        try:
            rp = Params(raw, f"{path}.plugins[{j}]")
            ref = rp.get("pluginRef")
            if isinstance(ref, str) and ref in seen:
                raise ConfigError(rp.field("pluginRef"), f"plugin \"{ref}\" is listed twice in this profile")
            if isinstance(ref, str) and ref in plugins.specs and plugins.specs[ref].kind == HANDLER:
                raise ConfigError(rp.field("pluginRef"),
                                  f"{plugins.specs[ref].type} is a profile handler, not a profile plugin")
            other = plugins.specs.get(ref) if isinstance(ref, str) else None
            if other is not None and other.kind not in PROFILE_KINDS:
                # The reference accepts these in a profile; they act by being declared, not from here.
                if rp.has("weight"):
                    raise ConfigError(rp.field("weight"), f"only scorers take a weight; \"{ref}\" is a {other.kind}")
                rp.done()
                warnings.append(f"{rp.field('pluginRef')}: \"{ref}\" is a {other.kind} plugin; it runs for every "
                                "request by being declared, not as part of this profile")
                seen.add(other.name)
                continue
            spec = plugins.ref(ref, rp.field("pluginRef"), PROFILE_KINDS,
                               "a profile lists filters, scorers and one picker")
            if spec is None:
                ok = False
                continue
            seen.add(spec.name)
            weight = _weight(rp, spec)
            when = rp.string("enabledWhen", "", choices=(WHEN_ADAPTERS,)) if rp.has("enabledWhen") else ""
            rp.get("enabledWhen")
            if when and spec.kind != SCORER:
                raise ConfigError(rp.field("enabledWhen"), "only applies to scorers")
            if spec.kind == PICKER:
                if picker is not None:
                    raise ConfigError(rp.field("pluginRef"), f"profile already has a picker (\"{picker}\")")
                picker = spec.name
            rp.done()
            entries.append(ProfileEntry(plugin=spec.name, weight=weight, only_with_lora=bool(when)))
        except ConfigError as e:
            c.add(e)
            ok = False
    if not ok:
        return None
    declared_picker = next((s.name for s in plugins.specs.values() if s.kind == PICKER), None)
    if picker is None and declared_picker is not None:
        # As the reference: a profile without a picker gets a declared one (else max-score-picker).
        entries.append(ProfileEntry(plugin=declared_picker))
    elif picker is None:
        name = DEFAULT_PICKER
        while name in plugins.specs and plugins.specs[name].type != DEFAULT_PICKER:
            name = "_" + name
        if name not in plugins.specs:
            pt = plugin_type(DEFAULT_PICKER)
            assert pt is not None
            plugins.specs[name] = PluginSpec(name, DEFAULT_PICKER, PICKER, pt.cls.parse(Params({}, "")))
        entries.append(ProfileEntry(plugin=name))
    return tuple(entries)


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


def _choose_handler(plugins: _Plugins, profiles: list[ProfileSpec], c: _Problems) -> str:
    """The profile handler: the one declared, else single-profile-handler; checks the profile count."""
    handlers = [s for s in plugins.specs.values() if s.kind == HANDLER]
    # a handler refused above (disagg, data-parallel) already explains a multi-profile config
    broken_handler = any(t.endswith("profile-handler") for t in plugins.broken_types)
    if len(handlers) > 1:
        c.add(ConfigError("plugins", "more than one profile handler: "
                          + ", ".join(f"\"{h.name}\"" for h in handlers)))
        return handlers[0].name
    name = handlers[0].name if handlers else DEFAULT_HANDLER
    if profiles and not broken_handler:
        names = [p.name for p in profiles]
        params = handlers[0].params if handlers else None
        if isinstance(params, DisaggParams):
            c.run(DisaggProfileHandler.validate_profiles, params, names, "schedulingProfiles")
        elif isinstance(params, DataParallelParams):
            c.run(DataParallelProfileHandler.validate_profiles, params, names, "schedulingProfiles")
        else:
            c.run(SingleProfileHandler.validate, names, "schedulingProfiles")
    return name


# ---- saturation ----------------------------------------------------------------------------------
def _parse_detectors(
    top: Params, base_top: Params, plugins: _Plugins, flow: FlowControlConfig | None, c: _Problems,
) -> tuple[SaturationDetector, SaturationDetector | ConcurrencyDetector | None, str]:
    """(metrics-based detector, the detector admission uses or None for the same, its plugin name)."""
    raw = top.raw.get("saturationDetector")
    top.get("saturationDetector")
    ref = ""
    thresholds = SaturationDetector()
    if isinstance(raw, Mapping) and "pluginRef" in raw:
        p = Params(raw, "saturationDetector")
        ref = c.run(lambda: p.string("pluginRef", ""), default="") or ""
        others = [k for k in raw if k != "pluginRef"]
        if others:
            c.add(ConfigError(f"saturationDetector.{others[0]}",
                              "give either pluginRef or the thresholds, not both (put the thresholds on "
                              "the detector plugin)"))
        thresholds = c.run(_parse_saturation, Params({}, "saturationDetector"),
                           base_top.get("saturationDetector") or {}, default=SaturationDetector())
    else:
        thresholds = c.run(lambda: _parse_saturation(top.sub("saturationDetector"),
                                                     base_top.get("saturationDetector") or {}),
                           default=SaturationDetector())
    flow_ref = flow.saturation_detector if flow is not None else ""
    if ref and flow_ref and ref != flow_ref:
        c.add(ConfigError("flowControl.saturationDetector.pluginRef",
                          f"names \"{flow_ref}\" but saturationDetector.pluginRef names \"{ref}\": give one"))
    ref = ref or flow_ref
    path = "saturationDetector.pluginRef" if ref and not flow_ref else "flowControl.saturationDetector.pluginRef"
    detectors = [s for s in plugins.specs.values() if s.kind == SATURATION]
    spec: PluginSpec | None = None
    if ref:
        spec = c.run(lambda: plugins.ref(ref, path, (SATURATION,),
                                         "expected utilization-detector or concurrency-detector", implicit=True))
    elif len(detectors) == 1:
        spec = detectors[0]
    elif len(detectors) > 1:
        c.add(ConfigError("saturationDetector.pluginRef",
                          "several saturation detectors are declared ("
                          + ", ".join(d.name for d in detectors) + "): name the one admission uses"))
    if spec is None:
        return thresholds, None, ""
    if isinstance(spec.params, SaturationDetector):
        return spec.params, None, spec.name
    return thresholds, spec.params, spec.name


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
        headroom=p.number("headroom", 0.0, lo=0),
        staleness_policy=p.string("stalenessPolicy", "saturated", choices=STALENESS_POLICIES),
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


# ---- data layer, parsers, flow control -----------------------------------------------------------
def _parse_data_layer(top: Params, plugins: _Plugins, c: _Problems) -> DataLayerConfig:
    key = "dataLayer" if top.has("dataLayer") or not top.has("data") else "data"
    if top.has("dataLayer") and top.has("data"):
        c.add(ConfigError("data", "give dataLayer or its older name data, not both"))
    top.get("data")
    top.get("dataLayer")
    wired: list[tuple[PluginSpec, list[PluginSpec]]] = []
    inject = True
    if top.has(key):
        try:
            p = Params(top.raw[key], key)
            inject = p.boolean("injectDefaults", True)
            for sub, feature in (("discovery", "endpoint discovery plugins"),
                                 ("crossReplicaSyncerPluginRef", "cross-replica sync"),
                                 ("crossReplicaSyncInterval", "cross-replica sync")):
                if p.has(sub):
                    c.add(ConfigError(p.field(sub), f"not yet supported ({feature})"))
                p.get(sub)
            sources = p.get("sources")
            c.errors.extend(p.unknown())
            if sources is not None and not isinstance(sources, list):
                raise ConfigError(p.field("sources"), f"expected a list, got {type(sources).__name__}")
            for i, raw in enumerate(sources or []):
                try:
                    sp = Params(raw, f"{key}.sources[{i}]")
                    src = plugins.ref(sp.get("pluginRef"), sp.field("pluginRef"), (DATA_SOURCE,),
                                      "expected a data source (metrics-data-source, endpoint-notification-source)")
                    exts: list[PluginSpec] = []
                    raw_ext = sp.get("extractors")
                    if raw_ext is not None and not isinstance(raw_ext, list):
                        raise ConfigError(sp.field("extractors"), f"expected a list, got {type(raw_ext).__name__}")
                    for j, e in enumerate(raw_ext or []):
                        ep = Params(e, f"{sp.field('extractors')}[{j}]")
                        ext = c.run(plugins.ref, ep.get("pluginRef"), ep.field("pluginRef"), (EXTRACTOR, PRODUCER),
                                    "expected an extractor (core-metrics-extractor)")
                        c.errors.extend(ep.unknown())
                        if ext is not None:
                            exts.append(ext)
                    c.errors.extend(sp.unknown())
                    if src is not None:
                        wired.append((src, exts))
                except ConfigError as e:
                    c.add(e)
        except ConfigError as e:
            c.add(e)
    declared_sources = [s for s in plugins.specs.values() if s.type == "metrics-data-source"]
    declared_extractors = [s for s in plugins.specs.values() if s.type == "core-metrics-extractor"]
    if wired:
        metrics = [(s, exts) for s, exts in wired if s.type == "metrics-data-source"]
        source = metrics[0][0] if metrics else None
        extractor = next((e for e in metrics[0][1] if e.type == "core-metrics-extractor"), None) if metrics else None
        enabled = bool(metrics) or inject
    else:
        source = declared_sources[0] if declared_sources else None
        extractor = declared_extractors[0] if declared_extractors else None
        enabled = True
    if extractor is None and declared_extractors:
        extractor = declared_extractors[0]
    sp_params = source.params if source is not None else None
    ex = extractor.params if extractor is not None else None
    dl = DataLayerConfig(
        endpoint_notifications=any(s.type == "endpoint-notification-source" for s, _ in wired)
        or any(s.type == "endpoint-notification-source" for s in plugins.specs.values()),
        metrics_enabled=enabled,
        sources=tuple((s.name, tuple(e.name for e in exts)) for s, exts in wired),
    )
    if sp_params is not None:
        dl = dataclasses.replace(
            dl, scheme=sp_params.scheme, path=sp_params.path, port=sp_params.port,
            insecure_skip_verify=sp_params.insecure_skip_verify, ca_cert_path=sp_params.ca_cert_path,
            client_cert_path=sp_params.client_cert_path, client_key_path=sp_params.client_key_path,
            interval=sp_params.interval)
    if ex is not None:
        dl = dataclasses.replace(dl, engine_label_key=ex.engine_label_key, default_engine=ex.default_engine,
                                 engine_metrics=ex.engine_metrics, custom_metrics=ex.custom_metrics)
    return dl


def _parse_parsers(top: Params, plugins: _Plugins, c: _Problems) -> tuple[PluginSpec, ...]:
    """The `parser: {pluginRef}` (GIE) or `requestHandler.parsers[]` (llm-d) plugins, in order; with
    neither, the one PARSER plugin declared (none: the picker's default OpenAI parsing)."""
    named: list[PluginSpec] = []
    given = False
    expected = "expected a parser plugin (openai-parser, passthrough-parser, vllmgrpc-parser)"
    if top.has("parser"):
        given = True
        try:
            p = top.sub("parser")
            spec = plugins.ref(p.get("pluginRef"), p.field("pluginRef"), (PARSER,), expected, implicit=True)
            c.errors.extend(p.unknown())
            if spec is not None:
                named.append(spec)
        except ConfigError as e:
            c.add(e)
    top.get("parser")
    if top.has("requestHandler"):
        if given:
            c.add(ConfigError("requestHandler", "give parser or requestHandler.parsers, not both"))
        given = True
        try:
            rh = top.sub("requestHandler")
            raw = rh.get("parsers")
            c.errors.extend(rh.unknown())
            if raw is not None and not isinstance(raw, list):
                raise ConfigError(rh.field("parsers"), f"expected a list, got {type(raw).__name__}")
            for i, item in enumerate(raw or []):
                try:
                    pp = Params(item, f"{rh.field('parsers')}[{i}]")
                    spec = plugins.ref(pp.get("pluginRef"), pp.field("pluginRef"), (PARSER,), expected,
                                       implicit=True)
                    c.errors.extend(pp.unknown())
                    if spec is not None:
                        named.append(spec)
                except ConfigError as e:
                    c.add(e)
        except ConfigError as e:
            c.add(e)
    top.get("requestHandler")
    if given:
        return tuple(named)
    declared = [s for s in plugins.specs.values() if s.kind == PARSER]
    if len(declared) > 1:
        c.add(ConfigError("parser", "several parser plugins are declared ("
                          + ", ".join(d.name for d in declared) + "): name the one to use in parser.pluginRef"))
    return tuple(declared[:1])


def _policy_ref(value: Any, path: str, plugins: _Plugins, kinds: tuple[str, ...]) -> str:
    if value is None or value == "":  # omitted (the reference's omitempty)
        return ""
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"expected a plugin name, got {value!r}")
    if value in plugins.broken or (value in DEFAULT_POLICIES and value not in plugins.specs):
        return value  # reported already, or a policy flow control creates by itself
    plugins.ref(value, path, kinds, "expected a flow-control policy")
    return value


def _parse_band(p: Params, plugins: _Plugins, *, needs_priority: bool) -> PriorityBand:
    priority: int | None = None
    if needs_priority:
        if not p.has("priority"):
            raise ConfigError(p.field("priority"), "required")
        priority = p.integer("priority", 0)
    elif p.has("priority"):
        priority = p.integer("priority", 0)
    band = PriorityBand(
        priority=priority,
        max_bytes=p.quantity("maxBytes", None) or None,
        max_requests=p.quantity("maxRequests", None) or None,
        fairness_policy=_policy_ref(p.get("fairnessPolicyRef"), p.field("fairnessPolicyRef"), plugins,
                                    (FLOW_POLICY,)),
        ordering_policy=_policy_ref(p.get("orderingPolicyRef"), p.field("orderingPolicyRef"), plugins,
                                    (FLOW_POLICY,)),
    )
    p.done()
    return band


def _parse_flow_control(p: Params | None, plugins: _Plugins, c: _Problems) -> FlowControlConfig | None:
    """llm-d's `flowControl` section: limits (quantities such as 1Gi, 1k), TTL, priority bands and the
    policies they name, the usage-limit policy, the saturation detector, eviction."""
    if p is None:
        return None
    max_bytes = c.run(p.quantity, "maxBytes", None)
    max_requests = c.run(p.quantity, "maxRequests", None)
    ttl = c.run(p.duration, "defaultRequestTTL", 0.0) or None
    default_band = c.run(lambda: _parse_band(p.sub("defaultPriorityBand"), plugins, needs_priority=False)) \
        if p.has("defaultPriorityBand") else None
    p.get("defaultPriorityBand")
    negative = c.run(lambda: _parse_band(p.sub("defaultNegativePriorityBand"), plugins, needs_priority=False)) \
        if p.has("defaultNegativePriorityBand") else None
    p.get("defaultNegativePriorityBand")
    bands: list[PriorityBand] = []
    raw = p.get("priorityBands")
    if raw is not None and not isinstance(raw, list):
        c.add(ConfigError(p.field("priorityBands"), f"expected a list, got {type(raw).__name__}"))
        raw = None
    seen: set[int] = set()
    for i, item in enumerate(raw or []):
        path = f"{p.field('priorityBands')}[{i}]"
        band = c.run(lambda item=item, path=path: _parse_band(Params(item, path), plugins, needs_priority=True))
        if band is None:
            continue
        assert band.priority is not None
        if band.priority in seen:
            c.add(ConfigError(f"{path}.priority", f"priority {band.priority} is given twice"))
            continue
        seen.add(band.priority)
        bands.append(band)
    usage = c.run(lambda: _policy_ref(p.get("usageLimitPolicyPluginRef"), p.field("usageLimitPolicyPluginRef"),
                                      plugins, (FLOW_POLICY,)), default="")
    detector = ""
    if p.has("saturationDetector"):
        try:
            sd = p.sub("saturationDetector")
            detector = sd.string("pluginRef", "")
            if not detector:
                raise ConfigError(sd.field("pluginRef"), "required")
            sd.done()
        except ConfigError as e:
            c.add(e)
    p.get("saturationDetector")
    eviction = c.run(p.boolean, "enableEviction", False, default=False)
    c.errors.extend(p.unknown())
    return FlowControlConfig(
        max_bytes=max_bytes, max_requests=max_requests, default_request_ttl=ttl, default_band=default_band,
        default_negative_band=negative, bands=tuple(sorted(bands, key=lambda b: -(b.priority or 0))),
        usage_limit_policy=usage or "", saturation_detector=detector, enable_eviction=bool(eviction),
    )


# ---- building ------------------------------------------------------------------------------------
# Built first so filters and scorers can find what their parameters name (BuildContext.plugins).
# Deciders last: they read the prefix matching the producers and scorers hold.
_BUILD_ORDER = (PRODUCER, SATURATION, SCORER, FILTER, PICKER, DECIDER)


def build_scheduler(
    cfg: PickerConfig,
    *,
    has_lora: bool | Callable[[], bool] = False,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ProfileScheduler | DisaggScheduler | DataParallelScheduler:
    """A Scheduler running the config's profile (or, under disagg-profile-handler, its decode,
    prefill and encode profiles; under data-parallel-profile-handler, its one profile with ranks).
    `has_lora` (a value, or a callable asked once per request that needs it) switches on scorers
    marked `enabledWhen: poolServesAdapters`; see epp.scheduling.scorers.pool_serves_adapters for
    a ready-made test over the candidates.
    `clock` is what metric staleness is judged against (the simulator passes its virtual clock)."""
    ctx = BuildContext(rng=rng or random.Random(), detector=cfg.saturation, guard=cfg.load_guard, clock=clock)
    for kind in _BUILD_ORDER:
        for spec in cfg.plugins:
            if spec.kind == kind:
                pt = plugin_type(spec.type)
                assert pt is not None
                ctx.plugins[spec.name] = pt.cls(spec.name, spec.params, ctx)
    lora_fn: Callable[[], bool]
    if callable(has_lora):
        lora_fn = has_lora
    else:
        value = bool(has_lora)

        def lora_fn() -> bool:
            return value

    def profile(spec: ProfileSpec) -> ProfileScheduler:
        filters, scorers, picker = [], [], None
        for e in spec.entries:
            plugin = ctx.plugins[e.plugin]
            kind = cfg.plugin(e.plugin).kind
            if kind in (FILTER, SATURATION):
                filters.append(plugin)
            elif kind == SCORER:
                scorers.append(WeightedScorer(plugin, e.weight, e.only_with_lora))
            elif kind == PICKER:
                picker = plugin
        assert picker is not None
        return ProfileScheduler(spec.name, filters, scorers, picker,
                                stale_after=cfg.saturation.stale_after, has_lora=lora_fn, clock=clock)

    handler = next((s for s in cfg.plugins if s.name == cfg.handler), None)
    if handler is not None and isinstance(handler.params, DisaggParams):
        hp = handler.params
        profiles = {spec.name: profile(spec) for spec in (cfg.profiles or (cfg.profile,))}
        return DisaggScheduler(hp, profiles, prefill_decider=ctx.plugins.get(hp.prefill_decider) or None,
                               encode_decider=ctx.plugins.get(hp.encode_decider) or None,
                               handler_name=handler.name, handler_type=handler.type)
    if handler is not None and isinstance(handler.params, DataParallelParams):
        return DataParallelScheduler(handler.params, profile(cfg.profile))
    return profile(cfg.profile)


def build_admission(cfg: PickerConfig, *, rng: random.Random | None = None) -> Admission:
    """The admission check: sheds sheddable requests while the configured saturation detector calls
    the pool saturated, or when a declared admitter (probabilistic-admitter) rejects them."""
    ctx = BuildContext(rng=rng or random.Random(), detector=cfg.saturation, guard=cfg.load_guard)
    admitters = []
    for spec in cfg.admitters:
        pt = plugin_type(spec.type)
        assert pt is not None
        admitters.append(pt.cls(spec.name, spec.params, ctx))
    return Admission(cfg.admission_detector, admitters)


def describe(cfg: PickerConfig) -> str:
    """One line naming the profile's plugins and weights, for the startup log."""
    parts = []
    for e in cfg.profile.entries:
        spec = cfg.plugin(e.plugin)
        w = f" x{e.weight:g}" if spec.kind == SCORER else ""
        cond = " (with adapters)" if e.only_with_lora else ""
        parts.append(f"{spec.name}{w}{cond}")
    extra = f" detector={cfg.detector_plugin}" if cfg.detector_plugin else ""
    if cfg.handler != DEFAULT_HANDLER:
        others = [p.name for p in cfg.profiles if p.name != cfg.profile.name]
        extra += f" handler={cfg.handler}" + (f" (also profiles {', '.join(others)})" if others else "")
    if cfg.admitters:
        extra += " admitters=" + ",".join(a.name for a in cfg.admitters)
    return f"preset={cfg.preset} profile={cfg.profile.name}: " + ", ".join(parts) + extra

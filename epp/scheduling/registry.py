"""Plugin registry: plugin kinds, the type-name table, strict parameter reading, ConfigError.

A plugin type is a class registered under the type name an `EndpointPickerConfig` file uses
(`queue-scorer`, `max-score-picker`, ...). Each class parses its `parameters` once at config load
(`parse`, which raises ConfigError naming the field) and is built per scheduler from the parsed
value and a BuildContext.
"""

from __future__ import annotations

import difflib
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from epp.datastore import Endpoint
from epp.units import go_duration, kube_quantity

if TYPE_CHECKING:
    from epp.scheduling.cycle import Cycle
    from epp.scheduling.loadguard import LoadGuard
    from epp.scheduling.saturation import SaturationDetector

FILTER, SCORER, PICKER, HANDLER = "filter", "scorer", "picker", "handler"
# plugin families outside one profile's filter/scorer/picker chain
PARSER, REQUEST_CONTROL, PRODUCER, DECIDER = "parser", "request-control", "producer", "decider"
DATA_SOURCE, EXTRACTOR, ADMITTER, SATURATION = "data-source", "extractor", "admitter", "saturation-detector"
FLOW_POLICY = "flow-control-policy"
KINDS = (FILTER, SCORER, PICKER, HANDLER, PARSER, REQUEST_CONTROL, PRODUCER, DECIDER, DATA_SOURCE, EXTRACTOR,
         ADMITTER, SATURATION, FLOW_POLICY)


class ConfigError(ValueError):
    """A picker configuration that cannot be used; `field` is the path to the offending value."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}" if field_path else message)
        self.field = field_path
        self.message = message


class Filter(Protocol):
    """Keeps the endpoints that may serve the request (order preserved)."""

    name: str

    def filter(self, cycle: Cycle, endpoints: list[Endpoint]) -> list[Endpoint]: ...


class Scorer(Protocol):
    """One score per endpoint, aligned with `endpoints`, each meant to lie in 0..1 (clamped anyway)."""

    name: str

    def score(self, cycle: Cycle, endpoints: Sequence[Endpoint]) -> list[float]: ...


class Picker(Protocol):
    """Endpoints in preference order (at most `max_endpoints`) from the summed scores."""

    name: str
    max_endpoints: int

    def pick(self, cycle: Cycle, endpoints: Sequence[Endpoint], scores: list[float]) -> list[Endpoint]: ...


@dataclass(slots=True)
class BuildContext:
    """What plugin constructors may use: shared randomness, the saturation detector, the load guard,
    the clock, and the plugins already built by name (producers and detectors are built first, so a
    scorer or filter can find the one its parameters name)."""

    rng: random.Random
    detector: SaturationDetector
    guard: LoadGuard
    plugins: dict[str, Any] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic


@dataclass(frozen=True, slots=True)
class PluginType:
    """A registered plugin type: its kind and the class that parses parameters and builds instances."""

    type_name: str
    kind: str
    cls: Any  # has classmethod parse(Params) -> Any and __init__(name, params, ctx)


REGISTRY: dict[str, PluginType] = {}

C = TypeVar("C")


def register(type_name: str, kind: str) -> Callable[[C], C]:
    """Class decorator: make `cls` available to configs under `type_name`."""
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}")

    def deco(cls: C) -> C:
        if type_name in REGISTRY:
            raise ValueError(f"plugin type {type_name!r} registered twice")
        REGISTRY[type_name] = PluginType(type_name, kind, cls)
        return cls

    return deco


def type_name_of(plugin: object) -> str:
    """The registered type name of a plugin instance (its class name when not registered)."""
    for pt in REGISTRY.values():
        if type(plugin) is pt.cls:
            return pt.type_name
    return type(plugin).__name__


def plugin_type(type_name: str) -> PluginType | None:
    """The registered type for a name, loading the built-in plugin modules first."""
    _load_builtins()
    return REGISTRY.get(type_name)


# Modules whose import registers plugin types; each plugin family adds its modules here.
BUILTIN_MODULES: list[str] = [
    "epp.scheduling.filters",
    "epp.scheduling.pickers",
    "epp.scheduling.prefix",
    "epp.scheduling.scorers",
    "epp.scheduling.session",
    "epp.scheduling.handlers",
    "epp.scheduling.saturation",
    "epp.scheduling.admission",
    "epp.scheduling.attributes",
    "epp.scheduling.conformance",
    "epp.scheduling.roles",
    "epp.scheduling.disagg",
    "epp.scheduling.dataparallel",
    "epp.deciders.always",
    "epp.deciders.prefix_based",
    "epp.deciders.multimodal",
    "epp.producers.approx_prefix",
    "epp.producers.token",
    "epp.producers.precise_prefix",
    "epp.datalayer.sources.metrics",
    "epp.datalayer.sources.notifications",
    "epp.datalayer.extractors.core_metrics",
    "epp.parsers.vllmgrpc",
    "epp.flowcontrol.fcfs", "epp.flowcontrol.edf", "epp.flowcontrol.global_strict", "epp.flowcontrol.round_robin",
    "epp.flowcontrol.slo_deadline", "epp.flowcontrol.shortest_prompt",
    "epp.parsers.openai_parser", "epp.parsers.passthrough", "epp.requestcontrol.served_verifier", "epp.requestcontrol.attribute_reporter",  # noqa: E501
]
_loaded: set[str] = set()


def _load_builtins() -> None:
    # Imported lazily: the plugin modules import this one to register themselves.
    if len(_loaded) == len(BUILTIN_MODULES):
        return
    import importlib

    for mod in BUILTIN_MODULES:
        if mod not in _loaded:
            importlib.import_module(mod)
            _loaded.add(mod)


def lookup(type_name: str, path: str) -> PluginType:
    """The registered type, or a ConfigError at `path`: "not yet supported (<feature>)" for a type of
    the reference this picker does not implement yet, else "unknown" with the nearest names."""
    pt = plugin_type(type_name)
    if pt is not None:
        return pt
    from epp.scheduling.pending import PENDING, pending_feature

    feature = pending_feature(type_name)
    if feature is not None:
        raise ConfigError(path, f"plugin type \"{type_name}\" is not yet supported ({feature})")
    raise ConfigError(path, f"unknown plugin type \"{type_name}\"{did_you_mean(type_name, [*REGISTRY, *PENDING])}")


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """"; did you mean 'x'?" naming the closest of `known` (those within 0.1 of the best, ratio ≥ 0.7)."""
    scored = sorted(((difflib.SequenceMatcher(None, name, k).ratio(), k) for k in set(known)), reverse=True)
    if not scored or scored[0][0] < 0.7:
        return ""
    floor = max(0.7, scored[0][0] - 0.1)
    near = [k for r, k in scored[:3] if r >= floor]
    return f"; did you mean {' or '.join(repr(n) for n in near)}?"


# ---- parameter reading ---------------------------------------------------------------------------
def parse_duration(value: object, path: str) -> float:
    """Seconds from a number (seconds) or a Go-style duration string ("200ms", "1m30s")."""
    if isinstance(value, bool):
        raise ConfigError(path, f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        secs = float(value)
    elif isinstance(value, str) and value:
        try:
            secs = go_duration(value)
        except ValueError:
            raise ConfigError(path, f"expected a duration like 200ms or 2s, got {value!r}") from None
    else:
        raise ConfigError(path, f"expected a duration, got {value!r}")
    if not math.isfinite(secs) or secs <= 0:
        raise ConfigError(path, f"must be a positive duration, got {value!r}")
    return secs


def parse_quantity(value: object, path: str) -> int:
    """A Kubernetes resource quantity ("1Gi", "500M", "1k", 100) as an integer ≥ 0 (rounded up)."""
    if isinstance(value, bool):
        raise ConfigError(path, f"expected a quantity like 100, 1k or 1Gi, got {value!r}")
    if isinstance(value, int | float):
        amount = float(value)
    elif isinstance(value, str):
        try:
            amount = kube_quantity(value)
        except ValueError:
            raise ConfigError(path, f"expected a quantity like 100, 1k or 1Gi, got {value!r}") from None
    else:
        raise ConfigError(path, f"expected a quantity like 100, 1k or 1Gi, got {value!r}")
    if not math.isfinite(amount) or amount < 0:
        raise ConfigError(path, f"must be a quantity ≥ 0, got {value!r}")
    return math.ceil(amount)


class Params:
    """Strict reader of one mapping: typed getters with defaults, then `done()` rejects leftovers."""

    def __init__(self, raw: object, path: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(path, f"expected a mapping, got {type(raw).__name__}")
        for k in raw:
            if not isinstance(k, str):
                raise ConfigError(path, f"keys must be strings, got {k!r}")
        self.raw: Mapping[str, Any] = raw
        self.path = path
        self._seen: set[str] = set()

    def field(self, name: str) -> str:
        """The path of a key in this mapping, for error messages."""
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.raw and self.raw[name] is not None

    def get(self, name: str) -> Any:
        """The raw value (None if absent), marking the key as known."""
        self._seen.add(name)
        return self.raw.get(name)

    def integer(self, name: str, default: int, *, lo: int | None = None, hi: int | None = None) -> int:
        v = self.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise ConfigError(self.field(name), f"expected an integer, got {v!r}")
        self._range(name, v, lo, hi)
        return v

    def number(self, name: str, default: float, *, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False) -> float:
        v = self.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(self.field(name), f"expected a number, got {v!r}")
        v = float(v)
        if not math.isfinite(v):
            raise ConfigError(self.field(name), f"must be a finite number, got {v!r}")
        if lo_open and lo is not None and v <= lo:
            raise ConfigError(self.field(name), f"must be greater than {lo:g}, got {v:g}")
        self._range(name, v, lo, hi)
        return v

    def boolean(self, name: str, default: bool) -> bool:
        v = self.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ConfigError(self.field(name), f"expected true or false, got {v!r}")
        return v

    def string(self, name: str, default: str, *, choices: Sequence[str] | None = None) -> str:
        v = self.get(name)
        if v is None:
            return default
        if not isinstance(v, str) or not v:
            raise ConfigError(self.field(name), f"expected a non-empty string, got {v!r}")
        if choices is not None and v not in choices:
            raise ConfigError(self.field(name), f"must be one of {', '.join(choices)}; got {v!r}")
        return v

    def string_map(self, name: str) -> dict[str, str]:
        v = self.get(name)
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise ConfigError(self.field(name), f"expected a mapping of strings, got {type(v).__name__}")
        out: dict[str, str] = {}
        for k, val in v.items():
            if not isinstance(k, str) or not isinstance(val, str):
                raise ConfigError(f"{self.field(name)}.{k}", f"expected a string, got {val!r}")
            out[k] = val
        return out

    def duration(self, name: str, default: float) -> float:
        v = self.get(name)
        if v is None:
            return default
        return parse_duration(v, self.field(name))

    def quantity(self, name: str, default: int | None) -> int | None:
        v = self.get(name)
        if v is None:
            return default
        return parse_quantity(v, self.field(name))

    def sub(self, name: str) -> Params:
        """A nested mapping read with the same strictness."""
        return Params(self.get(name), self.field(name))

    def done(self) -> None:
        """Raise for the first key no getter asked for."""
        for err in self.unknown():
            raise err

    def unknown(self) -> list[ConfigError]:
        """One error per key no getter asked for."""
        return [ConfigError(self.field(k), "unknown field") for k in self.raw if k not in self._seen]

    def _range(self, name: str, v: float, lo: float | None, hi: float | None) -> None:
        if lo is not None and v < lo:
            raise ConfigError(self.field(name), f"must be at least {lo:g}, got {v:g}")
        if hi is not None and v > hi:
            raise ConfigError(self.field(name), f"must be at most {hi:g}, got {v:g}")


class NoParams:
    """Mixin for plugins without parameters: parse() accepts only an empty mapping."""

    @classmethod
    def parse(cls, p: Params) -> None:
        p.done()


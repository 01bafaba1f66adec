"""Which series on a model server's /metrics page carry each signal, per engine.

Built-in engines (names from protocol.md §4): `vllm`, `sglang`, `trtllm-serve`,
`triton-tensorrt-llm`. An endpoint's engine comes from its pod label
(`inference.networking.k8s.io/engine-type`, else `llm-d.ai/engine-type`, else vllm); common
spellings such as `trtllm`, `TensorRT-LLM` or `triton` are accepted (see `resolve_engine`).

Each signal lists alternatives, tried in order: the first whose series are on the page wins. That
is how vLLM's KV-cache use is found under the current `vllm:kv_cache_usage_perc` or the older
`vllm:gpu_cache_usage_perc`, whichever the server exposes.

Overriding names from the config file (`apply_overrides`): a top-level `engineMetrics` section
maps an engine to the signals to change; signals not named keep the built-in definition::

    engineMetrics:
      vllm:
        waiting: "my:queue"                          # a sample name
        kvUsage: ["my:kv_perc", "vllm:kv_cache_usage_perc"]   # alternatives, first present wins
      triton-tensorrt-llm:
        running:                                     # a name with a label selector
          name: nv_trt_llm_request_metrics
          labels: {request_type: "context"}
      sglang:
        blockSize: {name: "sglang:cache_config_info", label: page_size}  # read a label's value
        lora: null                                   # optional signals can be switched off
      my-engine:                                     # a new engine: starts from `base` (default vllm)
        base: sglang
        waiting: "my_engine_queue"
        lora: {name: "my:lora_info", maxLabel: max_lora,
               runningLabel: running_lora_adapters, waitingLabel: waiting_lora_adapters}

Signal keys: `waiting`, `running`, `kvUsage`, `blockSize`, `numBlocks`, `lora` (snake_case is
accepted too). `waiting`, `running` and `kvUsage` are required: a page without any of their
alternatives is a failed scrape.

Several matching series are combined: queue and running counts are summed (data-parallel ranks
each expose their own), KV use is averaged (ranks have equal caches), block size and count come
from the first series, and for LoRA the newest `lora_requests_info` series (its value is a
timestamp) wins.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Protocol

from epp.datastore import Metrics
from epp.metrics.parse import Sample, scan
from epp.resources import ResourceError

log = logging.getLogger("epp.metrics.engines")


@dataclass(frozen=True, slots=True)
class Source:
    """Series named `name` whose labels include `match`; their value, or with `label` set, the
    value of that label (info metrics such as cache_config_info)."""

    name: str
    match: tuple[tuple[str, str], ...] = ()
    label: str = ""

    def select(self, samples: Sequence[Sample]) -> list[Sample]:
        """The series this source reads; a value source skips NaN/Inf (the server does not know)."""
        match, by_label = self.match, bool(self.label)
        return [
            s
            for s in samples
            if (by_label or _finite(s.value)) and all(s.labels.get(k) == v for k, v in match)
        ]


def _finite(value: float) -> bool:
    return value == value and value not in (_INF, -_INF)


_INF = float("inf")


@dataclass(frozen=True, slots=True)
class LoraSource:
    """vLLM-style LoRA info: one series per state change, value = its timestamp."""

    name: str
    max_label: str = "max_lora"
    running_label: str = "running_lora_adapters"
    waiting_label: str = "waiting_lora_adapters"


@dataclass(frozen=True)
class EngineSpec:
    """Where one engine exposes each signal. Each tuple lists alternatives, first present wins.

    `scheme`, `path` and `port` say where the page is: `port` None means the endpoint's own
    (serving) port. `insecure_skip_verify` turns off certificate checks for https (the
    reference's default is on, as model servers mostly use self-signed certificates).
    """

    name: str
    waiting: tuple[Source, ...]
    running: tuple[Source, ...]
    kv_usage: tuple[Source, ...]
    block_size: tuple[Source, ...] = ()
    num_blocks: tuple[Source, ...] = ()
    lora: LoraSource | None = None
    scheme: str = "http"
    path: str = "/metrics"
    port: int | None = None
    insecure_skip_verify: bool = True

    @cached_property
    def names(self) -> tuple[str, ...]:
        """Every sample name the engine may read (for the `?name[]=` filter)."""
        return tuple(dict.fromkeys(s.name for s in self._all_sources()))

    @cached_property
    def primary_names(self) -> tuple[str, ...]:
        """The first alternative of each signal: what one scan of the page looks for."""
        firsts = [alts[0].name for alts in self._signals() if alts]
        if self.lora is not None:
            firsts.append(self.lora.name)
        return tuple(dict.fromkeys(firsts))

    @cached_property
    def required_names(self) -> tuple[frozenset[str], ...]:
        """For each required signal, the names of which at least one must be on the page."""
        return tuple(frozenset(s.name for s in alts) for alts in (self.waiting, self.running, self.kv_usage))

    def _signals(self) -> tuple[tuple[Source, ...], ...]:
        return (self.waiting, self.running, self.kv_usage, self.block_size, self.num_blocks)

    def _all_sources(self) -> Iterable[Source | LoraSource]:
        for alts in self._signals():
            yield from alts
        if self.lora is not None:
            yield self.lora


def _src(name: str, label: str = "", **match: str) -> tuple[Source, ...]:
    return (Source(name, tuple(match.items()), label),)


TRITON_METRICS_PORT = 8002
_TRITON_REQ = "nv_trt_llm_request_metrics"
_TRITON_KV = "nv_trt_llm_kv_cache_block_metrics"

ENGINES: dict[str, EngineSpec] = {
    "vllm": EngineSpec(
        name="vllm",
        waiting=_src("vllm:num_requests_waiting"),
        running=_src("vllm:num_requests_running"),
        kv_usage=_src("vllm:kv_cache_usage_perc") + _src("vllm:gpu_cache_usage_perc"),
        block_size=_src("vllm:cache_config_info", label="block_size"),
        num_blocks=_src("vllm:cache_config_info", label="num_gpu_blocks"),
        lora=LoraSource("vllm:lora_requests_info"),
    ),
    "sglang": EngineSpec(
        name="sglang",
        waiting=_src("sglang:num_queue_reqs"),
        running=_src("sglang:num_running_reqs"),
        kv_usage=_src("sglang:token_usage"),
        # SGLang >= 0.5.11 exports plain gauges; older releases an info metric with labels
        block_size=_src("sglang:page_size") + _src("sglang:cache_config_info", label="page_size"),
        num_blocks=_src("sglang:num_pages") + _src("sglang:cache_config_info", label="num_pages"),
    ),
    "trtllm-serve": EngineSpec(
        name="trtllm-serve",
        waiting=_src("trtllm_num_requests_waiting"),
        running=_src("trtllm_num_requests_running"),
        kv_usage=_src("trtllm_kv_cache_utilization"),
        block_size=_src("trtllm_kv_cache_tokens_per_block"),
        num_blocks=_src("trtllm_kv_cache_max_blocks"),
        path="/prometheus/metrics",  # its /metrics answers JSON iteration stats
    ),
    "triton-tensorrt-llm": EngineSpec(
        name="triton-tensorrt-llm",
        waiting=_src(_TRITON_REQ, request_type="waiting"),
        running=_src(_TRITON_REQ, request_type="scheduled"),
        kv_usage=_src(_TRITON_KV, kv_cache_block_type="fraction"),
        block_size=_src(_TRITON_KV, kv_cache_block_type="tokens_per"),
        num_blocks=_src(_TRITON_KV, kv_cache_block_type="max"),
        port=TRITON_METRICS_PORT,  # Triton serves metrics on their own port, not the inference one
    ),
}

DEFAULT_ENGINE = "vllm"

# Spellings seen in engine-type labels, after lower-casing and '_' -> '-'.
ALIASES: dict[str, str] = {
    "vllm": "vllm",
    "vllm-v1": "vllm",
    "sglang": "sglang",
    "trtllm-serve": "trtllm-serve",
    "trtllm": "trtllm-serve",
    "trt-llm": "trtllm-serve",
    "tensorrt-llm": "trtllm-serve",
    "tensorrtllm": "trtllm-serve",
    "trtllm-server": "trtllm-serve",
    "triton-tensorrt-llm": "triton-tensorrt-llm",
    "triton-trtllm": "triton-tensorrt-llm",
    "triton-trt-llm": "triton-tensorrt-llm",
    "triton-tensorrtllm": "triton-tensorrt-llm",
    "tensorrtllm-backend": "triton-tensorrt-llm",
    "triton": "triton-tensorrt-llm",
}

_warned_unknown: set[str] = set()


def resolve_engine(label: str | None, specs: Mapping[str, EngineSpec] = ENGINES) -> EngineSpec:
    """The spec for an engine-type label value; unknown values fall back to vLLM (logged once)."""
    raw = (label or "").strip()
    if raw in specs:
        return specs[raw]
    key = raw.lower().replace("_", "-").replace(" ", "-")
    key = ALIASES.get(key, key)
    spec = specs.get(key)
    if spec is not None:
        return spec
    if raw and raw not in _warned_unknown:
        _warned_unknown.add(raw)
        log.warning("unknown engine type, reading vLLM metric names", extra={"engine": raw})
    return specs.get(DEFAULT_ENGINE) or ENGINES[DEFAULT_ENGINE]


class MissingMetrics(ValueError):
    """The page lacks a required signal (or is not a metrics page at all)."""

    def __init__(self, engine: str, missing: list[str]) -> None:
        super().__init__(f"{engine}: no series for {', '.join(missing)}")
        self.engine = engine
        self.missing = missing


class _Page:
    """A page scanned for the primary names; alternatives are scanned only when needed."""

    __slots__ = ("found", "scanned", "text")

    def __init__(self, text: str, names: Iterable[str]) -> None:
        self.text = text
        self.scanned = set(names)
        self.found = scan(text, self.scanned)

    def pick(self, alternatives: Sequence[Source]) -> tuple[Source, list[Sample]] | None:
        for src in alternatives:
            if src.name not in self.scanned:
                self.scanned.add(src.name)
                self.found.update(scan(self.text, (src.name,)))
            samples = self.found.get(src.name)
            if samples:
                chosen = src.select(samples)
                if chosen:
                    return src, chosen
        return None


def _number(text: str | None) -> int:
    """An integer from a label value; 0 (unknown) for '', 'None' and other non-numbers."""
    if not text:
        return 0
    try:
        value = float(text)
    except ValueError:
        return 0
    return int(value) if _finite(value) and value > 0 else 0


def _count(page: _Page, alternatives: Sequence[Source]) -> int:
    hit = page.pick(alternatives)
    if hit is None:
        return 0
    src, samples = hit
    if src.label:
        return _number(samples[0].labels.get(src.label))
    value = samples[0].value  # finite (select skipped the rest)
    return int(value) if value > 0 else 0


def _csv(text: str | None) -> frozenset[str]:
    if not text:
        return frozenset()
    return frozenset(p for p in (x.strip() for x in text.split(",")) if p)


def _totals(samples: list[Sample]) -> list[Sample]:
    """The series to add up. With priority scheduling SGLang exports a `priority=""` total beside
    one series per priority: the total alone counts (adding them all counts each request twice).
    Without a total the per-priority series are the parts and are added."""
    if any("priority" in s.labels for s in samples):
        total = [s for s in samples if not s.labels.get("priority")]
        return total or samples
    return samples


def read_metrics(spec: EngineSpec, page: str | bytes, now: float) -> Metrics:
    """The signals on one /metrics page, stamped `updated=now`. Raises MissingMetrics when a
    required signal (waiting, running, KV use) has no series."""
    text = page if isinstance(page, str) else bytes(page).decode("utf-8", "replace")
    p = _Page(text, spec.primary_names)
    waiting = p.pick(spec.waiting)
    running = p.pick(spec.running)
    kv = p.pick(spec.kv_usage)
    if waiting is None or running is None or kv is None:
        hits = (("waiting", waiting), ("running", running), ("kv_usage", kv))
        missing = [n for n, hit in hits if hit is None]
        raise MissingMetrics(spec.name, missing)
    kv_values = [s.value for s in _totals(kv[1])]
    metrics = Metrics(
        waiting=sum(s.value for s in _totals(waiting[1])),
        running=sum(s.value for s in _totals(running[1])),
        kv_usage=sum(kv_values) / len(kv_values),
        block_size=_count(p, spec.block_size),
        num_blocks=_count(p, spec.num_blocks),
        models=frozenset(m for s in waiting[1] if (m := s.labels.get("model_name"))),
        updated=now,
    )
    if spec.lora is not None:
        lora = p.found.get(spec.lora.name)
        if lora:
            # The newest state wins: its value is when it was recorded (later on the page breaks ties).
            newest = max(reversed(lora), key=lambda s: s.value if s.value == s.value else float("-inf"))
            metrics.lora_max = _number(newest.labels.get(spec.lora.max_label))
            metrics.lora_running = _csv(newest.labels.get(spec.lora.running_label))
            # vLLM lists an adapter with requests in flight under both labels; it holds one slot,
            # so it counts as running only (free slots = max - running - waiting stays right)
            metrics.lora_waiting = _csv(newest.labels.get(spec.lora.waiting_label)) - metrics.lora_running
    return metrics


# ---- overrides from the config file ----------------------------------------------------------

_SIGNAL_KEYS = {
    "waiting": "waiting",
    "running": "running",
    "kvUsage": "kv_usage",
    "kv_usage": "kv_usage",
    "blockSize": "block_size",
    "block_size": "block_size",
    "numBlocks": "num_blocks",
    "num_blocks": "num_blocks",
}
_REQUIRED = ("waiting", "running", "kv_usage")
_LORA_KEYS = {
    "maxLabel": "max_label",
    "max_label": "max_label",
    "runningLabel": "running_label",
    "running_label": "running_label",
    "waitingLabel": "waiting_label",
    "waiting_label": "waiting_label",
}


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ResourceError(path, "must be a non-empty string")
    return value.strip()


def _source(value: Any, path: str) -> Source:
    if isinstance(value, str):
        return Source(_string(value, path))
    if not isinstance(value, Mapping):
        raise ResourceError(path, "must be a metric name or a mapping with name, labels, label")
    unknown = set(value) - {"name", "labels", "match", "label"}
    if unknown:
        raise ResourceError(path, f"unknown keys {sorted(unknown)}")
    labels = value.get("labels", value.get("match")) or {}
    if not isinstance(labels, Mapping):
        raise ResourceError(f"{path}.labels", "must be a mapping of label name to value")
    match = tuple((str(k), str(v)) for k, v in labels.items())
    label = value.get("label") or ""
    if label:
        label = _string(label, f"{path}.label")
    return Source(_string(value.get("name"), f"{path}.name"), match, label)


def _sources(value: Any, path: str, required: bool) -> tuple[Source, ...]:
    if value is None or value == []:
        if required:
            raise ResourceError(path, "is required and cannot be removed")
        return ()
    if isinstance(value, list):
        return tuple(_source(v, f"{path}[{i}]") for i, v in enumerate(value))
    return (_source(value, path),)


def _lora(value: Any, path: str) -> LoraSource | None:
    if value is None:
        return None
    if isinstance(value, str):
        return LoraSource(_string(value, path))
    if not isinstance(value, Mapping):
        raise ResourceError(path, "must be a metric name, a mapping, or null")
    unknown = set(value) - {"name", *_LORA_KEYS}
    if unknown:
        raise ResourceError(path, f"unknown keys {sorted(unknown)}")
    kwargs = {_LORA_KEYS[k]: _string(v, f"{path}.{k}") for k, v in value.items() if k != "name"}
    return LoraSource(_string(value.get("name"), f"{path}.name"), **kwargs)


def apply_overrides(
    overrides: Mapping[str, Any] | None,
    base: Mapping[str, EngineSpec] = ENGINES,
    path: str = "engineMetrics",
) -> dict[str, EngineSpec]:
    """Engine specs with the config file's `engineMetrics` section applied (see module doc).

    Engines keep every signal the section does not name; a new engine name starts from its
    `base` engine (default vllm). Raises ResourceError naming the offending field.
    """
    specs = dict(base)
    if not overrides:
        return specs
    if not isinstance(overrides, Mapping):
        raise ResourceError(path, "must be a mapping of engine name to signals")
    for raw_name, signals in overrides.items():
        epath = f"{path}.{raw_name}"
        name = _string(raw_name, epath)
        if signals is None:
            signals = {}
        if not isinstance(signals, Mapping):
            raise ResourceError(epath, "must be a mapping of signal to metric")
        key = ALIASES.get(name.lower().replace("_", "-"), name)
        current = specs.get(name) or specs.get(key)
        if current is None:
            base_name = signals.get("base", DEFAULT_ENGINE)
            base_spec = specs.get(ALIASES.get(str(base_name).lower(), str(base_name)))
            if base_spec is None:
                raise ResourceError(f"{epath}.base", f"unknown engine {base_name!r}")
            current = replace(base_spec, name=name)
        elif "base" in signals:
            raise ResourceError(f"{epath}.base", "only a new engine takes a base")
        changes: dict[str, Any] = {}
        for k, v in signals.items():
            if k == "base":
                continue
            if k == "lora":
                changes["lora"] = _lora(v, f"{epath}.lora")
            elif k in _SIGNAL_KEYS:
                attr = _SIGNAL_KEYS[k]
                changes[attr] = _sources(v, f"{epath}.{k}", attr in _REQUIRED)
            else:
                raise ResourceError(f"{epath}.{k}", f"unknown signal; expected one of {sorted(_SIGNAL_KEYS)}")
        specs[current.name] = replace(current, **changes)
    return specs


# ---- the reference's command-line flags and the config's data layer ---------------------------

_SPEC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_SPEC_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^",}\s]*))\s*(,|})')


def parse_spec(text: str, path: str = "metric") -> Source:
    """A metric in the reference's flag syntax: `name` or `name{label=value,label2="value"}`
    (PromQL selector with equality matchers; quotes optional). Raises ResourceError."""
    spec = text.strip()
    if len(spec) >= 2 and spec[0] == spec[-1] and spec[0] in "'\"":
        spec = spec[1:-1].strip()  # the chart renders `--flag="name"`: the quotes reach the value
    m = _SPEC_NAME.match(spec)
    if m is None:
        raise ResourceError(path, f"{text!r} is not a metric name or name{{label=value}}")
    name, rest = m.group(0), spec[m.end():].strip()
    match: list[tuple[str, str]] = []
    if rest:
        if not rest.startswith("{") or not rest.endswith("}"):
            raise ResourceError(path, f"{text!r}: expected {{label=value,...}} after the name")
        i, body = 1, rest
        if body[1:].strip() != "}":
            while True:
                lm = _SPEC_LABEL.match(body, i)
                if lm is None:
                    raise ResourceError(path, f"{text!r}: malformed label matcher at {body[i:]!r}")
                value = lm.group(2) if lm.group(2) is not None else lm.group(3)
                match.append((lm.group(1), value.replace('\\"', '"').replace("\\\\", "\\")))
                i = lm.end()
                if lm.group(4) == "}":
                    break
            if body[i:].strip():
                raise ResourceError(path, f"{text!r}: text after the closing brace")
    return Source(name, tuple(match))


def _cache_info(source: Source, current: EngineSpec) -> tuple[tuple[Source, ...], tuple[Source, ...]]:
    """Block size and count read from the labels of info metric `source`; the label names are those
    a built-in engine reads from a metric of that name (sglang: page_size/num_pages), else vLLM's.
    The current spec's plain gauges stay as later alternatives."""
    size_label, count_label = "block_size", "num_gpu_blocks"
    for spec in ENGINES.values():
        size = next((s for s in spec.block_size if s.name == source.name and s.label), None)
        count = next((s for s in spec.num_blocks if s.name == source.name and s.label), None)
        if size is not None and count is not None:
            size_label, count_label = size.label, count.label
            break
    size_src = (replace(source, label=size_label), *(s for s in current.block_size if not s.label))
    count_src = (replace(source, label=count_label), *(s for s in current.num_blocks if not s.label))
    return size_src, count_src


def apply_flag_overrides(
    engines: Mapping[str, EngineSpec],
    *,
    scheme: str | None = None,
    path: str | None = None,
    port: int | None = None,
    insecure_skip_verify: bool | None = None,
    queued: str | None = None,
    running: str | None = None,
    kv: str | None = None,
    lora: str | None = None,
    cache_info: str | None = None,
    engine: str = DEFAULT_ENGINE,
) -> dict[str, EngineSpec]:
    """Engine specs with the reference's metric flags applied; None means "flag not given".

    `scheme`/`path`/`port`/`insecure_skip_verify` (`--model-server-metrics-*`) apply to every
    engine: the reference has one setting for the pool. The signal flags
    (`--total-queued-requests-metric`, `--total-running-requests-metric`,
    `--kv-cache-usage-percentage-metric`, `--lora-info-metric`, `--cache-info-metric`) take the
    reference's syntax `name{label=value}` and change the `engine` spec (default vllm: what pods
    without an engine-type label read, which is where the reference applies them); `lora=""` and
    `cache_info=""` switch those signals off. Raises ResourceError naming the flag.
    """
    if scheme is not None and scheme not in ("http", "https"):
        raise ResourceError("--model-server-metrics-scheme", f"must be http or https, not {scheme!r}")
    if port is not None and not 0 < port < 65536:
        raise ResourceError("--model-server-metrics-port", f"must be 1..65535, not {port}")
    if path is not None:
        path = path.strip() or "/metrics"
        path = path if path.startswith("/") else "/" + path
    specs = dict(engines)
    where: dict[str, Any] = {k: v for k, v in (("scheme", scheme), ("path", path), ("port", port),
                                               ("insecure_skip_verify", insecure_skip_verify)) if v is not None}
    if where:
        specs = {name: replace(spec, **where) for name, spec in specs.items()}
    changes: dict[str, Any] = {}
    for value, attr, flag in ((queued, "waiting", "--total-queued-requests-metric"),
                              (running, "running", "--total-running-requests-metric"),
                              (kv, "kv_usage", "--kv-cache-usage-percentage-metric")):
        if value is not None:
            if not value.strip():
                raise ResourceError(flag, "is required and cannot be empty")
            changes[attr] = (parse_spec(value, flag),)
    current = specs.get(engine) or specs[DEFAULT_ENGINE]
    if lora is not None:
        if lora.strip():
            src = parse_spec(lora, "--lora-info-metric")
            changes["lora"] = LoraSource(src.name) if current.lora is None else replace(current.lora, name=src.name)
        else:
            changes["lora"] = None
    if cache_info is not None:
        if cache_info.strip():
            changes["block_size"], changes["num_blocks"] = _cache_info(
                parse_spec(cache_info, "--cache-info-metric"), current)
        else:
            changes["block_size"], changes["num_blocks"] = (), ()
    if changes:
        specs[current.name] = replace(current, **changes)
    return specs


class DataLayerLike(Protocol):
    """Where the config's `metrics-data-source` reads pages (None or absent: unset)."""

    scheme: str | None
    path: str | None
    port: int | None
    insecure_skip_verify: bool | None


def apply_data_layer(engines: Mapping[str, EngineSpec], data_layer: DataLayerLike | None) -> dict[str, EngineSpec]:
    """Engine specs with the config's data-layer scheme/path/port/insecure applied to every engine."""
    if data_layer is None:
        return dict(engines)
    return apply_flag_overrides(
        engines,
        scheme=getattr(data_layer, "scheme", None) or None,
        path=getattr(data_layer, "path", None) or None,
        port=getattr(data_layer, "port", None) or None,
        insecure_skip_verify=getattr(data_layer, "insecure_skip_verify", None),
    )


__all__ = [
    "ALIASES",
    "DEFAULT_ENGINE",
    "ENGINES",
    "TRITON_METRICS_PORT",
    "DataLayerLike",
    "EngineSpec",
    "LoraSource",
    "MissingMetrics",
    "Source",
    "apply_data_layer",
    "apply_flag_overrides",
    "apply_overrides",
    "parse_spec",
    "read_metrics",
    "resolve_engine",
]

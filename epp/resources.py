"""Typed views of the objects the picker reads, in every API version it accepts.

Both sources (Kubernetes watches and local YAML files) turn raw objects (plain dicts, as the API
server or a YAML file gives them) into these dataclasses with `parse_object`; everything after
that sees only the typed form. Validation errors name the field, so a user can fix the manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

GROUP_V1 = "inference.networking.k8s.io"
GROUP_X = "inference.networking.x-k8s.io"
GROUPS = (GROUP_V1, GROUP_X)
# llm-d's own group: it serves InferenceObjective and InferenceModelRewrite (v1alpha2), not pools.
GROUP_LLMD = "llm-d.ai"

ENGINE_LABELS = ("inference.networking.k8s.io/engine-type", "llm-d.ai/engine-type")
ROLE_LABEL = "llm-d.ai/role"  # prefill / decode / prefill-decode / encode (P/D disaggregation)
ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"

# Criticality (InferenceModel) mapped onto the integer priority of InferenceObjective.
CRITICALITY_PRIORITY = {"Critical": 100, "Standard": 0, "Default": 0, "Sheddable": -1}
CRITICAL_PRIORITY = CRITICALITY_PRIORITY["Critical"]


class ResourceError(ValueError):
    """An object that cannot be used; `field` is a dotted path into the object."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}" if field_path else message)
        self.field = field_path
        self.message = message


@dataclass(frozen=True, slots=True)
class Meta:
    """The metadata every object carries that the picker uses."""

    kind: str
    name: str
    namespace: str
    api_version: str
    created: str = ""  # RFC 3339 creationTimestamp; "" when unknown (files)
    seq: int = 0  # load order, the tie-break when timestamps are equal or absent
    resource_version: str = ""
    uid: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def group(self) -> str:
        return self.api_version.split("/", 1)[0] if "/" in self.api_version else ""


@dataclass(frozen=True, slots=True)
class PoolRef:
    """A reference from a model object to the InferencePool it configures."""

    name: str
    group: str = ""
    kind: str = "InferencePool"


@dataclass(frozen=True, slots=True)
class EndpointPickerRef:
    """InferencePool's endpointPickerRef (v1) / extensionRef (v1alpha2)."""

    name: str
    port: int = 9002
    failure_mode: str = "FailClose"
    group: str = ""
    kind: str = "Service"


@dataclass(frozen=True, slots=True)
class InferencePool:
    """The pool: which pods (selector) and which ports on them serve traffic."""

    meta: Meta
    selector: Mapping[str, str]
    target_ports: tuple[int, ...]
    app_protocol: str = "http"
    picker: EndpointPickerRef | None = None


@dataclass(frozen=True, slots=True)
class TargetModel:
    """One weighted target of an InferenceModel or an InferenceModelRewrite rule."""

    name: str
    weight: int | None = None  # None: weight not given


@dataclass(frozen=True, slots=True)
class InferenceModel:
    """InferenceModel v1alpha1/v1alpha2: a client-facing model name and its weighted targets."""

    meta: Meta
    model_name: str
    criticality: str
    targets: tuple[TargetModel, ...]
    pool_ref: PoolRef

    @property
    def priority(self) -> int:
        return CRITICALITY_PRIORITY.get(self.criticality, 0)


@dataclass(frozen=True, slots=True)
class RewriteRule:
    """One rule: any of `matches` (exact model names; empty = generic) → weighted targets."""

    matches: tuple[str, ...]
    targets: tuple[TargetModel, ...]


@dataclass(frozen=True, slots=True)
class InferenceModelRewrite:
    """InferenceModelRewrite (both API groups): rules that rewrite the body's model."""

    meta: Meta
    pool_ref: PoolRef
    rules: tuple[RewriteRule, ...]


@dataclass(frozen=True, slots=True)
class InferenceObjective:
    """InferenceObjective: a named priority chosen by the x-gateway-inference-objective header."""

    meta: Meta
    priority: int
    pool_ref: PoolRef


@dataclass(frozen=True, slots=True)
class Pod:
    """The parts of a Pod the picker needs."""

    meta: Meta
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    ip: str
    ready: bool
    terminating: bool

    @property
    def routable(self) -> bool:
        return self.ready and not self.terminating and bool(self.ip)

    @property
    def engine(self) -> str:
        for label in ENGINE_LABELS:
            value = self.labels.get(label)
            if value:
                return value
        return "vllm"

    @property
    def role(self) -> str:
        """The `llm-d.ai/role` label ("" when absent), kept for P/D disaggregation."""
        return self.labels.get(ROLE_LABEL, "")

    def active_ports(self) -> frozenset[int] | None:
        """Ports named by the active-ports annotation, or None when the annotation is absent."""
        raw = self.annotations.get(ACTIVE_PORTS_ANNOTATION)
        if raw is None:
            return None
        ports = set()
        for part in raw.split(","):
            part = part.strip()
            if part.isdigit():
                ports.add(int(part))
        return frozenset(ports)


Resource = InferencePool | InferenceModel | InferenceModelRewrite | InferenceObjective | Pod

# kind -> accepted apiVersions
KINDS: dict[str, tuple[str, ...]] = {
    "InferencePool": (f"{GROUP_V1}/v1", f"{GROUP_X}/v1alpha2", f"{GROUP_X}/v1alpha1"),
    "InferenceModel": (f"{GROUP_X}/v1alpha1", f"{GROUP_X}/v1alpha2"),
    "InferenceModelRewrite": (f"{GROUP_X}/v1alpha2", f"{GROUP_V1}/v1alpha2", f"{GROUP_LLMD}/v1alpha2"),
    "InferenceObjective": (f"{GROUP_X}/v1alpha2", f"{GROUP_V1}/v1alpha2", f"{GROUP_LLMD}/v1alpha2"),
    "Pod": ("v1",),
}


def _get(obj: Mapping[str, Any], key: str, path: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ResourceError(f"{path}.{key}" if path else key, f"expected {want}, got {type(value).__name__}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _str_map(value: Any, path: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ResourceError(path, f"expected a map of strings, got {type(value).__name__}")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str | int | float | bool):
            raise ResourceError(f"{path}.{k}", "expected a string value")
        out[k] = v if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)
    return out


def _port(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ResourceError(path, f"expected a port number 1-65535, got {value!r}")
    return value


def _meta(obj: Mapping[str, Any], default_namespace: str, seq: int) -> Meta:
    api_version = obj.get("apiVersion")
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ResourceError("kind", "missing")
    if not isinstance(api_version, str) or not api_version:
        raise ResourceError("apiVersion", "missing")
    md = _get(obj, "metadata", "", Mapping, {})
    name = _get(md, "name", "metadata", str, "")
    if not name:
        raise ResourceError("metadata.name", "missing")
    ns = _get(md, "namespace", "metadata", str, "") or default_namespace
    created = md.get("creationTimestamp") or ""
    return Meta(
        kind=kind,
        name=name,
        namespace=ns,
        api_version=api_version,
        created=str(created),
        seq=seq,
        resource_version=str(md.get("resourceVersion") or ""),
        uid=str(md.get("uid") or ""),
    )


def _pool_ref(spec: Mapping[str, Any], path: str) -> PoolRef:
    ref = _get(spec, "poolRef", path, Mapping)
    if ref is None:
        raise ResourceError(f"{path}.poolRef", "missing")
    name = _get(ref, "name", f"{path}.poolRef", str, "")
    if not name:
        raise ResourceError(f"{path}.poolRef.name", "missing")
    return PoolRef(
        name=name,
        group=_get(ref, "group", f"{path}.poolRef", str, ""),
        kind=_get(ref, "kind", f"{path}.poolRef", str, "InferencePool") or "InferencePool",
    )


def _targets(items: Any, path: str, name_key: str, max_items: int | None) -> tuple[TargetModel, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        raise ResourceError(path, f"expected a list, got {type(items).__name__}")
    if max_items is not None and len(items) > max_items:
        raise ResourceError(path, f"at most {max_items} items, got {len(items)}")
    out = []
    for i, item in enumerate(items):
        p = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            raise ResourceError(p, "expected an object")
        name = _get(item, name_key, p, str, "")
        if not name:
            raise ResourceError(f"{p}.{name_key}", "missing")
        if len(name) > 253:
            raise ResourceError(f"{p}.{name_key}", "longer than 253 characters")
        weight = item.get("weight")
        bad = isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1_000_000
        if weight is not None and bad:
            raise ResourceError(f"{p}.weight", f"expected an integer 0-1000000, got {weight!r}")
        out.append(TargetModel(name=name, weight=weight))
    return tuple(out)


def _parse_pool(obj: Mapping[str, Any], meta: Meta) -> InferencePool:
    spec = _get(obj, "spec", "", Mapping)
    if spec is None:
        raise ResourceError("spec", "missing")
    v1 = meta.api_version.startswith(GROUP_V1 + "/")
    sel = _get(spec, "selector", "spec", Mapping, {})
    if v1:
        if "matchLabels" not in sel and sel:
            raise ResourceError("spec.selector.matchLabels", "missing (v1 pools use selector.matchLabels)")
        selector = _str_map(sel.get("matchLabels"), "spec.selector.matchLabels")
    else:
        selector = _str_map(sel, "spec.selector")
    if not selector:
        raise ResourceError("spec.selector", "must select at least one label")

    ports: list[int] = []
    if v1:
        tps = _get(spec, "targetPorts", "spec", list, [])
        if not 1 <= len(tps) <= 8:
            raise ResourceError("spec.targetPorts", f"expected 1-8 ports, got {len(tps)}")
        for i, tp in enumerate(tps):
            if not isinstance(tp, Mapping):
                raise ResourceError(f"spec.targetPorts[{i}]", "expected an object with number")
            ports.append(_port(tp.get("number"), f"spec.targetPorts[{i}].number"))
        if len(set(ports)) != len(ports):
            raise ResourceError("spec.targetPorts", "port numbers must be unique")
    else:
        ports.append(_port(spec.get("targetPortNumber"), "spec.targetPortNumber"))

    app_protocol = _get(spec, "appProtocol", "spec", str, "http") or "http"
    if app_protocol not in ("http", "kubernetes.io/h2c"):
        raise ResourceError("spec.appProtocol", f"expected http or kubernetes.io/h2c, got {app_protocol!r}")

    picker = None
    ref_key = "endpointPickerRef" if v1 else "extensionRef"
    ref = _get(spec, ref_key, "spec", Mapping)
    if ref is not None:
        p = f"spec.{ref_key}"
        port_field = ref.get("port")
        if isinstance(port_field, Mapping):
            port = _port(port_field.get("number"), f"{p}.port.number")
        elif port_field is not None:
            port = _port(port_field, f"{p}.port")
        elif ref.get("portNumber") is not None:
            port = _port(ref.get("portNumber"), f"{p}.portNumber")
        else:
            port = 9002
        failure = _get(ref, "failureMode", p, str, "FailClose") or "FailClose"
        if failure not in ("FailOpen", "FailClose"):
            raise ResourceError(f"{p}.failureMode", f"expected FailOpen or FailClose, got {failure!r}")
        name = _get(ref, "name", p, str, "")
        if not name:
            raise ResourceError(f"{p}.name", "missing")
        picker = EndpointPickerRef(
            name=name,
            port=port,
            failure_mode=failure,
            group=_get(ref, "group", p, str, ""),
            kind=_get(ref, "kind", p, str, "Service") or "Service",
        )
    return InferencePool(meta=meta, selector=selector, target_ports=tuple(ports), app_protocol=app_protocol,
                         picker=picker)


def _parse_model(obj: Mapping[str, Any], meta: Meta) -> InferenceModel:
    spec = _get(obj, "spec", "", Mapping)
    if spec is None:
        raise ResourceError("spec", "missing")
    model_name = _get(spec, "modelName", "spec", str, "")
    if not model_name:
        raise ResourceError("spec.modelName", "missing")
    if len(model_name) > 253:
        raise ResourceError("spec.modelName", "longer than 253 characters")
    v1alpha1 = meta.api_version.endswith("/v1alpha1")
    allowed = ("Critical", "Default", "Sheddable") if v1alpha1 else ("Critical", "Standard", "Sheddable")
    crit = _get(spec, "criticality", "spec", str, "") or allowed[1]
    if crit not in allowed:
        raise ResourceError("spec.criticality", f"expected one of {', '.join(allowed)}, got {crit!r}")
    targets = _targets(spec.get("targetModels"), "spec.targetModels", "name", 10)
    given = [t.weight is not None for t in targets]
    if any(given) and not all(given):
        raise ResourceError("spec.targetModels", "weights must be set on all targets or on none")
    return InferenceModel(meta=meta, model_name=model_name, criticality=crit, targets=targets,
                          pool_ref=_pool_ref(spec, "spec"))


def _parse_rewrite(obj: Mapping[str, Any], meta: Meta) -> InferenceModelRewrite:
    spec = _get(obj, "spec", "", Mapping)
    if spec is None:
        raise ResourceError("spec", "missing")
    rules_raw = _get(spec, "rules", "spec", list, [])
    rules = []
    for i, r in enumerate(rules_raw):
        p = f"spec.rules[{i}]"
        if not isinstance(r, Mapping):
            raise ResourceError(p, "expected an object")
        matches = []
        for j, m in enumerate(_get(r, "matches", p, list, []) or []):
            mp = f"{p}.matches[{j}]"
            model = m.get("model") if isinstance(m, Mapping) else None
            if not isinstance(model, Mapping):
                raise ResourceError(f"{mp}.model", "missing")
            mtype = _get(model, "type", f"{mp}.model", str, "Exact") or "Exact"
            if mtype != "Exact":
                raise ResourceError(f"{mp}.model.type", f"only Exact is supported, got {mtype!r}")
            value = _get(model, "value", f"{mp}.model", str, "")
            if not value:
                raise ResourceError(f"{mp}.model.value", "missing")
            matches.append(value)
        targets = _targets(r.get("targets"), f"{p}.targets", "modelRewrite", None)
        if not targets:
            raise ResourceError(f"{p}.targets", "at least one target is required")
        rules.append(RewriteRule(matches=tuple(matches), targets=targets))
    return InferenceModelRewrite(meta=meta, pool_ref=_pool_ref(spec, "spec"), rules=tuple(rules))


def _parse_objective(obj: Mapping[str, Any], meta: Meta) -> InferenceObjective:
    spec = _get(obj, "spec", "", Mapping)
    if spec is None:
        raise ResourceError("spec", "missing")
    prio = spec.get("priority", 0)
    if prio is None:
        prio = 0
    if isinstance(prio, bool) or not isinstance(prio, int):
        raise ResourceError("spec.priority", f"expected an integer, got {prio!r}")
    return InferenceObjective(meta=meta, priority=prio, pool_ref=_pool_ref(spec, "spec"))


def _parse_pod(obj: Mapping[str, Any], meta: Meta) -> Pod:
    md = obj.get("metadata") or {}
    status = _get(obj, "status", "", Mapping, {})
    ready = False
    for c in _get(status, "conditions", "status", list, []) or []:
        if isinstance(c, Mapping) and c.get("type") == "Ready":
            ready = c.get("status") in ("True", True)
    ip = _get(status, "podIP", "status", str, "") or ""
    return Pod(
        meta=meta,
        labels=_str_map(md.get("labels"), "metadata.labels"),
        annotations=_str_map(md.get("annotations"), "metadata.annotations"),
        ip=ip,
        ready=ready,
        terminating=bool(md.get("deletionTimestamp")),
    )


_PARSERS: dict[str, Callable[[Mapping[str, Any], Meta], Resource]] = {
    "InferencePool": _parse_pool,
    "InferenceModel": _parse_model,
    "InferenceModelRewrite": _parse_rewrite,
    "InferenceObjective": _parse_objective,
    "Pod": _parse_pod,
}


def is_known(obj: Any) -> bool:
    """True when `obj` is of a kind the picker reads (other kinds in a manifest are ignored)."""
    return isinstance(obj, Mapping) and obj.get("kind") in _PARSERS


def parse_object(obj: Any, default_namespace: str = "default", seq: int = 0) -> Resource:
    """Turn one raw object into its typed form, or raise ResourceError naming the bad field."""
    if not isinstance(obj, Mapping):
        raise ResourceError("", f"expected an object, got {type(obj).__name__}")
    meta = _meta(obj, default_namespace, seq)
    if meta.kind not in _PARSERS:
        raise ResourceError("kind", f"unsupported kind {meta.kind!r}")
    if meta.api_version not in KINDS[meta.kind]:
        accepted = ", ".join(KINDS[meta.kind])
        raise ResourceError("apiVersion", f"{meta.kind} is read as {accepted}, got {meta.api_version!r}")
    return _PARSERS[meta.kind](obj, meta)


def refers_to_pool(ref: PoolRef, pool_name: str, pool_group: str | None = None) -> bool:
    """Whether a poolRef names the picker's pool (group checked only when the ref gives one)."""
    if ref.name != pool_name or ref.kind != "InferencePool":
        return False
    return not (pool_group and ref.group and ref.group not in GROUPS)


def age_key(meta: Meta) -> tuple[str, int, str]:
    """Sort key: oldest first (creationTimestamp, then load order, then name)."""
    return (meta.created or "~", meta.seq, meta.name)


@dataclass(slots=True)
class ObjectSet:
    """All typed objects of one source for one pool, by kind."""

    pools: list[InferencePool] = field(default_factory=list)
    models: list[InferenceModel] = field(default_factory=list)
    rewrites: list[InferenceModelRewrite] = field(default_factory=list)
    objectives: list[InferenceObjective] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)

    def add(self, r: Resource) -> None:
        if isinstance(r, InferencePool):
            self.pools.append(r)
        elif isinstance(r, InferenceModel):
            self.models.append(r)
        elif isinstance(r, InferenceModelRewrite):
            self.rewrites.append(r)
        elif isinstance(r, InferenceObjective):
            self.objectives.append(r)
        else:
            self.pods.append(r)


def parse_selector(text: str) -> dict[str, str]:
    """`k=v,k2=v2` (the --endpoint-selector flag) as a map; raises ValueError naming the bad part."""
    out: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"bad selector term {part!r}: expected key=value")
        out[k.strip()] = v.strip()
    if not out:
        raise ValueError("selector is empty")
    return out


def pool_from_flags(name: str, namespace: str, selector: Mapping[str, str], ports: list[int]) -> InferencePool:
    """An InferencePool made from --endpoint-selector / --endpoint-target-ports instead of an object."""
    meta = Meta(kind="InferencePool", name=name, namespace=namespace, api_version=f"{GROUP_V1}/v1")
    return InferencePool(meta=meta, selector=dict(selector), target_ports=tuple(ports))

"""The CRDs in deploy/crds: structural, up to date, accept every seed example, reject broken objects."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from epp import resources
from tests.deploy import seeds
from tests.deploy.crdschema import CRD_DIR, Validator, load_crds, structural_problems

pytestmark = pytest.mark.skipif(not CRD_DIR.exists(), reason="deploy/crds missing")

VALIDATOR = Validator()


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("crd_generate", CRD_DIR / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_crds_match_generator() -> None:
    gen = _generator()
    for name, doc in gen.all_crds().items():
        assert (CRD_DIR / name).read_text() == gen.render(doc), (
            f"{name} is stale: run python {CRD_DIR}/generate.py"
        )
    assert gen.main(["--check"]) == 0


@pytest.mark.parametrize("crd", load_crds(), ids=lambda c: c["metadata"]["name"])
def test_crd_is_structural(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
    if spec["group"].endswith(".k8s.io"):  # protected groups need the approval annotation
        assert "api-approved.kubernetes.io" in crd["metadata"].get("annotations", {})
    assert sum(1 for v in spec["versions"] if v["storage"]) == 1
    for v in spec["versions"]:
        schema = v["schema"]["openAPIV3Schema"]
        assert structural_problems(schema) == []
        assert schema["properties"]["metadata"] == {"type": "object"}


def test_every_expected_kind_is_served() -> None:
    served = set(VALIDATOR.versions)
    for kind, versions in resources.KINDS.items():
        if kind == "Pod":
            continue
        for api_version in versions:
            assert (api_version, kind) in served, f"{kind} {api_version} not served"


# ---- seeds ------------------------------------------------------------------------------------------

needs_seeds = pytest.mark.skipif(not seeds.SEEDS.exists(), reason="../shared/seeds not present")


@needs_seeds
def test_seed_examples_are_found() -> None:
    found = seeds.examples(VALIDATOR)
    kinds = sorted((e.obj["kind"], e.obj["apiVersion"]) for e in found)
    # Seed 000 shows three rewrites (in both groups), seed 001 one alpha pool (indentation lost).
    assert kinds == [
        ("InferenceModelRewrite", "inference.networking.k8s.io/v1alpha2"),
        ("InferenceModelRewrite", "inference.networking.k8s.io/v1alpha2"),
        ("InferenceModelRewrite", "inference.networking.x-k8s.io/v1alpha2"),
        ("InferencePool", "inference.networking.x-k8s.io/v1alpha2"),
    ]
    pool = next(e for e in found if e.obj["kind"] == "InferencePool")
    assert pool.flattened
    assert pool.obj["spec"] == {
        "targetPortNumber": 8000,
        "selector": {"app": "vllm-llama3-8b-instruct"},
        "extensionRef": {"name": "vllm-llama3-8b-instruct-epp", "port": 9002, "failureMode": "FailClose"},
    }


@needs_seeds
@pytest.mark.parametrize(
    "example", seeds.examples(VALIDATOR) if seeds.SEEDS.exists() else [], ids=lambda e: f"{e.seed}#{e.index}"
)
def test_seed_example_validates_and_parses(example: seeds.Example) -> None:
    assert VALIDATOR.errors(example.obj) == []
    typed = resources.parse_object(example.obj)
    assert typed.meta.name == example.obj["metadata"]["name"]
    # The defaulted object (what the API server stores) parses to the same thing.
    assert resources.parse_object(VALIDATOR.defaulted(example.obj)) == typed


_MARKER = re.compile(r"^//\s*\+kubebuilder:(validation:)?(\w+)(?:=(.*))?$")
_FIELD = re.compile(r"^(\w+)\s+(\S+)\s+`json:\"(\w+)")
_STRUCT = re.compile(r"^type (\w+) (struct|string)")


def _go_markers(text: str) -> dict[str, dict[str, Any]]:
    """`Struct.jsonField` (or a type name) -> kubebuilder markers from a Go types file."""
    out: dict[str, dict[str, Any]] = {}
    pending: dict[str, Any] = {}
    struct = ""
    for raw in text.splitlines():
        line = raw.strip()
        m = _MARKER.match(line)
        if m:
            pending[m.group(2)] = (m.group(3) or "").strip("`")
        elif line == "// +optional":
            pending["optional"] = True
        elif (m := _STRUCT.match(line)) is not None:
            struct = m.group(1)
            if m.group(2) == "string":
                out[struct] = pending
            pending = {}
        elif (m := _FIELD.match(line)) is not None and struct:
            out[f"{struct}.{m.group(3)}"] = pending | {"gotype": m.group(2)}
            pending = {}
        elif line and not line.startswith("//"):
            pending = {}
    return out


@needs_seeds
def test_inferencemodel_v1alpha1_follows_seed_go_types() -> None:
    text = next(seeds.SEEDS.glob("002_*.txt")).read_text()
    markers = _go_markers(text)
    schema = VALIDATOR.versions[("inference.networking.x-k8s.io/v1alpha1", "InferenceModel")].schema
    spec = schema["properties"]["spec"]
    nodes = {
        "InferenceModelSpec": spec,
        "PoolObjectReference": spec["properties"]["poolRef"],
        "TargetModel": spec["properties"]["targetModels"]["items"],
        "InferenceModelStatus": schema["properties"]["status"],
    }
    seen = set()
    checked = 0
    for key, marks in markers.items():
        if "." not in key:
            continue
        struct, field = key.split(".")
        if struct not in nodes:  # the root object and the list type: metadata plumbing
            continue
        seen.add(struct)
        parent = nodes[struct]
        node = parent["properties"][field]
        required = field in parent.get("required", [])
        assert required == ("Required" in marks), key
        if marks.get("optional"):
            assert not required, key
        for marker, keyword in (
            ("MaxLength", "maxLength"),
            ("MinLength", "minLength"),
            ("MaxItems", "maxItems"),
            ("Minimum", "minimum"),
            ("Maximum", "maximum"),
            ("Pattern", "pattern"),
        ):
            if marker in marks:
                want: Any = marks[marker] if keyword == "pattern" else int(marks[marker])
                assert node[keyword] == want, f"{key} {keyword}"
                checked += 1
        if "default" in marks:
            want = marks["default"].strip('"')
            assert node["default"] == (int(want) if want.isdigit() else want), key
            checked += 1
        enum_type = markers.get(marks["gotype"].lstrip("*"), {})
        if "Enum" in enum_type:
            assert node["enum"] == enum_type["Enum"].split(";"), key
            checked += 1
    assert seen == set(nodes)
    assert checked >= 12  # the parse really found the markers


# ---- valid objects of every kind and version ---------------------------------------------------------


def _pool_v1(**spec: Any) -> dict[str, Any]:
    base = {
        "selector": {"matchLabels": {"app": "vllm"}},
        "targetPorts": [{"number": 8000}, {"number": 8001}],
        "appProtocol": "http",
        "endpointPickerRef": {"name": "pool-epp", "port": {"number": 9002}, "failureMode": "FailOpen"},
    }
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "pool", "namespace": "ns"},
        "spec": base | spec,
    }


def _model(version: str, crit: str, targets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "modelName": "food-review",
        "criticality": crit,
        "poolRef": {"name": "pool", "group": "inference.networking.k8s.io"},
    }
    if targets is not None:
        spec["targetModels"] = targets
    return {
        "apiVersion": f"inference.networking.x-k8s.io/{version}",
        "kind": "InferenceModel",
        "metadata": {"name": "m"},
        "spec": spec,
    }


def _objective(group: str = "inference.networking.x-k8s.io") -> dict[str, Any]:
    return {
        "apiVersion": f"{group}/v1alpha2",
        "kind": "InferenceObjective",
        "metadata": {"name": "premium"},
        "spec": {"priority": 10, "poolRef": {"name": "pool"}},
    }


def _rewrite(group: str = "inference.networking.x-k8s.io") -> dict[str, Any]:
    return {
        "apiVersion": f"{group}/v1alpha2",
        "kind": "InferenceModelRewrite",
        "metadata": {"name": "rw"},
        "spec": {
            "poolRef": {"name": "pool"},
            "rules": [
                {"matches": [{"model": {"value": "a"}}], "targets": [{"modelRewrite": "b", "weight": 1}]}
            ],
        },
    }


VALID = {
    "pool-v1": _pool_v1(),
    "pool-v1-minimal": {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "p"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "targetPorts": [{"number": 1}],
            "endpointPickerRef": {"name": "e", "port": {"number": 1}},
        },
    },
    "pool-v1alpha1": {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
        "kind": "InferencePool",
        "metadata": {"name": "p"},
        "spec": {
            "selector": {"a": "b"},
            "targetPortNumber": 8000,
            "extensionRef": {"name": "e", "portNumber": 9002},
        },
    },
    "model-v1alpha1": _model("v1alpha1", "Default", [{"name": "a"}, {"name": "b", "weight": 0}]),
    "model-v1alpha2": _model(
        "v1alpha2", "Standard", [{"name": "a", "weight": 1}, {"name": "b", "weight": 1000000}]
    ),
    "model-v1alpha2-10-targets": _model("v1alpha2", "Critical", [{"name": f"t{i}"} for i in range(10)]),
    "model-v1alpha2-253": _model("v1alpha2", "Sheddable") | {},
    "objective-x": _objective(),
    "objective-v1": _objective("inference.networking.k8s.io"),
    "rewrite-x": _rewrite(),
    "rewrite-v1": _rewrite("inference.networking.k8s.io"),
    "objective-llm-d": _objective("llm-d.ai"),
    "rewrite-llm-d": _rewrite("llm-d.ai"),
}
VALID["model-v1alpha2-253"]["spec"]["modelName"] = "m" * 253


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_objects_accepted_by_crd_and_parser(name: str) -> None:
    obj = VALID[name]
    assert VALIDATOR.errors(obj) == []
    typed = resources.parse_object(VALIDATOR.defaulted(obj))
    assert typed.meta.kind == obj["kind"]


def test_defaults_match_the_parser() -> None:
    pool = VALIDATOR.defaulted(VALID["pool-v1-minimal"])
    ref = pool["spec"]["endpointPickerRef"]
    assert (ref["kind"], ref["group"], ref["failureMode"]) == ("Service", "", "FailClose")
    typed = resources.parse_object(pool)
    plain = resources.parse_object(VALID["pool-v1-minimal"])
    assert isinstance(typed, resources.InferencePool) and typed == plain
    model = VALIDATOR.defaulted(
        _model("v1alpha1", "Default") | {"spec": {"modelName": "x", "poolRef": {"name": "p"}}}
    )
    assert model["spec"]["criticality"] == "Default"
    assert model["spec"]["poolRef"] == {
        "name": "p",
        "group": "inference.networking.x-k8s.io",
        "kind": "InferencePool",
    }


# ---- broken variants ---------------------------------------------------------------------------------


def _set(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    parts = path.split(".")
    node: Any = out
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


_DELETE = object()
_M2 = _model("v1alpha2", "Standard", [{"name": "a"}])
_M1 = _model("v1alpha1", "Default", [{"name": "a"}])

# (base, path, new value, text expected in an error, whether parse_object must reject it too)
BROKEN: dict[str, tuple[dict[str, Any], str, Any, str, bool]] = {
    "model-missing-poolRef": (_M2, "spec.poolRef", _DELETE, "'poolRef' is a required property", True),
    "model-missing-modelName": (_M2, "spec.modelName", _DELETE, "'modelName' is a required property", True),
    "model-poolRef-no-name": (_M2, "spec.poolRef.name", _DELETE, "'name' is a required property", True),
    "model-weight-too-big": (_M2, "spec.targetModels.0.weight", 1000001, "1000001 is greater than", True),
    "model-weight-negative": (_M1, "spec.targetModels.0.weight", -1, "-1 is less than", True),
    "model-11-targets": (
        _M2,
        "spec.targetModels",
        [{"name": f"t{i}"} for i in range(11)],
        "is too long",
        True,
    ),
    "model-v1alpha1-11-targets": (
        _M1,
        "spec.targetModels",
        [{"name": f"t{i}"} for i in range(11)],
        "is too long",
        True,
    ),
    "model-v1alpha2-Default": (_M2, "spec.criticality", "Default", "is not one of", True),
    "model-v1alpha1-Standard": (_M1, "spec.criticality", "Standard", "is not one of", True),
    "model-bad-criticality": (_M2, "spec.criticality", "Urgent", "is not one of", True),
    "model-name-254": (_M2, "spec.modelName", "m" * 254, "is too long", True),
    "model-target-name-254": (_M2, "spec.targetModels.0.name", "m" * 254, "is too long", True),
    "model-weights-mixed": (
        _M2,
        "spec.targetModels",
        [{"name": "a", "weight": 1}, {"name": "b"}],
        "weights must be set on all targets or on none",
        True,
    ),
    "model-unknown-field": (_M2, "spec.modelname", "typo", "Additional properties are not allowed", False),
    "model-bad-group": (_M2, "spec.poolRef.group", "Not_A_Group", "does not match", False),
    "model-metadata-name": (_M2, "metadata.name", "Bad_Name", "not a DNS subdomain", False),
    "pool-missing-selector": (
        _pool_v1(),
        "spec.selector",
        _DELETE,
        "'selector' is a required property",
        True,
    ),
    "pool-no-ports": (_pool_v1(), "spec.targetPorts", [], "should be non-empty", True),
    "pool-9-ports": (
        _pool_v1(),
        "spec.targetPorts",
        [{"number": 8000 + i} for i in range(9)],
        "is too long",
        True,
    ),
    "pool-dup-ports": (
        _pool_v1(),
        "spec.targetPorts",
        [{"number": 80}, {"number": 80}],
        "port number must be unique",
        True,
    ),
    "pool-port-0": (_pool_v1(), "spec.targetPorts.0.number", 0, "0 is less than", True),
    "pool-port-65536": (_pool_v1(), "spec.targetPorts.0.number", 65536, "is greater than", True),
    "pool-bad-failure-mode": (
        _pool_v1(),
        "spec.endpointPickerRef.failureMode",
        "FailSoft",
        "is not one of",
        True,
    ),
    "pool-bad-app-protocol": (_pool_v1(), "spec.appProtocol", "grpc", "is not one of", True),
    "pool-service-without-port": (
        _pool_v1(),
        "spec.endpointPickerRef.port",
        _DELETE,
        "port is required when kind is 'Service'",
        False,
    ),
    "pool-plain-selector-in-v1": (_pool_v1(), "spec.selector", {"app": "x"}, "Additional properties", True),
    "pool-bad-label-value": (
        _pool_v1(),
        "spec.selector.matchLabels.app",
        "no spaces",
        "does not match",
        False,
    ),
    "objective-not-int": (_objective(), "spec.priority", "high", "is not of type 'integer'", True),
    "objective-missing-poolRef": (
        _objective(),
        "spec.poolRef",
        _DELETE,
        "'poolRef' is a required property",
        True,
    ),
    "rewrite-no-targets": (_rewrite(), "spec.rules.0.targets", [], "should be non-empty", True),
    "rewrite-bad-match-type": (
        _rewrite(),
        "spec.rules.0.matches.0.model.type",
        "Prefix",
        "is not one of",
        True,
    ),
    "rewrite-weight-too-big": (_rewrite(), "spec.rules.0.targets.0.weight", 2000000, "is greater than", True),
    # GIE and llm-d: rules required, a weight is at least 1 (the parser, shared with InferenceModel, takes 0)
    "rewrite-no-rules": (_rewrite(), "spec.rules", _DELETE, "'rules' is a required property", False),
    "rewrite-weight-0": (_rewrite(), "spec.rules.0.targets.0.weight", 0, "0 is less than the minimum of 1", False),
    "rewrite-llm-d-weight-0": (
        _rewrite("llm-d.ai"), "spec.rules.0.targets.0.weight", 0, "0 is less than the minimum of 1", False
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_variant_rejected(name: str) -> None:
    base, path, value, expected, parser_rejects = BROKEN[name]
    assert VALIDATOR.errors(base) == []  # the mutation is what breaks it
    broken = _set(base, path, value)
    errors = VALIDATOR.errors(broken)
    assert any(expected in e for e in errors), errors
    if parser_rejects:
        with pytest.raises(resources.ResourceError):
            resources.parse_object(VALIDATOR.defaulted(broken))


# llm-d router v0.10.0 ships its own CRDs for the llm-d.ai group (config/crd/bases); ours must serve the
# same resources so its manifests apply and the picker's llm-d.ai watches find them.
LLMD_REPO = Path("/work/.mirror/llm-d+llm-d-router/repo")
LLMD_TAG = "v0.10.0"
LLMD_CRDS = ("llm-d.ai_inferenceobjectives.yaml", "llm-d.ai_inferencemodelrewrites.yaml")


def _llmd_crd(name: str) -> dict[str, Any]:
    text = subprocess.run(
        ["git", "-C", str(LLMD_REPO), "show", f"{LLMD_TAG}:config/crd/bases/{name}"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return doc


# What the API server enforces at a schema node (descriptions and printer columns aside).
_CONSTRAINTS = (
    "type", "required", "minimum", "maximum", "minItems", "maxItems", "minLength", "maxLength",
    "enum", "default", "pattern", "format", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
)  # fmt: skip
# Where ours is stricter on purpose (docs/differences.md, "CRDs: objects that cannot route").
_OURS_STRICTER = {("", "required"), (".spec.rules[]", "required")}


def _constraints(schema: dict[str, Any], path: str = "") -> dict[tuple[str, str], Any]:
    """(path, keyword) -> value for every constraint of a schema; `required` compared as a set."""
    out = {(path, k): (sorted(v) if k == "required" else v) for k, v in schema.items() if k in _CONSTRAINTS}
    for key, node in schema.get("properties", {}).items():
        out |= _constraints(node, f"{path}.{key}")
    if "items" in schema:
        out |= _constraints(schema["items"], f"{path}[]")
    return out


@pytest.mark.skipif(not LLMD_REPO.exists(), reason="llm-d router mirror not present")
@pytest.mark.parametrize("name", LLMD_CRDS)
def test_llm_d_group_crds_serve_what_llm_d_ships(name: str) -> None:
    """Same CRD name, group, names, scope, versions (served/storage/status), and the same constraints at
    every field path (types, required, bounds, enums, defaults, patterns) as llm-d's file, except where
    ours refuses objects that cannot route."""
    theirs = _llmd_crd(name)
    ours = yaml.safe_load((CRD_DIR / name).read_text())
    assert ours["metadata"]["name"] == theirs["metadata"]["name"]
    for key in ("group", "names", "scope"):
        assert ours["spec"][key] == theirs["spec"][key], key
    assert "api-approved.kubernetes.io" not in ours["metadata"].get("annotations", {})  # not a k8s.io group

    def versions(crd: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [(v["name"], v["served"], v["storage"], v.get("subresources")) for v in crd["spec"]["versions"]]

    assert versions(ours) == versions(theirs)
    for mine, their in zip(ours["spec"]["versions"], theirs["spec"]["versions"], strict=True):
        a = _constraints(mine["schema"]["openAPIV3Schema"])
        b = _constraints(their["schema"]["openAPIV3Schema"])
        assert {p for p, _ in a} == {p for p, _ in b}  # the same fields
        differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
        assert differ == _OURS_STRICTER & differ, sorted(differ - _OURS_STRICTER)


def test_llm_d_group_objects_parse_like_the_inference_groups() -> None:
    """An llm-d.ai object, defaulted by our CRD, parses to what the same object in x-k8s.io does (the
    pool reference defaults to the inference.networking.k8s.io pool, as llm-d's CRD defaults it)."""
    for kind in ("objective", "rewrite"):
        llmd = resources.parse_object(VALIDATOR.defaulted(VALID[f"{kind}-llm-d"]))
        x = resources.parse_object(VALIDATOR.defaulted(VALID[f"{kind}-x"]))
        assert llmd.meta.api_version == "llm-d.ai/v1alpha2"
        assert dataclasses.replace(llmd, meta=x.meta) == x  # type: ignore[type-var]
        assert VALIDATOR.defaulted(VALID[f"{kind}-llm-d"])["spec"]["poolRef"]["group"] == "inference.networking.k8s.io"


def test_unknown_kind_or_version_rejected() -> None:
    assert VALIDATOR.errors(_model("v1", "Standard"))[0].startswith("no CRD serves")
    pool = _pool_v1()
    pool["apiVersion"] = "inference.networking.k8s.io/v1alpha2"
    assert VALIDATOR.errors(pool)


def test_crd_files_are_only_crds() -> None:
    names = {p.name for p in Path(CRD_DIR).glob("*.yaml")} - {"kustomization.yaml"}
    assert names == set(_generator().all_crds())

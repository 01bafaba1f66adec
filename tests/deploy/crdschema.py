"""Validate custom resources against our CRDs offline, as the API server would.

The API server validates a custom resource against the CRD's OpenAPI v3 structural schema after
applying defaults, rejects unknown fields under strict field validation (kubectl's default), checks
metadata itself and evaluates CEL `x-kubernetes-validations`. This module does the same with the
`jsonschema` package: it turns the structural schema into JSON Schema (closing objects that declare
properties, mapping int-or-string / nullable), applies defaults first, and evaluates the CEL rules the
CRDs use by name (an unknown rule is an error, so a new rule needs a Python twin here).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "deploy" / "crds"

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _has(v: Any, key: str) -> bool:
    return isinstance(v, dict) and key in v


# The CEL rules our CRDs use, each with a Python twin taking the value at the rule's node.
CEL: dict[str, Callable[[Any], bool]] = {
    "self.all(p1, self.exists_one(p2, p1.number == p2.number))": lambda s: all(
        sum(1 for p2 in s if p2.get("number") == p1.get("number")) == 1 for p1 in s
    ),
    "self.kind != 'Service' || has(self.port)": lambda s: s.get("kind") != "Service" or _has(s, "port"),
    "self.all(t, has(t.weight)) || self.all(t, !has(t.weight))": lambda s: (
        all(_has(t, "weight") for t in s) or all(not _has(t, "weight") for t in s)
    ),
}

# Keywords a structural schema may use (apiextensions.k8s.io/v1 JSONSchemaProps minus the forbidden ones).
ALLOWED_KEYWORDS = {
    "type", "format", "description", "properties", "required", "items", "additionalProperties",
    "enum", "default", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
    "maxLength", "pattern", "minItems", "maxItems", "minProperties", "maxProperties", "nullable",
    "title", "example", "externalDocs", "multipleOf", "allOf", "anyOf", "oneOf", "not",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
    "x-kubernetes-validations",
}  # fmt: skip


@dataclass(frozen=True)
class Version:
    """One served version of one CRD."""

    group: str
    kind: str
    name: str
    schema: dict[str, Any]


def load_crds(directory: Path = CRD_DIR) -> list[dict[str, Any]]:
    """Every CRD document in the folder."""
    out = []
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                out.append(doc)
    return out


def served_versions(crds: Iterable[dict[str, Any]]) -> dict[tuple[str, str], Version]:
    """(apiVersion, kind) -> the served version's schema."""
    out = {}
    for crd in crds:
        spec = crd["spec"]
        for v in spec["versions"]:
            if v.get("served"):
                key = (f"{spec['group']}/{v['name']}", spec["names"]["kind"])
                out[key] = Version(
                    spec["group"], spec["names"]["kind"], v["name"], v["schema"]["openAPIV3Schema"]
                )
    return out


def structural_problems(schema: Any, path: str = "") -> list[str]:
    """Where a CRD schema breaks the structural-schema rules (the subset that matters for our CRDs)."""
    problems: list[str] = []
    if not isinstance(schema, dict):
        return [f"{path}: not an object"]
    for key in schema:
        if key not in ALLOWED_KEYWORDS:
            problems.append(f"{path}: keyword {key!r} not allowed in a structural schema")
    special = schema.get("x-kubernetes-int-or-string") or schema.get("x-kubernetes-preserve-unknown-fields")
    if "type" not in schema and not special:
        problems.append(f"{path}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{path}: both properties and additionalProperties")
    if schema.get("type") == "array" and "items" not in schema:
        problems.append(f"{path}: array without items")
    for rule in schema.get("x-kubernetes-validations", []):
        if rule.get("rule") not in CEL:
            problems.append(f"{path}: CEL rule {rule.get('rule')!r} has no Python twin in tests")
    if schema.get("x-kubernetes-list-type") == "map":
        item = schema.get("items", {})
        for k in schema.get("x-kubernetes-list-map-keys", []):
            prop = item.get("properties", {}).get(k)
            if prop is None or (k not in item.get("required", []) and "default" not in prop):
                problems.append(f"{path}: list-map key {k!r} must be a required or defaulted property")
    if "default" in schema:
        try:
            jsonschema.Draft7Validator(to_json_schema(schema)).validate(schema["default"])
        except jsonschema.ValidationError as e:
            problems.append(f"{path}: default {schema['default']!r} is invalid: {e.message}")
    for name, sub in schema.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += structural_problems(schema["additionalProperties"], f"{path}.*")
    if "items" in schema:
        problems += structural_problems(schema["items"], f"{path}[]")
    return problems


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3 structural schema -> JSON Schema (draft 7) with strict unknown-field handling."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in (
            "description",
            "default",
            "format",
            "nullable",
            "example",
        ):
            continue
        if key == "properties":
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False  # strict field validation: unknown fields are errors
    return out


def apply_defaults(value: Any, node: dict[str, Any]) -> Any:
    """The value with the schema's defaults filled in (objects that are present only, as the server does)."""
    if isinstance(value, dict) and node.get("type") == "object":
        out = dict(value)
        for name, sub in node.get("properties", {}).items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(out[name], sub)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out = {k: apply_defaults(v, extra) for k, v in out.items()}
        return out
    if isinstance(value, list) and node.get("type") == "array" and isinstance(node.get("items"), dict):
        return [apply_defaults(v, node["items"]) for v in value]
    return value


def _cel_errors(value: Any, node: dict[str, Any], path: str) -> list[str]:
    errors = []
    for rule in node.get("x-kubernetes-validations", []):
        fn = CEL.get(rule["rule"])
        if fn is None:
            errors.append(f"{path}: unknown CEL rule {rule['rule']!r}")
        elif not fn(value):
            errors.append(f"{path}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for name, sub in node.get("properties", {}).items():
            if name in value:
                errors += _cel_errors(value[name], sub, f"{path}.{name}")
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            errors += _cel_errors(item, node["items"], f"{path}[{i}]")
    return errors


def _metadata_errors(obj: dict[str, Any]) -> list[str]:
    md = obj.get("metadata")
    if not isinstance(md, dict):
        return ["metadata: missing"]
    errors = []
    name = md.get("name")
    if not isinstance(name, str) or not name:
        errors.append("metadata.name: missing")
    elif len(name) > 253 or not DNS_SUBDOMAIN.match(name):
        errors.append(f"metadata.name: {name!r} is not a DNS subdomain")
    for field in ("labels", "annotations"):
        values = md.get(field, {}) or {}
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            errors.append(f"metadata.{field}: values must be strings")
    return errors


class Validator:
    """Validates custom resources of the kinds our CRDs define."""

    def __init__(self, crds: Iterable[dict[str, Any]] | None = None) -> None:
        self.versions = served_versions(load_crds() if crds is None else crds)

    def knows(self, obj: dict[str, Any]) -> bool:
        return (obj.get("apiVersion"), obj.get("kind")) in self.versions

    def errors(self, obj: dict[str, Any]) -> list[str]:
        """Everything the API server would reject in `obj` (empty: accepted)."""
        key = (obj.get("apiVersion"), obj.get("kind"))
        version = self.versions.get(key)  # type: ignore[arg-type]
        if version is None:
            return [f"no CRD serves {key[0]} {key[1]}"]
        schema = version.schema
        defaulted = apply_defaults(obj, schema)
        js = to_json_schema(schema)
        js["properties"]["metadata"] = {"type": "object"}
        errors = [
            f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in jsonschema.Draft7Validator(js).iter_errors(defaulted)
        ]
        errors += _metadata_errors(defaulted)
        if not errors:  # CEL runs only on schema-valid objects, as in the API server
            errors += _cel_errors(defaulted, schema, "")
        return errors

    def defaulted(self, obj: dict[str, Any]) -> dict[str, Any]:
        """`obj` with the CRD defaults applied (what a GET returns after create)."""
        version = self.versions[(obj["apiVersion"], obj["kind"])]
        return apply_defaults(obj, version.schema)

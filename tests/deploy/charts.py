"""Render the Helm charts offline (helm-python-sdk: Helm's Go library, no helm binary) and read the result."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import yaml

REPO = Path(__file__).resolve().parents[2]
CHARTS = REPO / "deploy" / "charts"
RBAC_CALLS = REPO / "deploy" / "rbac_calls.yaml"

Rule = tuple[str, str, str]  # (apiGroup, resource, verb)


@dataclass
class Rendered:
    """A rendered release: every object, by (kind, name), and the NOTES text."""

    objects: list[dict[str, Any]]
    notes: str

    def get(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]


@functools.cache
def _chart(name: str) -> helm_python.Chart:
    return helm_python.Chart.load(str(CHARTS / name))


def render(chart: str, values: dict[str, Any] | None = None, release: str = "llama", namespace: str = "ml") -> Rendered:
    """Render `chart` as `helm template` would (values checked against values.schema.json)."""
    out = _chart(chart).render(values or {}, name=release, namespace=namespace, is_install=True)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(objects, notes)


def lint(chart: str, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`helm lint --strict` findings above "info" (icon is recommended is info)."""
    report = helm_python.lint(str(CHARTS / chart), values or {}, strict=True, namespace="ml")
    return [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]


def expand_rules(rules: list[dict[str, Any]]) -> set[Rule]:
    """RBAC rules as the set of (group, resource, verb) they grant."""
    return {
        (g, r, v)
        for rule in rules
        for g in rule.get("apiGroups", [])
        for r in rule.get("resources", [])
        for v in rule.get("verbs", [])
    }


def expected_calls(leader_election: bool) -> set[Rule]:
    """deploy/rbac_calls.yaml: the API calls the picker makes."""
    doc = yaml.safe_load(RBAC_CALLS.read_text())
    rules = [r for r in doc["rules"] if leader_election or r.get("when") != "leaderElection"]
    return expand_rules(rules)

"""deploy/examples/gateway: the manifests parse, and their InferencePool backendRefs match what the
inferencepool chart creates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.charts import render
from tests.deploy.crdschema import Validator

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "gateway"
FILES = sorted(EXAMPLES.glob("*.yaml"))
CRDS = Validator()
POOL_GROUPS = {"inference.networking.k8s.io", "inference.networking.x-k8s.io"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pool_refs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        ref
        for d in docs
        if d["kind"] == "HTTPRoute"
        for rule in d["spec"]["rules"]
        for ref in rule.get("backendRefs", [])
        if ref.get("kind") == "InferencePool"
    ]


def test_examples_exist() -> None:
    assert {p.name for p in FILES} >= {"envoy-gateway.yaml", "istio.yaml", "multi-model.yaml"}
    assert (EXAMPLES / "README.md").exists()


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_parses_and_routes_to_pools(path: Path) -> None:
    docs = _docs(path)
    assert docs
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name")
        if CRDS.knows(d):
            assert CRDS.errors(d) == []
    refs = _pool_refs(docs)
    assert refs, "no InferencePool backendRef"
    for ref in refs:
        assert ref["group"] in POOL_GROUPS
        assert "port" not in ref  # an InferencePool backendRef carries no port
    for d in docs:
        if d["kind"] == "HTTPRoute":
            for rule in d["spec"]["rules"]:
                assert rule.get("timeouts", {}).get("request") == "0s"  # long generations


def test_multi_model_routes_by_model_header() -> None:
    docs = _docs(EXAMPLES / "multi-model.yaml")
    route = next(d for d in docs if d["kind"] == "HTTPRoute")
    pools = set()
    for rule in route["spec"]["rules"]:
        headers = rule["matches"][0]["headers"]
        assert [h["name"].lower() for h in headers] == ["x-gateway-model-name"]
        pools.add(rule["backendRefs"][0]["name"])
    assert len(pools) == 2


@pytest.mark.parametrize("example", ["envoy-gateway.yaml", "istio.yaml"])
def test_backend_ref_matches_the_chart(example: str) -> None:
    ref = _pool_refs(_docs(EXAMPLES / example))[0]
    values: dict = {"inferencePool": {"modelServers": {"matchLabels": {"app": "vllm-llama3-8b-instruct"}}}}
    if example == "istio.yaml":
        values["provider"] = {"name": "istio"}
    out = render("inferencepool", values, release=ref["name"], namespace="ml")
    pool = out.get("InferencePool")
    assert pool["metadata"]["name"] == ref["name"]
    assert pool["apiVersion"].split("/")[0] == ref["group"]
    if example == "istio.yaml":
        svc = out.get("Service")
        rule = out.get("DestinationRule")
        assert rule["spec"]["host"].startswith(svc["metadata"]["name"] + ".ml.svc")


def _helm_commands(path: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(release, chart, values) of each `helm install` in a file's comments (`\\` continues a line;
    `--set a.b=v` as Helm reads simple strings)."""
    lines = [line.removeprefix("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    joined = " ".join(lines).replace("\\ ", " ")
    out = []
    for part in joined.split("helm install ")[1:]:
        words = part.split()
        release, chart = words[0], words[1].removeprefix("deploy/charts/")
        values: dict[str, Any] = {}
        for i, w in enumerate(words):
            if w == "--set":
                key, _, value = words[i + 1].partition("=")
                node = values
                *parents, leaf = key.split(".")
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = value
        out.append((release, chart, values))
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_helm_commands_in_examples_render(path: Path) -> None:
    """The install commands the examples show render with this project's charts (required values given)."""
    for release, chart, values in _helm_commands(path):
        out = render(chart, values, release=release)
        assert out.get("Deployment")["metadata"]["name"] == f"{release}-epp"


def test_helm_commands_are_found() -> None:
    found = {p.name: len(_helm_commands(p)) for p in FILES}
    assert found["envoy-gateway.yaml"] == 1 and found["istio.yaml"] == 1

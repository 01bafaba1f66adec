"""The charts run several active-active replicas without leader election (`haMode: active-active`)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.deploy.charts import container, flag, lint, load_values, render


def values(chart: str, **ext: Any) -> dict[str, Any]:
    v = copy.deepcopy(load_values(chart, "defaults"))
    v.setdefault("inferenceExtension", {}).update(ext)
    return v


@pytest.mark.parametrize("chart", ["inferencepool", "standalone"])
def test_active_active_replicas_without_leader_election(chart: str) -> None:
    vals = values(chart, replicas=3, haMode="active-active")
    out = render(chart, vals)
    deploy = out.get("Deployment")
    assert deploy["spec"]["replicas"] == 3
    assert deploy["spec"].get("strategy", {}).get("type") != "Recreate"  # rolling updates: all are ready
    c = container(out)
    args = c["args"]
    assert flag(args, "--ha-mode") == "active-active"
    assert "--ha-enable-leader-election" not in args
    assert c["readinessProbe"]["grpc"]["service"] == "inference-extension"
    assert not lint(chart, vals)


@pytest.mark.parametrize("chart", ["inferencepool", "standalone"])
def test_leader_mode_is_the_default(chart: str) -> None:
    c = container(render(chart, values(chart, replicas=2)))
    assert "--ha-enable-leader-election" in c["args"] and flag(c["args"], "--ha-mode") is None
    with pytest.raises(Exception, match="haMode"):
        render(chart, values(chart, haMode="both"))


@pytest.mark.parametrize("chart", ["inferencepool", "standalone"])
def test_workers_per_replica(chart: str) -> None:
    assert "--workers" not in container(render(chart, values(chart)))["args"]  # one process, as the reference
    vals = values(chart, workers="auto")
    assert flag(container(render(chart, vals))["args"], "--workers") == "auto"
    assert not lint(chart, vals)
    vals = values(chart, replicas=2, haMode="active-active", workers=4)
    assert flag(container(render(chart, vals))["args"], "--workers") == "4"
    with pytest.raises(Exception, match="workers"):  # leader election: one Lease per process
        render(chart, values(chart, replicas=2, workers=2))
    with pytest.raises(Exception, match="workers"):
        render(chart, values(chart, workers=0))


@pytest.mark.parametrize("chart", ["inferencepool", "standalone"])
def test_peers_find_each_other_through_a_headless_service(chart: str) -> None:
    vals = values(chart, replicas=3, haMode="active-active", peers={"enabled": True},
                  networkPolicy={"enabled": True, "gatewayPeers": [{"podSelector": {"matchLabels": {"gw": "x"}}}]})
    out = render(chart, vals, release="llama", namespace="ml")
    args = container(out)["args"]
    svc = next(d for d in out.all("Service") if d["metadata"]["name"].endswith("-peers"))
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert flag(args, "--ha-peers") == f"{svc['metadata']['name']}.ml.svc:9005"
    assert flag(args, "--ha-peer-port") == "9005" and flag(args, "--session-key-file")
    assert {"name": "peers", "containerPort": 9005, "protocol": "TCP"} in container(out)["ports"]
    np = out.get("NetworkPolicy")
    peer_rule = next(r for r in np["spec"]["ingress"] if r["ports"][0]["port"] == 9005)
    assert peer_rule["from"][0]["podSelector"]["matchLabels"] == svc["spec"]["selector"]  # its own pods only
    assert not lint(chart, vals)
    assert not [d for d in render(chart, values(chart)).all("Service") if d["metadata"]["name"].endswith("-peers")]
    with pytest.raises(Exception, match="active-active"):
        render(chart, values(chart, replicas=2, peers={"enabled": True}))
    with pytest.raises(Exception, match="sessionKey"):
        render(chart, values(chart, replicas=2, haMode="active-active", peers={"enabled": True},
                             sessionKey={"enabled": False}))

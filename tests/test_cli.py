"""Flag names, defaults, the --flag=false form, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from epp.cli import parse_args, parse_duration


def test_reference_defaults(monkeypatch):
    monkeypatch.delenv("NAMESPACE", raising=False)
    o = parse_args(["--pool-name", "p"])
    assert (o.grpc_port, o.grpc_health_port, o.metrics_port) == (9002, 9003, 9090)
    assert o.secure_serving is True and o.pool_namespace == "default"
    assert o.refresh_metrics_interval == 0.05 and o.refresh_prometheus_metrics_interval == 5.0
    assert o.pool_group == "inference.networking.k8s.io"


def test_namespace_env_and_bool_forms(monkeypatch):
    monkeypatch.setenv("NAMESPACE", "prod")
    from epp import cli
    o = cli.parse_args(["--pool-name", "p", "--secure-serving=false", "--ha-enable-leader-election"])
    assert o.secure_serving is False and o.ha_enable_leader_election is True
    assert cli.build_parser().parse_args(["--pool-name", "p"]).pool_namespace == "prod"
    assert parse_args(["--pool-name", "p", "--secure-serving", "false"]).secure_serving is False


@pytest.mark.parametrize(("text", "secs"), [("50ms", 0.05), ("5s", 5.0), ("1m30s", 90.0), ("0.2", 0.2)])
def test_durations(text, secs):
    assert parse_duration(text) == pytest.approx(secs)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--pool-name is required"),
        (["--pool-name", "p", "--secure-serving=maybe"], "expected true or false"),
        (["--pool-name", "p", "--grpc-port", "70000"], "port out of range"),
        (["--pool-name", "p", "--refresh-metrics-interval", "fast"], "invalid duration"),
        (["--pool-name", "p", "--endpoint-selector", "app=x"], "must be given together"),
        (["--pool-name", "p", "--endpoints", "10.0.0.1"], "expected ip:port"),
        (["--pool-name", "p", "--manifests", "/nonexistent"], "does not exist"),
        (["--pool-name", "p", "--config-text", "a", "--config-file", "b"], "not both"),
    ],
)
def test_bad_flags_exit_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_module_help_runs():
    out = subprocess.run([sys.executable, "-m", "epp", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--pool-name" in out.stdout and "--manifests" in out.stdout

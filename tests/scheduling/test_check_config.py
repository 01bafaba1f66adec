"""`python -m epp check-config`: run as a real subprocess; exit 0 valid, 1 invalid, 2 usage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "epp", "check-config", *args], input=stdin, capture_output=True,
                          text=True, timeout=60, check=False)


def test_valid_file_exits_0_and_describes_the_profile():
    r = run(str(CONFIGS / "llmd-epp-config.yaml"))
    assert r.returncode == 0, r.stderr
    assert "valid: preset=custom profile=default: decode-filter, max-score-picker, prefix-cache-scorer x2" in r.stdout


def test_invalid_text_reports_every_problem_and_exits_1():
    text = """apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: kv-cache-utilisation-scorer
- type: slo-headroom-tier-filter
- type: queue-scorer
  parameters: {depth: 3}
schedulingProfiles:
- name: a
  plugins: [{pluginRef: queue-scorer}, {pluginRef: missing}]
"""
    r = run("--config-text", text)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines == [
        "--config-text: plugins[0].type: unknown plugin type \"kv-cache-utilisation-scorer\"; did you mean "
        "'kv-cache-utilization-scorer'?",
        "--config-text: plugins[1].type: plugin type \"slo-headroom-tier-filter\" is not yet supported "
        "(latency prediction and SLO routing)",
        "--config-text: plugins[2].parameters.depth: unknown field",
        "--config-text: schedulingProfiles[0].plugins[1].pluginRef: no plugin named \"missing\"",
        "--config-text: invalid (4 problems)",
    ]


def test_warnings_go_to_stdout_with_a_valid_result(tmp_path):
    f = tmp_path / "fc.yaml"
    f.write_text("kind: EndpointPickerConfig\nflowControl: {maxBytes: 1Gi}\n")
    r = run(str(f))
    assert r.returncode == 0 and "warning: flowControl: given, but featureGates does not name flowControl" in r.stdout


def test_engine_metrics_are_checked_like_the_scraper_does(tmp_path):
    f = tmp_path / "e.yaml"
    f.write_text("kind: EndpointPickerConfig\nengineMetrics: {vllm: {waiting: null}}\n")
    r = run(str(f))
    assert r.returncode == 1 and "engineMetrics.vllm.waiting" in r.stderr


def test_stdin_and_usage_errors(tmp_path):
    assert run("-", stdin="kind: EndpointPickerConfig\n").returncode == 0
    assert run().returncode == 2
    assert run("a.yaml", "--config-text", "x").returncode == 2
    missing = run(str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    assert run("--no-such-flag").returncode == 2
    assert run("--config-text", "plugins: [").returncode == 1

"""A standalone pod shut down as the kubelet does it, with the real processes: the picker (rendered args),
the built-in Envoy (rendered ConfigMap, ports from the OS) and a simulated model server. A streaming
request that is open when the pod is deleted must finish."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.deploy.charts import Rendered, container, local_env, render
from tests.deploy.envoy_run import envoy_binary, run_envoy
from tests.deploy.test_charts import _health, _start_picker, _stop
from tests.procs import free_port

pytestmark = [pytest.mark.envoy, pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary")]

# short drain and grace so the test takes seconds; the chart derives the hook and the pod's grace from them
FLAGS = {"drain-timeout": "1s", "shutdown-grace": "8s"}
TOKENS = 100  # at 20 ms a step the stream lasts about 2 s


def _values(sim_port: int, hook: bool) -> dict[str, Any]:
    values: dict[str, Any] = {
        "inferenceExtension": {"flags": FLAGS, "monitoring": {"prometheus": {"auth": {"enabled": False}}}},
        "inferencePool": {"modelServers": {"matchLabels": {"app": "sim"}}, "targetPorts": [{"number": sim_port}]},
        "envoy": {"profile": "lean", "pickerTLS": False},
    }
    if not hook:
        values["envoy"]["preStopSleepSeconds"] = 0
    return values


def _local_envoy_config(out: Rendered, picker_port: int) -> dict[str, Any]:
    """The rendered Envoy config with its listeners and admin on loopback ports from the OS and the
    picker cluster pointed at the test's picker."""
    config = yaml.safe_load(out.get("ConfigMap", "llama-epp-envoy")["data"]["envoy.yaml"])
    config["admin"]["address"]["socket_address"]["port_value"] = 0
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
    picker = next(c for c in config["static_resources"]["clusters"] if c["name"].startswith("epp."))
    endpoint = picker["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["port_value"] = picker_port
    return config


def _running(proc: Any) -> bool:
    """A subprocess.Popen or an asyncio Process still runs."""
    return bool(proc.poll() is None) if isinstance(proc, subprocess.Popen) else proc.returncode is None


async def _delete_pod(pod: dict[str, Any], procs: dict[str, Any]) -> None:
    """What the kubelet does on pod deletion: every container at once, each after its preStop sleep gets
    SIGTERM; whatever still runs at terminationGracePeriodSeconds is killed."""

    async def stop(name: str) -> None:
        spec = next(c for c in pod["containers"] if c["name"] == name)
        delay = ((spec.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
        await asyncio.sleep(delay)
        procs[name].send_signal(signal.SIGTERM)
        while _running(procs[name]):
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(stop(name)) for name in procs]
    _, pending = await asyncio.wait(tasks, timeout=pod["terminationGracePeriodSeconds"])
    for task in pending:
        task.cancel()
    for proc in procs.values():  # SIGKILL after the grace period
        if _running(proc):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


@pytest.mark.parametrize("hook", [True, False], ids=["prestop-hook", "no-hook"])
async def test_open_stream_survives_pod_deletion(hook: bool, tmp_path: Path) -> None:
    """With the chart's preStop hook Envoy outlives the picker's drain + grace, so a stream open at
    deletion ends with [DONE]; without it (preStopSleepSeconds: 0) Envoy exits on SIGTERM at once and
    the stream is cut, which is what the hook is for."""
    from epp.sim.config import DEFAULT_MODEL

    sim_port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "epp.sim", "--port", str(sim_port), "--step-base-ms", "20",
         "--decode-ms-per-seq", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    picker = None
    try:
        assert sim.stdout is not None and "SIM READY" in sim.stdout.readline()
        out = render("standalone", _values(sim_port, hook))
        pod = out.get("Deployment")["spec"]["template"]["spec"]
        envoy_spec = container(out, "envoy")
        assert ("lifecycle" in envoy_spec) == hook
        if hook:  # the hook waits out drain + grace, and the pod's grace covers it
            assert envoy_spec["lifecycle"]["preStop"]["sleep"]["seconds"] == 9
            assert pod["terminationGracePeriodSeconds"] == 14
        pod_obj = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "sim-0", "namespace": "ml", "labels": {"app": "sim"}},
                   "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip
        manifests = tmp_path / "objects.yaml"
        manifests.write_text(yaml.safe_dump_all([out.get("InferencePool"), pod_obj]))
        picker, ports, log = _start_picker(out, tmp_path, ["--manifests", str(manifests)],
                                           local_env(out, "ml", "http://127.0.0.1:9"))  # fmt: skip
        for _ in range(200):  # bounded: until the picker has loaded the pool
            if await _health(ports["health"], "inference-extension") == 1:
                break
            await asyncio.sleep(0.1)
        assert await _health(ports["health"], "inference-extension") == 1, log.read_text()[-3000:]
        async with run_envoy(_local_envoy_config(out, ports["grpc"]), tmp_path) as envoy:
            envoy_proc = envoy.proc
            assert envoy_proc is not None
            body = {"model": DEFAULT_MODEL, "prompt": "hello", "max_tokens": TOKENS, "stream": True}
            lines: list[bytes] = []
            cut: str | None = None
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{envoy.url}/v1/completions", json=body) as reply:
                    assert reply.status == 200, await reply.text()
                    lines.append(await reply.content.readline())  # the stream is open now
                    deletion = asyncio.create_task(_delete_pod(pod, {"epp": picker, "envoy": envoy_proc}))
                    try:
                        async for line in reply.content:
                            lines.append(line)
                    except aiohttp.ClientError as e:
                        cut = type(e).__name__
            await deletion
        done = any(line.strip() == b"data: [DONE]" for line in lines)
        if hook:
            assert cut is None and done, (cut, lines[-3:], log.read_text()[-2000:])
            assert picker.poll() == 0, log.read_text()[-2000:]  # stopped on its own, not killed at the grace
            assert envoy_proc.returncode == 0  # SIGTERM after the hook, not SIGKILL
        else:
            assert cut is not None and not done, (cut, lines[-3:])
    finally:
        _stop(picker)
        sim.kill()
        sim.wait(timeout=10)

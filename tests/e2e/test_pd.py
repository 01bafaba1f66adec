"""P/D disaggregation through a real Envoy: the picker (llm-d's pd-epp-config, pods labelled
`llm-d.ai/role` from manifests) names the decode pod as destination and the prefill pod in
`x-prefiller-host-port`; the decode pod's port is the sidecar (`epp.sidecar`), in front of its
simulated engine; the prefill pod is a simulated engine answering `kv_transfer_params`.

Pods: prefill 127.0.0.2:P, decode 127.0.0.3:P (the sidecar) with its engine on 127.0.0.3:Q."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from epp.sidecar.options import SidecarOptions
from epp.sidecar.proxy import Sidecar
from epp.sim import SimServer, SimServerConfig
from tests.e2e.conftest import E2E, MODEL, TIME_SCALE, GatewayFactory, needs_envoy
from tests.sources.apiserver import ApiServer, pod, pool_v1

pytestmark = [pytest.mark.envoy, needs_envoy]

CONFIG = (Path(__file__).resolve().parents[1] / "configs" / "llmd-pd-epp-config.yaml").read_text()
LONG = "".join(f"chapter {i}: a long story about the quick brown fox and the lazy dog. " for i in range(80))
PREFILL_IP, DECODE_IP = "127.0.0.2", "127.0.0.3"


def shared_port() -> int:
    """A port free on both pod IPs (the pool has one target port)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind((PREFILL_IP, 0))
            port = int(a.getsockname()[1])
            with socket.socket() as b:
                try:
                    b.bind((DECODE_IP, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free on both loopback addresses")


def manifests(port: int) -> str:
    pods = [("prefill-0", "prefill", PREFILL_IP), ("decode-0", "decode", DECODE_IP)]
    docs = [f"apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata: {{name: pool}}\n"
            f"spec: {{selector: {{matchLabels: {{app: vllm}}}}, targetPorts: [{{number: {port}}}]}}\n"]
    docs += [f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {n}, labels: {{app: vllm, llm-d.ai/role: {r}}}}}\n"
             f"status: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n" for n, r, ip in pods]
    return "---\n".join(docs)


@dataclass
class PD:
    e2e: E2E
    prefill: SimServer
    engine: SimServer
    sidecar: Sidecar

    async def post(self, body: dict[str, Any], **headers: str) -> Any:
        return await self.e2e.post("/v1/completions", body, **headers)


@pytest.fixture
async def pd(gateway: GatewayFactory) -> AsyncIterator[Any]:
    async with contextlib.AsyncExitStack() as stack:

        async def start(**sidecar_options: Any) -> PD:
            port = shared_port()
            prefill = await stack.enter_async_context(SimServer(SimServerConfig(
                name="prefill-0", host=PREFILL_IP, port=port, role="prefill", time_scale=TIME_SCALE)))
            engine = await stack.enter_async_context(SimServer(SimServerConfig(
                name="decode-0", host=DECODE_IP, role="decode", time_scale=TIME_SCALE)))
            opts = SidecarOptions(port=port, host=DECODE_IP, engine_host=DECODE_IP, model_server_port=engine.port,
                                  secure_proxy=False, prefill_retry_backoff=0.01)
            for k, v in sidecar_options.items():
                setattr(opts, k, v)
            sidecar = await Sidecar(opts).start()
            stack.push_async_callback(sidecar.stop)
            e2e = await gateway(sims=[], manifests=manifests(port), endpoints=[], config_text=CONFIG,
                                envoy_endpoints=[f"{PREFILL_IP}:{port}", f"{DECODE_IP}:{port}"])
            for _ in range(250):  # the manifests load, the first scrapes land
                eps = e2e.picker.datastore.endpoints
                if len(eps) == 2 and all(e.metrics is not None for e in eps.values()):
                    break
                await asyncio.sleep(0.02)
            return PD(e2e, prefill, engine, sidecar)

        yield start


async def test_long_prompt_prefills_on_the_prefill_pod_and_streams_whole_from_the_decode_pod(pd) -> None:
    s = await pd()
    body = {"model": MODEL, "prompt": LONG, "max_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}}
    r = await s.post(body, **{"x-request-id": "pd-long"})
    assert r.status == 200, r.text
    events = r.events()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert sum(1 for c in chunks if c["choices"]) == 12
    assert s.e2e.picks["pd-long"] == [f"{DECODE_IP}:{s.sidecar.port}"]
    (p,) = s.prefill.served
    assert p.request_id == "pd-long" and p.kv_transfer == "prefill" and p.completion_tokens == 1 and not p.stream
    (d,) = s.engine.served
    assert d.kv_transfer == "decode" and d.transfer_tokens > 0 and d.completion_tokens == 12 and d.stream
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 12 and usage["prompt_tokens_details"]["cached_tokens"] == p.cached_tokens
    counts = await s.e2e.inflight_settles()
    assert not any(counts.values())


async def test_short_and_cached_prompts_are_decoded_alone(pd) -> None:
    s = await pd()
    r = await s.post({"model": MODEL, "prompt": "hello", "max_tokens": 3})
    assert r.status == 200, r.text
    assert not s.prefill.served and [x.kv_transfer for x in s.engine.served] == [""]
    aligned = LONG[: 64 * 60]  # whole 16-token blocks: a repeat leaves < 16 tokens uncached
    r = await s.post({"model": MODEL, "prompt": aligned, "max_tokens": 3})
    assert r.status == 200 and len(s.prefill.served) == 1
    r = await s.post({"model": MODEL, "prompt": aligned + " Why?", "max_tokens": 3})
    assert r.status == 200 and len(s.prefill.served) == 1  # cached on the decode pod: no second prefill
    assert [x.kv_transfer for x in s.engine.served] == ["", "decode", ""]


async def test_a_client_cannot_choose_the_prefill_pod(pd) -> None:
    s = await pd()
    # stripped at the edge (and removed by the picker): the sidecar never calls this host
    r = await s.post({"model": MODEL, "prompt": "hello", "max_tokens": 2},
                     **{"x-prefiller-host-port": "127.0.0.9:1"})
    assert r.status == 200, r.text
    assert s.sidecar.prefills == 0


async def test_prefill_pod_down_is_a_clean_error_after_the_configured_retries(pd) -> None:
    s = await pd(prefill_max_retries=2)
    await s.prefill.refuse_connections(True)
    r = await s.post({"model": MODEL, "prompt": LONG, "max_tokens": 3, "stream": True})
    assert r.status == 502, r.text
    assert r.json()["type"] == "BadGateway"
    assert s.sidecar.prefill_attempts == 3 and not s.engine.served
    await s.prefill.refuse_connections(False)
    r = await s.post({"model": MODEL, "prompt": LONG + "!", "max_tokens": 3})
    assert r.status == 200, r.text  # back: P/D again


async def test_ssrf_allow_list_refuses_a_prefill_host_outside_the_pool(pd, tmp_path: Path) -> None:
    with ApiServer() as api:
        kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
        api.create(pool_v1("pool", {"app": "vllm"}, [8000]))
        api.create(pod("decode-0", DECODE_IP, {"app": "vllm", "llm-d.ai/role": "decode"}))  # the prefill pod is not
        s = await pd(enable_ssrf_protection=True, inference_pool="default/pool", kubeconfig=kubeconfig)
        assert s.sidecar.allowlist.hosts == {DECODE_IP}
        r = await s.post({"model": MODEL, "prompt": LONG, "max_tokens": 3})
        assert r.status == 403 and "SSRF" in r.text
        assert not s.prefill.served and not s.engine.served
        r = await s.post({"model": MODEL, "prompt": "hello", "max_tokens": 3})
        assert r.status == 200  # decode alone needs no prefill host
        await s.sidecar.stop()  # before the API server goes

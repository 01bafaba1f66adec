"""The P/D sidecar over real HTTP: simulated prefill and decode engines (epp.sim) behind it, a real
aiohttp client in front; the SSRF allow-list against the Kubernetes API-server emulator."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from epp.sidecar.options import SidecarOptions
from epp.sidecar.proxy import PREFILL_HEADER, Sidecar
from epp.sim.server import SimServer, SimServerConfig
from tests.sources.apiserver import ApiServer, pod, pool_v1
from tests.sources.kube_helpers import wait_for

LONG = "".join(f"sentence {i} of a long shared document about the fox and the dog. " for i in range(60))
Make = Callable[..., Awaitable[Sidecar]]


def sim(name: str, role: str) -> SimServer:
    # fast simulated time: a step of ~6 simulated ms takes ~0.06 wall ms
    return SimServer(SimServerConfig(name=name, role=role, time_scale=0.01))


@pytest.fixture
async def engines() -> AsyncIterator[tuple[SimServer, SimServer]]:
    prefill, decode = sim("prefill-0", "prefill"), sim("decode-0", "decode")
    await prefill.start()
    await decode.start()
    yield prefill, decode
    await prefill.stop()
    await decode.stop()


@pytest.fixture
async def make_sidecar(engines: tuple[SimServer, SimServer]) -> AsyncIterator[Make]:
    made: list[Sidecar] = []

    async def make(**kw: Any) -> Sidecar:
        opts = SidecarOptions(port=0, host="127.0.0.1", engine_host="127.0.0.1", secure_proxy=False,
                              model_server_port=engines[1].port, prefill_retry_backoff=0.01)
        for k, v in kw.items():
            setattr(opts, k, v)
        s = await Sidecar(opts).start()
        made.append(s)
        return s

    yield make
    for s in made:
        await s.stop()


async def post(sc: Sidecar, body: dict[str, Any], headers: dict[str, str] | None = None,
               path: str = "/v1/completions") -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as http, http.post(f"http://127.0.0.1:{sc.port}{path}", json=body,
                                                          headers=headers or {}) as r:
        return r.status, await r.read(), dict(r.headers)


def sse_events(raw: bytes) -> list[Any]:
    out: list[Any] = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_without_the_header_it_proxies_to_the_engine(engines, make_sidecar) -> None:
    prefill, decode = engines
    sc = await make_sidecar()
    status, raw, _ = await post(sc, {"prompt": LONG, "max_tokens": 5, "stream": True})
    assert status == 200
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and len(events) == 6  # one chunk per token, then DONE
    assert [r.kv_transfer for r in decode.served] == [""]
    assert not prefill.served and sc.prefills == 0


async def test_with_the_header_prefill_then_decode_streamed_whole(engines, make_sidecar) -> None:
    prefill, decode = engines
    sc = await make_sidecar()
    body = {"prompt": LONG, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    status, raw, _ = await post(sc, body, {PREFILL_HEADER: prefill.address, "x-request-id": "req-1"})
    assert status == 200
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    tokens = [e for e in events[:-1] if e["choices"]]
    assert len(tokens) == 8
    # the prefill pod saw a one-token, non-streaming request asking to keep the KV for a remote decode
    (p,) = prefill.served
    assert p.kv_transfer == "prefill" and not p.stream and p.completion_tokens == 1 and p.request_id == "req-1"
    # the decode pod took the prompt's blocks by transfer and skipped their prefill
    (d,) = decode.served
    assert d.kv_transfer == "decode" and d.stream and d.completion_tokens == 8
    assert d.transfer_tokens == (p.prompt_tokens // 16) * 16 > 0
    assert decode.engine.stats.prefix_queries > 0
    usage = events[-2]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == p.cached_tokens  # the prefill's figure


async def test_cached_tokens_reported_are_the_prefills(engines, make_sidecar) -> None:
    prefill, decode = engines
    sc = await make_sidecar()
    for _ in range(2):  # the second time the prefill pod has the prompt cached
        status, raw, _ = await post(sc, {"prompt": LONG, "max_tokens": 3}, {PREFILL_HEADER: prefill.address})
        assert status == 200
    second = json.loads(raw)
    cached = prefill.served[-1].cached_tokens
    assert cached > 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    assert len(second["choices"][0]["text"]) > 0


async def test_chat_and_sampling_among_several_hosts(engines, make_sidecar) -> None:
    prefill, decode = engines
    sc = await make_sidecar(enable_prefiller_sampling=True)
    header = f"127.0.0.1:1, {prefill.address}"  # port 1: nobody listens (a 502 if it were picked)
    sc.rng.seed(3)
    picks = [sc.rng.randrange(2) for _ in range(4)]
    sc.rng.seed(3)
    statuses = []
    for _ in range(4):
        status, _, _ = await post(sc, {"messages": [{"role": "user", "content": LONG}], "max_tokens": 2},
                                  {PREFILL_HEADER: header}, path="/v1/chat/completions")
        statuses.append(status)
    assert statuses == [200 if p == 1 else 502 for p in picks]


async def test_prefill_pod_down_is_a_clean_502_after_the_retries(engines, make_sidecar) -> None:
    sc = await make_sidecar(prefill_max_retries=2)
    status, raw, _ = await post(sc, {"prompt": LONG, "max_tokens": 3}, {PREFILL_HEADER: "127.0.0.1:1"})
    assert status == 502 and json.loads(raw)["type"] == "BadGateway"
    assert sc.prefill_attempts == 3  # the first try and two retries, same host
    assert not engines[1].served  # the decode engine never saw it


async def test_prefill_errors_reach_the_client_and_only_5xx_gateway_ones_are_retried(engines, make_sidecar) -> None:
    prefill, decode = engines
    sc = await make_sidecar(prefill_max_retries=1)
    prefill.faults.update({"error_rate": 1.0, "error_status": 503})
    status, raw, _ = await post(sc, {"prompt": LONG, "max_tokens": 3}, {PREFILL_HEADER: prefill.address})
    assert status == 503 and "injected failure" in raw.decode()
    assert sc.prefill_attempts == 2
    prefill.faults.update({"error_status": 500})
    status, _, _ = await post(sc, {"prompt": LONG, "max_tokens": 3}, {PREFILL_HEADER: prefill.address})
    assert status == 500 and sc.prefill_attempts == 3  # 500 is not retried
    assert not decode.served


async def test_a_retry_that_succeeds(engines, make_sidecar) -> None:
    prefill, decode = engines
    calls = 0

    async def flaky(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.Response(status=503, text="warming up")
        async with aiohttp.ClientSession() as http, http.post(f"{prefill.url}{request.path}",
                                                              data=await request.read(),
                                                              headers={"Content-Type": "application/json"}) as r:
            return web.Response(status=r.status, body=await r.read(), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/completions", flaky)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        sc = await make_sidecar(prefill_max_retries=1)
        status, raw, _ = await post(sc, {"prompt": LONG, "max_tokens": 2}, {PREFILL_HEADER: f"127.0.0.1:{port}"})
        assert status == 200 and calls == 2
        assert decode.served[-1].kv_transfer == "decode"
    finally:
        await runner.cleanup()


async def test_bad_bodies(engines, make_sidecar) -> None:
    prefill, _ = engines
    sc = await make_sidecar(max_request_bytes=4096)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{sc.port}/v1/completions", data=b"{not json",
                             headers={PREFILL_HEADER: prefill.address}) as r:
            assert r.status == 400 and "invalid JSON" in (await r.json())["message"]
        async with http.post(f"http://127.0.0.1:{sc.port}/v1/completions", json={"prompt": "x" * 8000},
                             headers={PREFILL_HEADER: prefill.address}) as r:
            assert r.status == 413
    assert not prefill.served


async def test_decode_engine_down_is_503(engines, make_sidecar) -> None:
    sc = await make_sidecar(model_server_port=1)
    status, raw, _ = await post(sc, {"prompt": "hi", "max_tokens": 1})
    assert status == 503 and "decode node is not ready" in json.loads(raw)["message"]


async def test_health_and_other_paths(engines, make_sidecar) -> None:
    sc = await make_sidecar()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{sc.port}/health") as r:
            assert r.status == 200
        async with http.get(f"http://127.0.0.1:{sc.port}/v1/models") as r:  # proxied to the engine
            assert r.status == 200 and (await r.json())["data"]


# ---- SSRF allow-list --------------------------------------------------------------------------
@pytest.fixture
def api() -> AsyncIterator[ApiServer]:
    with ApiServer() as server:
        yield server


async def test_ssrf_allow_list_refuses_a_host_outside_the_pool(engines, make_sidecar, api: ApiServer,
                                                                tmp_path: Path) -> None:
    prefill, decode = engines
    kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
    api.create(pool_v1("pd-pool", {"app": "vllm"}, [8000]))
    api.create(pod("prefill-0", "127.0.0.1", {"app": "vllm", "llm-d.ai/role": "prefill"}))
    api.create(pod("stranger", "127.0.0.2", {"app": "other"}))
    sc = await make_sidecar(enable_ssrf_protection=True, inference_pool="default/pd-pool", kubeconfig=kubeconfig,
                            allowlist_refresh=0.1)
    assert sc.allowlist.hosts == {"127.0.0.1"}
    status, raw, _ = await post(sc, {"prompt": LONG, "max_tokens": 2}, {PREFILL_HEADER: "127.0.0.2:8000"})
    assert status == 403 and b"SSRF" in raw
    status, _, _ = await post(sc, {"prompt": LONG, "max_tokens": 2}, {PREFILL_HEADER: prefill.address})
    assert status == 200 and prefill.served
    # the pod leaves the pool: refused from the next refresh on
    api.patch("v1", "Pod", "prefill-0", {"metadata": {"labels": {"app": "gone"}}})
    await wait_for(lambda: not sc.allowlist.hosts, 10, "allow-list refresh")
    status, _, _ = await post(sc, {"prompt": LONG, "max_tokens": 2}, {PREFILL_HEADER: prefill.address})
    assert status == 403 and sc.refused == 2
    # without a prefill header nothing is checked: decode alone
    status, _, _ = await post(sc, {"prompt": "hi", "max_tokens": 1})
    assert status == 200


async def test_ssrf_fails_closed_until_the_pool_is_read(engines, make_sidecar, tmp_path: Path) -> None:
    prefill, _ = engines
    cfg = tmp_path / "kubeconfig"
    cfg.write_text("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n"
                   "contexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\nusers: [{name: u, "
                   "user: {token: t}}]\n")
    sc = await make_sidecar(enable_ssrf_protection=True, inference_pool="pool", kubeconfig=str(cfg))
    assert not sc.allowlist.synced
    status, _, _ = await post(sc, {"prompt": LONG, "max_tokens": 2}, {PREFILL_HEADER: prefill.address})
    assert status == 403


def port_pair() -> int:
    """A port p with p and p + 1 both free on 127.0.0.1."""
    import socket

    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
                return int(p)
    raise RuntimeError("no free port pair")


async def test_data_parallel_ranks_by_listener_and_by_header(make_sidecar) -> None:
    base = port_pair()
    ranks = [await SimServer(SimServerConfig(name=f"rank-{r}", port=base + r, time_scale=0.01)).start()
             for r in range(2)]
    try:
        front = port_pair()
        sc = await make_sidecar(data_parallel_size=2, port=front, model_server_port=base)
        async with aiohttp.ClientSession() as http:
            for port, headers, rank in ((front, {}, 0), (front + 1, {}, 1),
                                        (front, {"x-data-parallel-host-port": f"10.0.0.1:{front + 1}"}, 1)):
                async with http.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                                     headers=headers) as r:
                    assert r.status == 200 and r.headers["x-sim-server"] == f"rank-{rank}"
        status, _, _ = await post(sc, {"prompt": "hi", "max_tokens": 1},
                                  {"x-data-parallel-host-port": f"10.0.0.1:{front + 5}"})
        assert status == 400
    finally:
        for s in ranks:
            await s.stop()


async def test_client_going_away_mid_stream_does_not_hang(engines, make_sidecar) -> None:
    prefill, decode = engines
    sc = await make_sidecar()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{sc.port}/v1/completions",
                             json={"prompt": LONG, "max_tokens": 2000, "stream": True},
                             headers={PREFILL_HEADER: prefill.address}) as r:
            await r.content.readline()  # the first bytes of the stream
    await wait_for(lambda: not decode.engine.running and not decode.engine.waiting, 10, "decode aborted")
    await asyncio.sleep(0)


async def test_engine_dying_mid_stream_is_not_a_clean_end(engines, make_sidecar) -> None:
    prefill, decode = engines
    sc = await make_sidecar()
    decode.faults.update({"die_after_chunks": 3})
    got = b""
    clean = True
    async with aiohttp.ClientSession() as http:
        try:
            async with http.post(f"http://127.0.0.1:{sc.port}/v1/completions",
                                 json={"prompt": LONG, "max_tokens": 50, "stream": True},
                                 headers={PREFILL_HEADER: prefill.address}) as r:
                got = await r.read()
        except aiohttp.ClientPayloadError:
            clean = False
    assert not clean and b"[DONE]" not in got  # the client learns the stream broke


@pytest.mark.parametrize("target", ["169.254.169.254:80/latest/meta-data?x=", "user@127.0.0.1:80", "127.0.0.1",
                                    "[::1:80", "host:port"])
async def test_a_prefill_target_must_be_host_port(engines, make_sidecar, target: str) -> None:
    sc = await make_sidecar()
    status, raw, _ = await post(sc, {"prompt": "hi", "max_tokens": 1}, {PREFILL_HEADER: target})
    assert status == 400 and b"not a host:port" in raw
    assert sc.prefills == 0 and not engines[1].served


async def test_serving_certificate_from_cert_path_is_reloaded(engines, make_sidecar, tmp_path: Path,
                                                              monkeypatch) -> None:
    import ssl as _ssl

    from cryptography import x509

    from epp import tls
    from epp.sidecar import proxy

    monkeypatch.setattr(proxy, "CERT_CHECK", 0.05)

    def write(names: list[str]) -> None:
        pair = tls.self_signed(names)
        (tmp_path / "tls.crt").write_bytes(pair.cert)
        (tmp_path / "tls.key").write_bytes(pair.key)

    async def served_cn() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, ssl=ctx)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        cert = x509.load_der_x509_certificate(der)
        return cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value

    write(["first.example"])
    ctx = _ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, _ssl.CERT_NONE
    sc = await make_sidecar(secure_proxy=True, cert_path=str(tmp_path))
    assert await served_cn() == "first.example"
    pair = tls.self_signed(["torn.example"])  # a new certificate with a half-written key: kept out
    (tmp_path / "tls.crt").write_bytes(pair.cert)
    (tmp_path / "tls.key").write_bytes(pair.key[:40])
    await asyncio.sleep(0.2)
    assert await served_cn() == "first.example"
    write(["second.example"])
    deadline = asyncio.get_running_loop().time() + 10
    while await served_cn() != "second.example":
        assert asyncio.get_running_loop().time() < deadline, "certificate not reloaded"
        await asyncio.sleep(0.05)

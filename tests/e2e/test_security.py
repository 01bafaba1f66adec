"""Attacks through the generated Envoy configs (real Envoy, the picker, simulators, all on 127.0.0.1);
docs/security.md describes each attack and its fix."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from epp.envoyconf import (
    CONFORMANCE_HEADER,
    DEST_HEADER,
    EPP_FILTER,
    FAIRNESS_HEADER,
    OBJECTIVE_HEADER,
    REWRITE_HEADER,
    SERVED_HEADER,
    PickerTLS,
)
from epp.sim import SimServerConfig
from tests.e2e.certs import CA
from tests.e2e.conftest import E2E, MODEL, GatewayFactory, Reply, needs_envoy
from tests.e2e.h2client import tiny_frames_post
from tests.e2e.test_routing import chat

pytestmark = [pytest.mark.envoy, needs_envoy]

BOUND = 60.0  # seconds: nothing here may take longer
FRAMES, FRAME_SIZE = 100000, 2  # a ~200 KB body in 100k DATA frames


def _slow_sims(n: int) -> list[SimServerConfig]:
    # real time (6 ms per decode step): a 300-token answer streams for about two seconds
    return [SimServerConfig(name=f"sim-{i}", time_scale=1.0, seed=i) for i in range(n)]


async def _victim(e2e: E2E, i: int) -> Reply:
    body = chat(MODEL, f"victim {i}", max_tokens=300, stream=True)
    try:
        return await e2e.post("/v1/chat/completions", body, timeout=BOUND)
    except aiohttp.ClientError as e:  # cut off mid-stream: the attack reached this request
        return Reply(0, {}, str(e).encode())


def _complete(r: Reply) -> bool:
    return r.status == 200 and r.events()[-1:] == ["[DONE]"]


async def _flood_attack(e2e: E2E, frames: int, frame_size: int) -> dict[str, Any]:
    """Six streaming victims in flight, then one request whose ~200 KB body arrives as `frames`
    tiny HTTP/2 DATA frames. Returns what happened to each side."""
    victims = [asyncio.create_task(_victim(e2e, i)) for i in range(6)]
    await asyncio.sleep(0.3)  # the victims' ext_proc streams are open on the picker connection
    before = await e2e.envoy.stats("http.inference.ext_proc.")
    prompt = "x" * (frames * frame_size - 64)
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 1}).encode()
    port = e2e.envoy.ports["inference"]
    t0 = time.process_time()
    attack = await tiny_frames_post("127.0.0.1", port, "/v1/completions", body, frame_size, timeout=BOUND)
    attack_cpu = time.process_time() - t0
    replies = await asyncio.gather(*victims)
    after = await e2e.envoy.stats("http.inference.ext_proc.")
    sent = "http.inference.ext_proc.stream_msgs_sent"
    return {
        "attack": attack,
        "victims_ok": sum(_complete(r) for r in replies),
        "victim_statuses": [r.status for r in replies],
        "msgs": after.get(sent, 0) - before.get(sent, 0),
        "cpu_s": attack_cpu,
    }


@pytest.mark.parametrize("profile", ["duplex", "lean", "buffered"])
async def test_tiny_frame_flood_does_not_kill_other_requests(gateway: GatewayFactory, profile: str) -> None:
    """Attack 1: a ~200 KB body sent as 100k DATA frames of 2 bytes. Envoy used to forward one
    ext_proc message per frame, trip its HTTP/2 outbound-flood limit on the one connection to the
    picker and reset it: every request in flight failed (0 of 6 victims). The generated configs
    coalesce the body before a streamed callout (BUFFERED bodies are whole already)."""
    e2e = await gateway(sims=_slow_sims(2), profile=profile)
    # alone, the attack costs the picker a handful of messages, not one per frame
    sent = "http.inference.ext_proc.stream_msgs_sent"
    before = (await e2e.envoy.stats(sent)).get(sent, 0)
    body = json.dumps({"model": MODEL, "prompt": "x" * 1000, "max_tokens": 1}).encode()
    alone = await tiny_frames_post("127.0.0.1", e2e.envoy.ports["inference"], "/v1/completions", body, 2,
                                   timeout=BOUND)
    assert alone.status == 200 and alone.frames_sent >= len(body) // 2
    assert (await e2e.envoy.stats(sent))[sent] - before <= 7  # duplex: 7 for a whole exchange

    out = await _flood_attack(e2e, frames=FRAMES, frame_size=FRAME_SIZE)
    print(f"\n{profile}: victims ok {out['victims_ok']}/6 {out['victim_statuses']}, attack "
          f"status {out['attack'].status} reset {out['attack'].reset} frames {out['attack'].frames_sent}, "
          f"ext_proc msgs during attack {out['msgs']}, test-process CPU {out['cpu_s']:.2f} s")
    assert out["attack"].frames_sent >= FRAMES
    assert not out["attack"].reset and out["attack"].status == 400  # the simulator: prompt too long
    assert out["victims_ok"] == 6, out["victim_statuses"]
    stats = await e2e.envoy.stats("cluster.epp.default.pool.")
    assert stats["cluster.epp.default.pool.http2.outbound_flood"] == 0
    assert stats["cluster.epp.default.pool.upstream_cx_destroy_local_with_active_rq"] == 0


async def test_body_over_the_limit_is_refused_before_the_picker(gateway: GatewayFactory) -> None:
    """The coalescing buffer is bounded: a body over max_request_bytes gets 413 from Envoy and never
    reaches the picker."""
    limit = 64 * 1024

    def small_limit(config: dict[str, Any]) -> None:
        for f in _hcm(config)["http_filters"]:
            if f["name"] == "envoy.filters.http.buffer":
                f["typed_config"]["max_request_bytes"] = limit

    e2e = await gateway(sims=1, config_edit=small_limit)
    body = json.dumps({"model": MODEL, "prompt": "y" * (2 * limit), "max_tokens": 1}).encode()
    r = await tiny_frames_post("127.0.0.1", e2e.envoy.ports["inference"], "/v1/completions", body, 1024,
                               timeout=BOUND)
    assert r.status == 413
    assert e2e.sims[0].served_total == 0 and not e2e.picks
    ok = await e2e.post("/v1/completions", {"model": MODEL, "prompt": "fits", "max_tokens": 1})
    assert ok.status == 200


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


# ---- attack 2: a client's own destination header -------------------------------------------------


def force_fail_open(config: dict[str, Any]) -> None:
    """failure_mode_allow on, as an operator could edit it in (envoyconf refuses FailOpen with ORIGINAL_DST)."""
    for f in _hcm(config)["http_filters"]:
        if f["name"] == EPP_FILTER:
            f["typed_config"]["failure_mode_allow"] = True


def without_edge_stripping(config: dict[str, Any]) -> None:
    """The configs as they were before the edge removed control headers."""
    force_fail_open(config)
    del _hcm(config)["early_header_mutation_extensions"]


@pytest.mark.parametrize("edit", [force_fail_open, without_edge_stripping], ids=["generated", "unprotected"])
async def test_client_destination_header_never_routes_with_the_picker_down(
    gateway: GatewayFactory, edit: Any
) -> None:
    """Attack 2: FailOpen + buffered + ORIGINAL_DST with the picker down made the client's own
    x-gateway-destination-endpoint Envoy's destination: Envoy's admin interface answered through
    the inference listener. The generated configs remove the header at the edge: no destination,
    503, nothing reached. (`unprotected` shows the attack on a config without that removal.)"""
    e2e = await gateway(sims=1, profile="buffered", routing="original_dst", config_edit=edit)
    await e2e.picker.stop(0)
    sim = e2e.sims[0]
    async with e2e.session.get(e2e.url + "/config_dump", headers={DEST_HEADER: e2e.envoy.admin},
                               timeout=aiohttp.ClientTimeout(total=BOUND)) as r:
        admin_status, admin_body = r.status, await r.read()
    r2 = await e2e.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1}, timeout=BOUND,
                        **{DEST_HEADER: sim.address})
    if edit is without_edge_stripping:
        assert admin_status == 200 and b"configs" in admin_body  # the admin interface answered the client
        assert r2.status == 200 and sim.served_total == 1
        return
    assert admin_status == 503 and b"configs" not in admin_body
    assert r2.status == 503 and sim.served_total == 0


async def test_client_destination_header_is_replaced_by_the_pick(gateway: GatewayFactory) -> None:
    """With the picker up, its destination always wins; the client's copy never reaches the picker."""
    e2e = await gateway(sims=2)
    for i, target in enumerate(e2e.sims * 2):
        rid = f"dest-{i}"
        r = await e2e.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1},
                           **{DEST_HEADER: target.address, "x-request-id": rid,
                              "x_gateway_destination_endpoint": target.address})
        assert r.status == 200
        assert e2e.served_on(rid) == [e2e.sim_at(e2e.picks[rid][0]).name]
        seen = e2e.recording.headers[rid]
        assert DEST_HEADER not in seen and "x_gateway_destination_endpoint" not in seen


# ---- attack 3: client-chosen priority, target model, endpoint --------------------------------------

CLIENT_CHOICES = {
    OBJECTIVE_HEADER: "premium",
    FAIRNESS_HEADER: "tenant-a",
    REWRITE_HEADER: "some-other-model",
    "x-llm-d-inference-objective": "premium",
    "x-llm-d-inference-fairness-id": "tenant-b",
    "x-llm-d-model-name-rewrite": "some-other-model",
    CONFORMANCE_HEADER: "127.0.0.1:1",
    "x-prefiller-host-port": "127.0.0.1:2",
    "x-encoder-hosts-ports": "127.0.0.1:3",
    "x-data-parallel-host-port": "127.0.0.1:5",
    SERVED_HEADER: "127.0.0.1:4",
}


async def test_client_choice_headers_are_removed_unless_allowed(gateway: GatewayFactory) -> None:
    e2e = await gateway(sims=1)
    r = await e2e.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1},
                       **{"x-request-id": "strict", **CLIENT_CHOICES})
    assert r.status == 200 and r.json()["model"] == MODEL  # no rewrite to some-other-model
    seen = e2e.recording.headers["strict"]
    assert not set(CLIENT_CHOICES) & set(seen), seen


async def test_allowed_client_headers_reach_the_picker(gateway: GatewayFactory) -> None:
    e2e = await gateway(sims=1, allow_client_headers=[OBJECTIVE_HEADER, FAIRNESS_HEADER])
    r = await e2e.post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1},
                       **{"x-request-id": "allowed", **CLIENT_CHOICES})
    assert r.status == 200
    seen = e2e.recording.headers["allowed"]
    assert seen[OBJECTIVE_HEADER] == "premium" and seen[FAIRNESS_HEADER] == "tenant-a"
    assert not {REWRITE_HEADER, CONFORMANCE_HEADER, DEST_HEADER, SERVED_HEADER, "x-llm-d-inference-objective",
                "x-llm-d-model-name-rewrite"} & set(seen)


# ---- attack 4: a fake picker ----------------------------------------------------------------------

PROMPT = {"model": MODEL, "prompt": "hi", "max_tokens": 1}


async def test_picker_certificate_from_the_ca_is_accepted(gateway: GatewayFactory, tmp_path: Path) -> None:
    ca = CA()
    real = ca.issue(tmp_path / "real", ["127.0.0.1", "localhost"])
    verify = PickerTLS(ca_file=str(ca.write(tmp_path / "ca.pem")))  # SAN: the picker's host, 127.0.0.1
    e2e = await gateway(sims=1, picker_tls=verify, picker_options={"cert_path": str(real.folder)})
    ctx = _picker_tls_context(e2e.config)
    assert ctx["validation_context"]["trusted_ca"] == {"filename": verify.ca_file}
    r = await e2e.post("/v1/completions", PROMPT)
    assert r.status == 200 and len(e2e.picks) == 1


@pytest.mark.parametrize("fake", ["self-signed", "other-ca", "wrong-san"])
async def test_a_fake_picker_is_refused(gateway: GatewayFactory, tmp_path: Path, fake: str) -> None:
    """Attack 4: the generated configs used to accept any certificate from the picker address. With
    a CA given, a picker whose certificate is self-signed, from another CA, or for another name
    never sees a request, and nothing is routed (FailClose: 5xx)."""
    ca = CA()
    options: dict[str, Any] = {}
    if fake == "other-ca":
        options["cert_path"] = str(CA("other").issue(tmp_path / "fake", ["127.0.0.1"]).folder)
    elif fake == "wrong-san":
        options["cert_path"] = str(ca.issue(tmp_path / "fake", ["10.9.9.9", "epp.example"]).folder)
    verify = PickerTLS(ca_file=str(ca.write(tmp_path / "ca.pem")))
    e2e = await gateway(sims=1, picker_tls=verify, picker_options=options)
    for _ in range(3):
        r = await e2e.post("/v1/completions", PROMPT, timeout=BOUND)
        assert 500 <= r.status < 600
    assert e2e.picks == {} and e2e.picker.servicer.open_streams == 0
    assert e2e.sims[0].served_total == 0


@pytest.mark.parametrize("client_cert", ["none", "from-the-ca", "other-ca"])
async def test_mutual_tls_to_the_picker(gateway: GatewayFactory, tmp_path: Path, client_cert: str) -> None:
    """With --epp-client-cert/--epp-client-key Envoy presents a certificate to the picker; the
    picker's --client-ca-file refuses the TLS handshake of an Envoy without one from that CA, so
    nothing is routed (FailClose: 5xx) and no stream is opened."""
    ca = CA()
    ca_file = ca.write(tmp_path / "ca.pem")
    server = ca.issue(tmp_path / "picker", ["127.0.0.1"])
    files: dict[str, str] = {}
    if client_cert != "none":
        issuer = ca if client_cert == "from-the-ca" else CA("other")
        client = issuer.issue(tmp_path / "client", ["envoy"], client=True)
        files = {"cert_file": str(client.cert), "key_file": str(client.key)}
    verify = PickerTLS(ca_file=str(ca_file), sans=("127.0.0.1",), **files)
    e2e = await gateway(sims=1, picker_tls=verify,
                        picker_options={"cert_path": str(server.folder), "client_ca_file": str(ca_file)})
    tls_ctx = _picker_tls_context(e2e.config)
    assert ("tls_certificates" in tls_ctx) == (client_cert != "none")
    for _ in range(2):
        r = await e2e.post("/v1/completions", PROMPT, timeout=BOUND)
        if client_cert == "from-the-ca":
            assert r.status == 200
        else:
            assert 500 <= r.status < 600
    if client_cert == "from-the-ca":
        assert len(e2e.picks) == 2 and e2e.sims[0].served_total == 2
    else:
        assert e2e.picks == {} and e2e.sims[0].served_total == 0
        assert e2e.picker.servicer.open_streams == 0
        # Envoy saw the handshake fail (not a picker answer): its picker cluster counts the failures
        stats = await e2e.envoy.stats("cluster.epp.default.pool.")
        assert stats.get("cluster.epp.default.pool.ssl.connection_error", 0) + stats.get(
            "cluster.epp.default.pool.upstream_cx_connect_fail", 0) >= 1, stats


def _picker_tls_context(config: dict[str, Any]) -> dict[str, Any]:
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "epp.default.pool")
    ctx: dict[str, Any] = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    return ctx


# ---- stalled uploads --------------------------------------------------------------------------------


def short_timeouts(config: dict[str, Any]) -> None:
    """The generated timeouts, shortened so a test sees them fire."""
    hcm = _hcm(config)
    hcm["request_timeout"] = "1s"
    hcm["request_headers_timeout"] = "1s"


async def _raw_exchange(port: int, data: bytes) -> bytes:
    """Send `data` on a fresh connection, then read until Envoy answers and closes (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 15)
    finally:
        writer.close()


async def test_stalled_uploads_are_cut_off(gateway: GatewayFactory) -> None:
    """A client that stops sending its body (or its headers) does not hold Envoy's buffer and the
    picker's stream forever: request_timeout and request_headers_timeout answer 408."""
    e2e = await gateway(sims=1, config_edit=short_timeouts)
    port = e2e.envoy.ports["inference"]
    head = (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 100000\r\n\r\n")
    answer = await _raw_exchange(port, head + b'{"model": "' + MODEL.encode() + b'", "prompt": "')
    assert answer.startswith(b"HTTP/1.1 408")
    headers_stalled = await _raw_exchange(port, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
    assert headers_stalled.startswith(b"HTTP/1.1 408") and headers_stalled.endswith(b"request header timeout")
    assert e2e.sims[0].served_total == 0
    assert (await e2e.inflight_settles()) == {e2e.sims[0].address: 0}
    stats = await e2e.envoy.stats("http.inference.downstream_rq_")
    assert stats["http.inference.downstream_rq_timeout"] >= 1

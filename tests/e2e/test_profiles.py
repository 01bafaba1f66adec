"""The BUFFERED and lean profiles end to end, and how long Envoy keeps the ext_proc stream open when
the response body is not sent to the picker (docs/envoy-profiles.md records the answers)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from epp import envoyconf
from epp.director import CONFORMANCE_SELECT_HEADER, CONFORMANCE_SERVED_HEADER
from epp.server import App
from tests.e2e.conftest import CONFORMANCE_CONFIG, MODEL, GatewayFactory, needs_envoy
from tests.e2e.test_routing import REWRITE, chat

pytestmark = [pytest.mark.envoy, needs_envoy]


def processing_mode(**modes: str) -> Callable[[dict[str, Any]], None]:
    """A config edit setting fields of the picker filter's processing_mode."""

    def edit(config: dict[str, Any]) -> None:
        listener = config["static_resources"]["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        for f in hcm["http_filters"]:
            if f["name"] == envoyconf.EPP_FILTER:
                f["typed_config"]["processing_mode"].update(modes)

    return edit


@pytest.mark.parametrize("profile", ["buffered", "lean"])
async def test_profile_routes_streams_and_rewrites(gateway: GatewayFactory, profile: str) -> None:
    """Both profiles honour the pick and pass streams through whole. Lean never sends the response
    body to the picker, so a rewritten model name is NOT restored: the client sees the target;
    buffered sends it for the requests that need it (a rewritten model is one), so it is."""
    e2e = await gateway(sims=2, profile=profile, manifests=REWRITE)
    for i in range(6):
        rid = f"{profile}-{i}"
        stream = i % 2 == 0
        r = await e2e.post("/v1/chat/completions", chat(MODEL, f"hello {i}", max_tokens=20, stream=stream),
                           **{"x-request-id": rid})
        assert r.status == 200, r.text
        assert r.headers["x-sim-server"] == e2e.sim_at(e2e.picks[rid][0]).name
        if stream:
            events = r.events()
            assert events[-1] == "[DONE]"
            assert sum(1 for e in events[:-1] if json.loads(e)["choices"][0]["delta"].get("content")) == 20

    r = await e2e.post("/v1/chat/completions", chat("food-review", "pizza?", max_tokens=3), **{"x-request-id": "rw"})
    assert r.status == 200
    # lean: not restored (no response body phase); buffered: restored (the body crossed for this one)
    assert r.json()["model"] == (MODEL if profile == "lean" else "food-review")
    [rec] = [rec for s in e2e.sims for rec in s.served if rec.request_id == "rw"]
    assert rec.model == MODEL

    assert await e2e.inflight_settles() == dict.fromkeys(e2e.picker.datastore.endpoints, 0)
    if profile == "lean":  # no response body phase: the picker never sees token usage
        assert all(ctx.usage_completion == 0 for ctx in e2e.finished.contexts.values())

    # the conformance echo needs the response-headers phase: buffered has it, lean does not (the
    # conformance plugins configured, the selection header let through the edge)
    conf = await gateway(sims=2, profile=profile, allow_client_headers=[CONFORMANCE_SELECT_HEADER],
                         config_text=CONFORMANCE_CONFIG)
    target = conf.sims[1]
    r = await conf.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1},
                        **{CONFORMANCE_SELECT_HEADER: target.address})
    assert r.headers["x-sim-server"] == target.name
    assert r.headers.get(CONFORMANCE_SERVED_HEADER) == (target.address if profile == "buffered" else None)


class HeldStream:
    """A model server whose SSE answer is released in steps, so tests can look at the picker while
    the server is working, and while the body is still streaming."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.send_headers = asyncio.Event()
        self.send_rest = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.arrived.set()
        await self.send_headers.wait()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"model":"m","choices":[{"index":0,"text":"a"}]}\n\n')
        await self.send_rest.wait()
        await resp.write(b'data: {"model":"m","choices":[{"index":0,"text":"b"}],'
                         b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\n'
                         b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def release(self) -> None:
        self.send_headers.set()
        self.send_rest.set()


@pytest.fixture
async def held_server() -> AsyncIterator[tuple[HeldStream, str]]:
    held = HeldStream()
    app = web.Application()
    app.router.add_post("/v1/completions", held.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield held, f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        held.release()
        await runner.cleanup()


async def stream_open(picker: App, settle: float = 0.5) -> bool:
    """Whether the picker still holds the request's ext_proc stream `settle` seconds from now
    (Envoy closes it asynchronously, so a closed stream is waited for, an open one observed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle
    while loop.time() < deadline:
        if picker.servicer.open_streams == 0:
            return False
        await asyncio.sleep(0.01)
    return picker.servicer.open_streams == 1


DUPLEX_REQ = {"request_body_mode": "FULL_DUPLEX_STREAMED", "request_trailer_mode": "SEND"}
BUFFERED_REQ = {"request_body_mode": "BUFFERED", "request_trailer_mode": "SKIP"}
LIFETIME = {
    # name: (processing_mode, open while the server works, open while the body streams)
    "duplex": ({}, True, True),
    "resp-headers-SEND+body-NONE": (
        {**DUPLEX_REQ, "response_header_mode": "SEND", "response_body_mode": "NONE", "response_trailer_mode": "SKIP"},
        True, False),
    "resp-headers-SKIP+body-NONE+trailers-SKIP": (
        {**DUPLEX_REQ, "response_header_mode": "SKIP", "response_body_mode": "NONE", "response_trailer_mode": "SKIP"},
        False, False),
    "resp-headers-SEND+body-NONE+trailers-SEND": (
        {**DUPLEX_REQ, "response_header_mode": "SEND", "response_body_mode": "NONE", "response_trailer_mode": "SEND"},
        True, True),
    "resp-headers-SKIP+body-NONE+trailers-SEND (lean)": (
        {**DUPLEX_REQ, "response_header_mode": "SKIP", "response_body_mode": "NONE", "response_trailer_mode": "SEND"},
        True, True),
    "BUFFERED request, resp-headers-SKIP+body-NONE": (
        {**BUFFERED_REQ, "response_header_mode": "SKIP", "response_body_mode": "NONE", "response_trailer_mode": "SKIP"},
        True, True),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LIFETIME))
async def test_stream_lifetime_without_the_response_body(
    gateway: GatewayFactory, held_server: tuple[HeldStream, str], name: str
) -> None:
    """Does Envoy keep the ext_proc stream (and so the picker's in-flight count) open until the
    HTTP exchange ends when the response body is not sent? With a FULL_DUPLEX_STREAMED request
    body it closes the stream once no phase is left to send: right after the request or after the
    response headers; response_trailer_mode SEND (what the lean profile uses) keeps it open to the
    end even when no trailers come. With a BUFFERED request body it stays open to the end."""
    modes, open_while_working, open_while_streaming = LIFETIME[name]
    held, addr = held_server
    e2e = await gateway(sims=0, endpoints=[addr], picker_tls=False, config_edit=processing_mode(**modes))
    endpoint = e2e.picker.datastore.endpoints[addr]
    first_event = asyncio.Event()

    async def client() -> bytes:
        async with e2e.session.post(e2e.url + "/v1/completions",
                                    json={"model": "m", "prompt": "x", "stream": True}) as r:
            head = await r.content.readuntil(b"\n\n")
            first_event.set()
            return head + await r.read()

    request = asyncio.create_task(client())
    try:
        await asyncio.wait_for(held.arrived.wait(), 10)
        assert await stream_open(e2e.picker) == open_while_working
        assert endpoint.inflight == int(open_while_working)
        held.send_headers.set()
        await asyncio.wait_for(first_event.wait(), 10)
        assert await stream_open(e2e.picker) == open_while_streaming
        assert endpoint.inflight == int(open_while_streaming)
        held.send_rest.set()
        body = await asyncio.wait_for(request, 10)
    finally:
        held.release()
        if not request.done():
            request.cancel()
    assert body.endswith(b"data: [DONE]\n\n")  # the client gets the whole response in every mode
    assert not await stream_open(e2e.picker)
    assert endpoint.inflight == 0

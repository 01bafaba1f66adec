"""The token-producer's `vllm` backend without tokenizer files: a request with nothing rendered yet
awaits the engine's render before it is scheduled (the Director's pre-scheduling step), so even a
conversation's first turn gets a precise score. Through the real ext_proc client, against the
simulator's render endpoints; a render that does not answer in time still routes (the estimate)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from epp.kvevents.wire import encode_payload, encode_stored
from epp.producers.token import TokenProducer
from epp.sim.server import SimServer
from epp.sim.tokens import chat_prompt, token_ids
from tests.extproc_client import body_chunks, exchange, request_headers, set_headers

MODEL = "sim-model"
_ENGINE_HASHES = itertools.count(1)


def config(render_url: str, timeout: str) -> str:
    return f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters:
    modelName: acme/not-in-any-cache
    vllm: {{url: "{render_url}", timeout: {timeout}}}
- type: precise-prefix-cache-producer
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: prefix-cache-scorer, weight: 1}}
  - {{pluginRef: max-score-picker}}
"""


@pytest.fixture
async def sims() -> AsyncIterator[list[SimServer]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(SimServer(model=MODEL)) for _ in range(3)]


async def started(start_picker: Any, sims: list[SimServer], timeout: str) -> tuple[Any, Any, TokenProducer]:
    app, ch = await start_picker(endpoints=[s.address for s in sims], refresh_metrics_interval=0.05,
                                 config_text=config(sims[0].url, timeout))
    for _ in range(200):
        if len(app.datastore.candidates) == len(sims):
            break
        await asyncio.sleep(0.02)
    assert len(app.datastore.candidates) == len(sims)
    (tp,) = app.director.preparers
    assert isinstance(tp, TokenProducer) and tp.renders
    return app, ch, tp


def conversation(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": f"tenant {i} shared context line about its documents. " * 30},
            {"role": "user", "content": f"first question of conversation {i}"}]


def hold(app: Any, address: str, messages: list[dict[str, str]]) -> None:
    """The engine at `address` holds the prompt's blocks (its KV events, as a publisher sends them)."""
    ids = token_ids(chat_prompt(messages))
    n = len(ids) // 16
    hashes = [next(_ENGINE_HASHES) for _ in range(n)]
    app.kv_producers[0].feed(address, MODEL, encode_payload([encode_stored(hashes, None, ids[:n * 16], 16)], 0.0))


async def route(ch: Any, messages: list[dict[str, str]]) -> str:
    body = json.dumps({"model": MODEL, "messages": messages}).encode()
    replies = await exchange(ch, [request_headers(), *body_chunks(body)])
    assert replies and replies[0].WhichOneof("response") != "immediate_response", replies[:1]
    return set_headers(replies[0])["x-gateway-destination-endpoint"]


async def test_first_turn_awaits_the_render_and_gets_a_precise_hit(start_picker: Any, sims: list[SimServer]) -> None:
    app, ch, tp = await started(start_picker, sims, "2s")
    for i in range(3):  # each conversation's blocks on another pod: a tie broken at random would miss
        home = sims[(i + 1) % 3].address
        hold(app, home, conversation(i))
        assert await route(ch, conversation(i)) == home
    assert tp.render_waits == 3 and tp.render_timeouts == 0 and tp.fallbacks == 0
    assert tp.render.renders == 3
    # the next turn begins with a rendered turn: no wait (the earlier ids are its prefix at once)
    turn2 = [*conversation(0), {"role": "assistant", "content": "an answer"}, {"role": "user", "content": "more?"}]
    assert await route(ch, turn2) == sims[1].address
    assert tp.render_waits == 3
    await tp.rendered.drain()
    await tp.render.close()


async def test_concurrent_first_turns_share_one_render(start_picker: Any, sims: list[SimServer]) -> None:
    app, ch, tp = await started(start_picker, sims, "2s")
    sims[0].faults.render_delay_ms = 200  # both requests are in flight while the engine renders
    hold(app, sims[2].address, conversation(7))
    got = await asyncio.gather(route(ch, conversation(7)), route(ch, conversation(7)))
    assert got == [sims[2].address] * 2
    assert tp.render.renders == 1 and tp.render_waits == 2
    await tp.render.close()


async def test_a_render_timeout_still_routes(start_picker: Any, sims: list[SimServer],
                                             caplog: pytest.LogCaptureFixture) -> None:
    app, ch, tp = await started(start_picker, sims, "150ms")
    sims[0].faults.render_delay_ms = 3000  # never in time
    caplog.set_level(logging.WARNING, "epp.producers.token")
    addresses = {s.address for s in sims}
    for i in range(2):
        assert await route(ch, conversation(10 + i)) in addresses
    assert tp.render_waits == 2 and tp.render_timeouts == 2 and tp.fallbacks == 2
    assert sum("did not answer" in r.message for r in caplog.records) == 1  # logged once
    # the engine was not asked twice for the same request (the estimate was the decision)
    assert tp.render.renders == 0 and tp.render.fallbacks <= 2
    await tp.rendered.drain()
    await tp.render.close()


async def test_no_render_backend_no_preparers(start_picker: Any, sims: list[SimServer]) -> None:
    app, _ = await start_picker(endpoints=[s.address for s in sims])
    assert app.director.preparers == ()

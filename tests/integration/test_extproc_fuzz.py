"""Random ext_proc message sequences and bodies: no stream may hang, crash the server or leak state."""

from __future__ import annotations

import asyncio
import json
import random

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from tests.extproc_client import BUFFERED, DUPLEX, body_chunks, exchange, request_headers, response_headers

EPS = ["127.0.0.1:8000", "127.0.0.2:8000"]
BODIES = [
    b"", b"{", b"null", b"[]", b'{"model":null}', b'{"model":"m"}', b'{"model":"m","prompt":""}',
    b'{"model":"m","prompt":"hi"}', b'{"model":"m","messages":"x"}', b'{"model":"m","messages":[1]}',
    b'{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true}', b"\xff\xfe\x00",
    json.dumps({"model": "m", "input": ["a", "b"]}).encode(), b'{"model":"' + b"\xc3" + b'"}',
    b'{"model":"m","prompt":"\\ud800"}', b'{"model":"m","prompt":' + b"[" * 3000 + b"]" * 3000 + b"}",
    b'{"model":"m","prompt":[1,2,3],"stream":true}',
]
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/other", "", "/?a=b"]


def random_sequence(rng: random.Random) -> list[ep.ProcessingRequest]:
    mode = rng.choice([DUPLEX, BUFFERED, None, 1, 3])
    msgs: list[ep.ProcessingRequest] = []
    if rng.random() < 0.9:
        msgs.append(request_headers(rng.choice(PATHS), eos=rng.random() < 0.1, mode=mode,
                                    subset=rng.choice([None, None, [], ["127.0.0.1:8000"], "127.0.0.2:1,x"])))
    body = rng.choice(BODIES) if rng.random() < 0.7 else bytes(rng.getrandbits(8) for _ in range(rng.randrange(50)))
    msgs += body_chunks(body, rng.randrange(1, 6), eos=rng.random() < 0.85)
    if rng.random() < 0.5:
        msgs.append(ep.ProcessingRequest(request_trailers=ep.HttpTrailers()))
    if rng.random() < 0.7:
        msgs.append(response_headers(content_type=rng.choice(["application/json", "text/event-stream"]),
                                     served=rng.choice([None, "127.0.0.2:8000", "bogus"])))
        resp = rng.choice([b'data: {"model":"m","usage":{"prompt_tokens":1}}\n\ndata: [DONE]\n\n', b'{"model":"m"}',
                           b"garbage", b""])
        msgs += body_chunks(resp, rng.randrange(1, 4), response=True, eos=rng.random() < 0.8)
    if rng.random() < 0.3:
        msgs.append(ep.ProcessingRequest(response_trailers=ep.HttpTrailers()))
    if rng.random() < 0.2:
        rng.shuffle(msgs)  # out-of-order and duplicated phases must not wedge the server
    if rng.random() < 0.1:
        msgs += msgs[: rng.randrange(len(msgs) + 1)]
    return msgs


async def test_random_sequences_never_hang_or_leak(start_picker):
    app, ch = await start_picker(endpoints=EPS, max_request_body_bytes=4096)
    rng = random.Random(20261122)
    sem = asyncio.Semaphore(16)

    async def one(seq: list[ep.ProcessingRequest]) -> None:
        async with sem:
            # every stream ends once the client closes its side: a hang fails here
            await asyncio.wait_for(exchange(ch, seq), timeout=10)

    await asyncio.gather(*(one(random_sequence(rng)) for _ in range(400)))
    for _ in range(100):
        if app.servicer.open_streams == 0:
            break
        await asyncio.sleep(0.02)
    assert app.servicer.open_streams == 0
    assert app.servicer.buffered == 0  # every held body was released
    assert all(e.inflight == 0 and e.inflight_tokens == 0 for e in app.datastore.endpoints.values())
    # and the server still routes normally
    replies = await exchange(ch, [request_headers("/v1/completions"),
                                  *body_chunks(b'{"model":"m","prompt":"ok"}')])
    assert replies[0].WhichOneof("response") == "request_headers"

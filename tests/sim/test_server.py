"""The live simulated server over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from epp.sim import EngineConfig, Faults, SimServer, SimServerConfig

Make = Callable[..., Awaitable[SimServer]]


@pytest.fixture
async def make_sim() -> AsyncIterator[Make]:
    """`sim = await make_sim(time_scale=..., engine_kind=..., faults=Faults(...), **engine_config)`."""
    started: list[SimServer] = []

    async def _make(time_scale: float = 0.01, engine_kind: str = "vllm", faults: Faults | None = None,
                    name: str = "", **engine: Any) -> SimServer:
        cfg = SimServerConfig(name=name, time_scale=time_scale, engine_kind=engine_kind,
                              engine=EngineConfig(**engine), faults=faults or Faults())
        sim = SimServer(cfg)
        started.append(sim)
        return await sim.start()

    yield _make
    for s in started:
        await s.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def sse_events(resp: aiohttp.ClientResponse) -> list[Any]:
    """Parsed `data:` payloads of an SSE body; the literal "[DONE]" stays a string."""
    body = (await resp.read()).decode()
    assert body.endswith("\n\n")
    out: list[Any] = []
    for block in body.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: ")
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def metric(http: aiohttp.ClientSession, sim: SimServer, sample_prefix: str) -> list[str]:
    async with http.get(f"{sim.url}/metrics") as r:
        text = await r.text()
    return [line for line in text.splitlines() if line.startswith(sample_prefix)]


def value(line: str) -> float:
    return float(line.rsplit(" ", 1)[1])


async def test_completions_json(make_sim: Make, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(name="pod-a")
    body = {"model": sim.cfg.engine.model, "prompt": "Say hello to the simulator", "max_tokens": 5}
    async with http.post(f"{sim.url}/v1/completions", json=body, headers={"x-request-id": "req-1"}) as r:
        assert r.status == 200
        assert r.headers["x-sim-server"] == "pod-a"
        assert r.headers["x-request-id"] == "req-1"
        data = await r.json()
    assert data["id"] == "cmpl-req-1" and data["object"] == "text_completion"
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert len(data["choices"][0]["text"]) == 20
    rec = sim.served[-1]
    assert (rec.request_id, rec.server, rec.status, rec.outcome, rec.completion_tokens) == \
        ("req-1", "pod-a", 200, "ok", 5)
    assert rec.ttft is not None and rec.e2e is not None and rec.e2e > rec.ttft > 0
    async with http.get(f"{sim.url}/sim/served") as r:
        served = await r.json()
    assert served["server"] == "pod-a" and served["total"] == 1
    assert served["served"][0]["request_id"] == "req-1"
    assert served["served"][0]["model"] == sim.cfg.engine.model


async def test_chat_streaming_with_and_without_usage(make_sim: Make, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    body: dict[str, Any] = {"model": sim.cfg.engine.model, "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{sim.url}/v1/chat/completions", json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events = await sse_events(r)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 4
    assert usage_chunk["usage"]["prompt_tokens"] == 6  # "<|user|>hi\n<|assistant|>" is 24 chars
    deltas = events[:-2]
    assert deltas[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [e["choices"][0]["delta"]["content"] for e in deltas[1:]]
    assert len(content) == 4 and all(len(c) == 4 for c in content)
    assert [e["choices"][0]["finish_reason"] for e in deltas[1:]] == [None, None, None, "length"]
    assert all(e["object"] == "chat.completion.chunk" for e in deltas)

    body["stream_options"] = {"include_usage": False}
    body["messages"] = [{"role": "user", "content": "hello"}]
    async with http.post(f"{sim.url}/v1/chat/completions", json=body) as r:
        events = await sse_events(r)
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])

    # completions streaming: one chunk per token, usage last
    cbody = {"model": sim.cfg.engine.model, "prompt": "abc", "max_tokens": 3, "stream": True,
             "stream_options": {"include_usage": True}}
    async with http.post(f"{sim.url}/v1/completions", json=cbody) as r:
        events = await sse_events(r)
    assert [e["choices"][0]["text"] for e in events[:3]] == [" the", " sim", " ran"]
    assert events[3]["usage"]["total_tokens"] == 4 and events[4] == "[DONE]"


async def test_models_and_runtime_adapters(make_sim: Make, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(model="base-model", loras=("sql-lora", "food-lora"))
    async with http.get(f"{sim.url}/v1/models") as r:
        data = await r.json()
    ids = [m["id"] for m in data["data"]]
    assert ids == ["base-model", "sql-lora", "food-lora"]
    assert data["data"][1]["parent"] == "base-model" and data["data"][0]["parent"] is None
    async with http.post(f"{sim.url}/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "/x"}) as r:
        assert r.status == 200
    async with http.post(f"{sim.url}/v1/load_lora_adapter", json={"lora_name": "new"}) as r:
        assert r.status == 400
    async with http.post(f"{sim.url}/v1/completions", json={"model": "new", "prompt": "x", "max_tokens": 1}) as r:
        assert r.status == 200
    async with http.post(f"{sim.url}/v1/unload_lora_adapter", json={"lora_name": "sql-lora"}) as r:
        assert r.status == 200
    async with http.get(f"{sim.url}/v1/models") as r:
        assert [m["id"] for m in (await r.json())["data"]] == ["base-model", "food-lora", "new"]
    async with http.post(f"{sim.url}/v1/completions", json={"model": "sql-lora", "prompt": "x"}) as r:
        assert r.status == 404
        err = await r.json()
    assert err["error"]["type"] == "NotFoundError"


async def test_metrics_names_and_filter(make_sim: Make, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(loras=("a",), num_gpu_blocks=1000, block_size=32)
    async with http.post(f"{sim.url}/v1/completions", json={"model": "a", "prompt": "q" * 100, "max_tokens": 3}):
        pass
    async with http.get(f"{sim.url}/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:cache_config_info", "vllm:lora_requests_info", "vllm:prefix_cache_hits_total",
                 "vllm:prefix_cache_queries_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_count"):
        assert f"\n{name}{{" in text, name
    lines = text.splitlines()
    cache = next(line for line in lines if line.startswith("vllm:cache_config_info{"))
    assert 'block_size="32"' in cache and 'num_gpu_blocks="1000"' in cache and value(cache) == 1.0
    lora = next(line for line in lines if line.startswith("vllm:lora_requests_info{"))
    assert 'max_lora="4"' in lora and value(lora) > 1.6e9  # a Unix timestamp
    gen = next(line for line in lines if line.startswith("vllm:generation_tokens_total{"))
    assert value(gen) == 3.0
    assert value(next(line for line in lines if line.startswith("vllm:prompt_tokens_total{"))) == 25.0
    ttft_count = next(line for line in lines if line.startswith("vllm:time_to_first_token_seconds_count{"))
    assert value(ttft_count) == 1.0

    q = "name[]=vllm:num_requests_waiting&name[]=vllm:lora_requests_info&name[]=vllm:prompt_tokens_total"
    async with http.get(f"{sim.url}/metrics?{q}") as r:
        filtered = await r.text()
    samples = sorted({line.split("{")[0] for line in filtered.splitlines() if not line.startswith("#")})
    assert samples == ["vllm:lora_requests_info", "vllm:num_requests_waiting", "vllm:prompt_tokens_total"]
    async with http.get(f"{sim.url}/metrics?name[]=no_such_metric") as r:
        assert (await r.text()).strip() == ""
    # gzip when asked (aiohttp decompresses transparently)
    async with http.get(f"{sim.url}/metrics", headers={"Accept-Encoding": "gzip"}) as r:
        assert r.headers.get("Content-Encoding") == "gzip"
        assert "vllm:num_requests_running" in await r.text()


async def test_sglang_metric_names(make_sim: Make, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(engine_kind="sglang", num_gpu_blocks=500)
    async with http.get(f"{sim.url}/metrics") as r:
        text = await r.text()
    for name in ("sglang:num_queue_reqs", "sglang:num_running_reqs", "sglang:token_usage"):
        assert f"\n{name}{{" in text
    assert 'sglang:cache_config_info{num_pages="500",page_size="16"} 1.0' in text
    assert "vllm:" not in text


async def test_prefix_cache_lowers_ttft(make_sim: Make, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    body = {"model": sim.cfg.engine.model, "prompt": "You are a helpful assistant. " * 300, "max_tokens": 2}
    usages = []
    for rid in ("first", "second"):
        async with http.post(f"{sim.url}/v1/completions", json=body, headers={"x-request-id": rid}) as r:
            usages.append((await r.json())["usage"])
    first, second = sim.served[0], sim.served[1]
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] > 0.9 * usages[1]["prompt_tokens"]
    assert first.ttft is not None and second.ttft is not None
    assert second.ttft < first.ttft / 2  # simulated timings: prefill of ~2200 tokens vs ~10
    hits = await metric(http, sim, "vllm:prefix_cache_hits_total")
    assert value(hits[0]) == usages[1]["prompt_tokens_details"]["cached_tokens"]


async def test_queueing_when_batch_full(make_sim: Make, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(max_num_seqs=2, time_scale=0.05)
    body = {"model": sim.cfg.engine.model, "prompt": "count to a thousand", "max_tokens": 400, "stream": True}

    async def one(i: int) -> int:
        async with http.post(f"{sim.url}/v1/completions", json=body, headers={"x-request-id": f"q{i}"}) as r:
            await r.read()
            return r.status

    tasks = [asyncio.create_task(one(i)) for i in range(6)]
    seen_waiting = 0.0
    for _ in range(400):  # bounded poll; the first pair alone takes ~2.5 s simulated
        waiting = await metric(http, sim, "vllm:num_requests_waiting")
        running = await metric(http, sim, "vllm:num_requests_running")
        assert value(running[0]) <= 2
        seen_waiting = max(seen_waiting, value(waiting[0]))
        if seen_waiting > 0 or all(t.done() for t in tasks):
            break
        await asyncio.sleep(0.005)
    assert seen_waiting > 0
    assert await asyncio.gather(*tasks) == [200] * 6
    queued = [r for r in sim.served if r.queue is not None and r.queue > 0]
    assert len(queued) >= 4  # four of six waited for a batch slot (simulated queue time)
    assert value((await metric(http, sim, "vllm:num_requests_waiting"))[0]) == 0


async def test_lora_slots_visible_in_metrics(make_sim: Make, http: aiohttp.ClientSession) -> None:
    # a's 300 decode steps take ~0.5 s here: the window in which a runs and b waits must outlast a
    # scheduling hiccup of a loaded machine (at time_scale 0.05 it was ~90 ms and CI once missed it)
    sim = await make_sim(loras=("a", "b"), max_loras=1, time_scale=0.3)

    async def one(model: str) -> int:
        body = {"model": model, "prompt": "adapter please", "max_tokens": 300}
        async with http.post(f"{sim.url}/v1/completions", json=body, headers={"x-request-id": model}) as r:
            await r.read()
            return r.status

    ta = asyncio.create_task(one("a"))
    while sim.served_total < 1:
        await asyncio.sleep(0.001)
    tb = asyncio.create_task(one("b"))
    info = ""
    for _ in range(400):
        lines = await metric(http, sim, "vllm:lora_requests_info")
        info = lines[0]
        if 'waiting_lora_adapters="b"' in info or tb.done():
            break
        await asyncio.sleep(0.005)
    assert 'max_lora="1"' in info
    assert 'running_lora_adapters="a"' in info and 'waiting_lora_adapters="b"' in info
    assert await asyncio.gather(ta, tb) == [200, 200]
    rec = {r.request_id: r for r in sim.served}
    assert rec["b"].queue is not None and rec["a"].e2e is not None
    assert rec["b"].queue > 0  # b waited for the single adapter slot


async def test_injected_errors(make_sim: Make, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(faults=Faults(error_rate=1.0))
    body = {"model": sim.cfg.engine.model, "prompt": "x", "max_tokens": 2}
    async with http.post(f"{sim.url}/v1/completions", json=body) as r:
        assert r.status == 500
        assert r.headers["x-sim-server"] == sim.name
    assert sim.served[-1].outcome == "injected_error"
    async with http.post(f"{sim.url}/sim/faults", json={"error_rate": 0.0, "fail_models": ["bad"]}) as r:
        assert r.status == 200
    async with http.post(f"{sim.url}/v1/completions", json=body) as r:
        assert r.status == 200
    async with http.post(f"{sim.url}/v1/completions", json={**body, "model": "bad"}) as r:
        assert r.status == 500
    async with http.post(f"{sim.url}/sim/faults", json={"error_rate": 2}) as r:
        assert r.status == 400
    async with http.post(f"{sim.url}/sim/faults", json={"bogus": 1}) as r:
        assert r.status == 400
    sim.faults.error_rate = 0.5  # seeded: a mix, reproducible
    statuses = []
    for _ in range(20):
        async with http.post(f"{sim.url}/v1/completions", json=body) as r:
            statuses.append(r.status)
    assert set(statuses) == {200, 500}
    sim.faults.unhealthy = True
    async with http.get(f"{sim.url}/health") as r:
        assert r.status == 503


async def test_dies_mid_stream(make_sim: Make, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(faults=Faults(die_after_chunks=3))
    body = {"model": sim.cfg.engine.model, "prompt": "x", "max_tokens": 10, "stream": True}
    got = b""
    with pytest.raises(aiohttp.ClientError):
        async with http.post(f"{sim.url}/v1/completions", json=body) as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                got += chunk
    assert got.count(b"data: ") == 3 and b"[DONE]" not in got
    assert sim.served[-1].outcome == "died"
    with pytest.raises(aiohttp.ClientError):
        async with http.post(f"{sim.url}/v1/completions", json={**body, "stream": False}) as r:
            await r.read()
    assert not sim.engine.has_work and sim.engine.kv.usage == 0.0  # aborted work freed its KV
    sim.faults.die_after_chunks = -1
    async with http.post(f"{sim.url}/v1/completions", json=body) as r:
        assert (await r.read()).endswith(b"data: [DONE]\n\n")


async def test_refuses_connections(make_sim: Make, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    await sim.refuse_connections(True)
    with pytest.raises(aiohttp.ClientConnectorError):
        async with http.get(f"{sim.url}/health"):
            pass
    await sim.refuse_connections(False)
    async with http.get(f"{sim.url}/health") as r:
        assert r.status == 200
    # over HTTP, for a while
    async with http.post(f"{sim.url}/sim/refuse", json={"seconds": 0.3}) as r:
        assert r.status == 200
    refused = recovered = False
    async with aiohttp.ClientSession() as fresh:  # new connections only
        for _ in range(300):
            try:
                async with fresh.get(f"{sim.url}/health", headers={"Connection": "close"}) as r:
                    if refused:
                        recovered = r.status == 200
                        break
            except aiohttp.ClientConnectorError:
                refused = True
            await asyncio.sleep(0.01)
    assert refused and recovered


async def test_extra_latency_and_time_scale(make_sim: Make, http: aiohttp.ClientSession) -> None:
    body = {"model": "m", "prompt": "the same request " * 50, "max_tokens": 30}
    e2e = []
    for scale in (0.002, 0.02):
        sim = await make_sim(time_scale=scale, model="m")
        async with http.post(f"{sim.url}/v1/completions", json=body) as r:
            assert r.status == 200
        e2e.append(sim.served[-1].e2e)
        assert sim.driver.vnow >= sim.served[-1].e2e  # type: ignore[operator]
    # the reported (simulated) latency is the model's, whatever the wall-clock speed-up
    assert e2e[0] == pytest.approx(e2e[1], rel=1e-9)
    sim = await make_sim(time_scale=0.001, model="m", faults=Faults(extra_latency_ms=5000))
    before = sim.driver.now()
    async with http.post(f"{sim.url}/v1/completions", json=body) as r:
        assert r.status == 200
    rec = sim.served[-1]
    assert rec.e2e == pytest.approx(e2e[0], rel=1e-9)  # added before queueing, not engine time
    assert sim.driver.now() - before >= 5.0 * 0.99  # the simulated clock saw the 5 s pause


async def test_bad_requests(make_sim: Make, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(max_model_len=64)
    url = f"{sim.url}/v1/completions"
    async with http.post(url, data=b"not json") as r:
        assert r.status == 400
    async with http.post(url, json={"prompt": "x" * 1000}) as r:
        assert r.status == 400
        assert "maximum context length" in (await r.json())["error"]["message"]
    async with http.post(url, json={"prompt": ["a", "b"]}) as r:
        assert r.status == 400
    async with http.post(f"{sim.url}/v1/chat/completions", json={"messages": []}) as r:
        assert r.status == 400
    async with http.post(url, json={"prompt": "x", "max_tokens": "many"}) as r:
        assert r.status == 400
    assert [r.status for r in sim.served] == [400] * 5


async def test_client_disconnect_aborts(make_sim: Make, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(time_scale=0.05)
    body = {"model": sim.cfg.engine.model, "prompt": "long story", "max_tokens": 2000, "stream": True}
    async with http.post(f"{sim.url}/v1/completions", json=body) as r:
        await r.content.readline()  # the first token arrived
    for _ in range(500):
        if not sim.engine.has_work:
            break
        await asyncio.sleep(0.01)
    assert not sim.engine.has_work and sim.engine.kv.usage == 0.0
    assert sim.served[-1].outcome == "client_gone"


async def test_stop_with_requests_in_flight_does_not_hang(http: aiohttp.ClientSession) -> None:
    # a slow server (1 s of simulated time per step, real time) holding a streaming request
    sim = SimServer(SimServerConfig(name="slow", time_scale=1.0, faults=Faults(extra_latency_ms=30_000)))
    await sim.start()
    req = asyncio.create_task(http.post(f"{sim.url}/v1/completions",
                                        json={"model": sim.cfg.engine.model, "prompt": "x", "max_tokens": 50,
                                              "stream": True}))
    for _ in range(100):
        if sim.engine.waiting or sim.engine.running or req.done():
            break
        await asyncio.sleep(0.02)
    await asyncio.wait_for(sim.stop(), 10)  # aiohttp's default would wait 60 s for the handler
    req.cancel()
    await asyncio.gather(req, return_exceptions=True)


# ---- what routers call besides inference (vLLM's and SGLang's routers) ----------------------------------
def test_token_ids_follow_the_text() -> None:
    from epp.sim.tokens import VOCAB_SIZE, count_tokens, detokenize, token_ids

    text = "You are a helpful assistant. " * 20
    ids = token_ids(text)
    assert len(ids) == count_tokens(text) and all(0 <= t < VOCAB_SIZE for t in ids)
    # equal prefixes give equal leading ids; a change in the text changes the ids from there on
    longer = token_ids(text + "and one more question")
    assert longer[:len(ids)] == ids and len(longer) > len(ids)
    other = token_ids("Xou" + text[3:])
    assert other[0] != ids[0] and other[1:] == ids[1:]
    # a piece's id depends on its own characters only, ASCII or not
    mixed = "héllo wörld " + text
    assert token_ids(mixed)[3:] == token_ids("hello world " + text)[3:]
    assert len(token_ids(mixed)) == count_tokens(mixed)
    assert token_ids("") == []
    assert detokenize([1, 0x1ABCD]) == "0001abcd"
    with pytest.raises(ValueError):
        token_ids("abc", chars_per_token=3)


async def test_tokenize_and_detokenize(make_sim: Make, http: aiohttp.ClientSession) -> None:
    from epp.sim.tokens import chat_prompt, token_ids

    sim = await make_sim()
    async with http.post(f"{sim.url}/tokenize", json={"model": "m", "prompt": "hello simulator"}) as r:
        assert r.status == 200
        data = await r.json()
    assert data == {"count": 4, "max_model_len": sim.cfg.engine.max_model_len,
                    "tokens": token_ids("hello simulator"), "token_strs": None}
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    async with http.post(f"{sim.url}/tokenize", json={"messages": messages}) as r:
        data = await r.json()
    assert data["tokens"] == token_ids(chat_prompt(messages)) and data["count"] == len(data["tokens"])
    async with http.post(f"{sim.url}/detokenize", json={"tokens": [10, 11]}) as r:
        assert (r.status, await r.json()) == (200, {"prompt": "000a000b"})
    for path, bad in (("/tokenize", {"prompt": 5}), ("/tokenize", {"messages": []}),
                      ("/detokenize", {"tokens": ["a"]}), ("/detokenize", {})):
        async with http.post(f"{sim.url}{path}", json=bad) as r:
            assert r.status == 400, (path, bad)
            assert "error" in await r.json()
    async with http.post(f"{sim.url}/tokenize", data=b"not json") as r:
        assert r.status == 400


async def test_render_endpoints(make_sim: Make, http: aiohttp.ClientSession) -> None:
    from epp.sim.tokens import chat_prompt, token_ids

    sim = await make_sim()
    body = {"model": sim.cfg.engine.model, "prompt": "a shared prefix then more", "max_tokens": 3, "stream": True}
    async with http.post(f"{sim.url}/v1/completions/render", json=body) as r:
        assert r.status == 200
        assert await r.json() == [{"token_ids": token_ids(body["prompt"])}]
    body["prompt"] = ["first prompt", "second one"]
    async with http.post(f"{sim.url}/v1/completions/render", json=body) as r:
        assert await r.json() == [{"token_ids": token_ids("first prompt")}, {"token_ids": token_ids("second one")}]
    body["prompt"] = [7, 8, 9]  # token ids in: read as the simulator reads them (one token each)
    async with http.post(f"{sim.url}/v1/completions/render", json=body) as r:
        assert len((await r.json())[0]["token_ids"]) == 3
    messages = [{"role": "user", "content": "render me"}]
    async with http.post(f"{sim.url}/v1/chat/completions/render", json={"messages": messages}) as r:
        assert r.status == 200
        assert await r.json() == {"token_ids": token_ids(chat_prompt(messages))}
    for path, bad in (("/v1/completions/render", {"prompt": None}), ("/v1/completions/render", {"prompt": []}),
                      ("/v1/completions/render", {"prompt": [1, "x"]}),
                      ("/v1/chat/completions/render", {"messages": "hi"})):
        async with http.post(f"{sim.url}{path}", json=bad) as r:
            assert r.status == 400, (path, bad)
    # rendering is not inference: nothing was served
    assert sim.served_total == 0


async def test_server_model_info_and_load(make_sim: Make, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(time_scale=1.0, block_size=16, num_gpu_blocks=1000, max_model_len=8192)
    model = sim.cfg.engine.model
    for path in ("/server_info", "/get_server_info"):
        async with http.get(f"{sim.url}{path}") as r:
            assert r.status == 200
            info = await r.json()
        assert info["vllm_config"]["model_config"]["model"] == model
        assert info["vllm_config"]["cache_config"]["block_size"] == 16
        assert (info["model_path"], info["page_size"], info["max_total_num_tokens"]) == (model, 16, 16000)
    for path in ("/get_model_info", "/model_info"):
        async with http.get(f"{sim.url}{path}") as r:
            info = await r.json()
        assert info["model_path"] == model and info["is_generation"] is True and info["tokenizer_path"] is None
    async with http.get(f"{sim.url}/get_load") as r:
        assert r.status == 200
        idle = await r.json()
    assert idle == [{"dp_rank": 0, "num_reqs": 0, "num_running_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0,
                     "kv_usage": 0.0}]
    # a long request in flight shows up in the load
    body = {"model": model, "prompt": "x" * 4000, "max_tokens": 2000, "stream": True}
    async with http.post(f"{sim.url}/v1/completions", json=body) as r:
        await r.content.readline()  # the first token is out: the request is running
        async with http.get(f"{sim.url}/load") as lr:
            busy = (await lr.json())[0]
    assert busy["num_reqs"] == 1 and busy["num_running_reqs"] == 1 and busy["num_tokens"] >= 1000
    assert busy["kv_usage"] > 0

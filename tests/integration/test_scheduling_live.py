"""Scheduling through the real ext_proc server, with signals scraped from real HTTP metric endpoints."""

from __future__ import annotations

import asyncio
import json
import time

import grpc

from tests.extproc_client import body_chunks, chat, exchange, request_headers, set_headers


def vllm_page(waiting: float = 0, running: float = 0, kv: float = 0.0, loras: str = "", max_lora: int = 0) -> str:
    page = (
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{model_name="base"}} {waiting}\n'
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{model_name="base"}} {running}\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f'vllm:kv_cache_usage_perc{{model_name="base"}} {kv}\n'
    )
    if max_lora:
        page += ("# TYPE vllm:lora_requests_info gauge\n"
                 f'vllm:lora_requests_info{{max_lora="{max_lora}",running_lora_adapters="{loras}",'
                 f'waiting_lora_adapters=""}} {time.time()}\n')
    return page


async def fresh(app, n: int) -> None:
    """Wait until every endpoint has been scraped after the pages were set."""
    t = time.monotonic()
    for _ in range(200):
        eps = list(app.datastore.endpoints.values())
        if len(eps) == n and all(e.metrics is not None and e.metrics.updated > t for e in eps):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("endpoints were not scraped")


async def pick(ch, model="m", content="hello", headers=None) -> str:
    replies = await exchange(ch, [request_headers(extra=headers or {}), *body_chunks(chat(model, content))])
    r = replies[0]
    if r.WhichOneof("response") == "immediate_response":
        return f"{r.immediate_response.status.code}"
    return set_headers(r)["x-gateway-destination-endpoint"]


async def test_shortest_queue_wins(start_picker, servers):
    a = await servers.add(vllm_page(waiting=9, kv=0.2))
    b = await servers.add(vllm_page(waiting=0, kv=0.2))
    c = await servers.add(vllm_page(waiting=4, kv=0.2))
    app, ch = await start_picker(endpoints=[a, b, c], refresh_metrics_interval=0.02)
    await fresh(app, 3)
    # distinct prompts so prefix affinity plays no part; in-flight accounting ends with each exchange
    assert [await pick(ch, content=f"q{i}") for i in range(5)] == [b] * 5


async def test_lora_adapter_wins_despite_higher_kv(start_picker, servers):
    with_adapter = await servers.add(vllm_page(kv=0.6, loras="sql-lora", max_lora=2))
    without = await servers.add(vllm_page(kv=0.1, loras="other-a,other-b", max_lora=2))
    app, ch = await start_picker(endpoints=[with_adapter, without], refresh_metrics_interval=0.02)
    await fresh(app, 2)
    assert await pick(ch, model="sql-lora") == with_adapter
    # an adapter loaded nowhere, both pods with a free slot: LoRA affinity ties, lower KV wins
    servers.pages[without] = vllm_page(kv=0.1, loras="other-a", max_lora=2)
    await fresh(app, 2)
    assert await pick(ch, model="new-lora") == without


async def test_shared_prefix_returns_to_its_pod(start_picker, servers):
    addrs = [await servers.add(vllm_page(kv=0.1)) for _ in range(4)]
    app, ch = await start_picker(endpoints=addrs, refresh_metrics_interval=0.02)
    await fresh(app, 4)
    system = "You are a meticulous assistant. " * 40  # long shared prefix, many 64-char blocks
    first = await pick(ch, content=system + "question one")
    later = [await pick(ch, content=system + f"question {i}") for i in range(2, 8)]
    assert later == [first] * 6


async def test_saturated_pool_sheds_sheddable_but_routes_critical(start_picker, servers, tmp_path):
    (tmp_path / "m.yaml").write_text(json.dumps({
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceModel",
        "metadata": {"name": "crit"}, "spec": {"modelName": "crit", "criticality": "Critical",
                                               "poolRef": {"name": "pool"}}}) + "\n---\n" + json.dumps({
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
        "metadata": {"name": "batch"}, "spec": {"priority": -1, "poolRef": {"name": "pool"}}}))
    a = await servers.add(vllm_page(waiting=12, kv=0.95))
    b = await servers.add(vllm_page(waiting=7, kv=0.85))
    app, ch = await start_picker(endpoints=[a, b], manifests=[str(tmp_path)], refresh_metrics_interval=0.02)
    await fresh(app, 2)
    assert await pick(ch, headers={"x-gateway-inference-objective": "batch"}) == "429"
    assert await pick(ch, model="crit") in (a, b)
    assert await pick(ch, model="standard") in (a, b)  # priority 0 is never shed

    # headroom again: the same sheddable request is routed
    servers.pages[a] = vllm_page(waiting=0, kv=0.1)
    servers.pages[b] = vllm_page(waiting=1, kv=0.2)
    await fresh(app, 2)
    assert await pick(ch, headers={"x-gateway-inference-objective": "batch"}) in (a, b)


SESSION_CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: session-affinity-scorer
- type: max-score-picker
  parameters: {maxNumOfEndpoints: 2}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 1}
  - {pluginRef: session-affinity-scorer, weight: 5}
  - {pluginRef: max-score-picker}
"""


async def test_session_token_set_on_response_and_followed(start_picker, servers):
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

    from tests.extproc_client import response_headers

    addrs = [await servers.add(vllm_page()) for _ in range(3)]
    app, ch = await start_picker(endpoints=addrs, refresh_metrics_interval=0.02, config_text=SESSION_CONFIG)
    await fresh(app, 3)
    call = ep_grpc.ExternalProcessorStub(ch).Process()
    await call.write(request_headers())
    for m in body_chunks(chat()):
        await call.write(m)
    first = set_headers(await call.read())["x-gateway-destination-endpoint"].split(",")
    assert len(first) == 2  # maxNumOfEndpoints from the config: a fallback follows the primary
    await call.read()
    await call.write(response_headers())
    token = {h.header.key: h.header.raw_value.decode()
             for h in (await call.read()).response_headers.response.header_mutation.set_headers}["x-session-token"]
    await call.done_writing()
    await call.read()
    # the session's pod gets a longer queue, yet the token keeps the session there
    servers.pages[first[0]] = vllm_page(waiting=3)
    await fresh(app, 3)
    for i in range(4):
        dest = await pick(ch, content=f"turn {i}", headers={"x-session-token": token})
        assert dest.split(",")[0] == first[0]


async def test_prefix_hit_metrics_observed(start_picker, servers):
    addrs = [await servers.add(vllm_page()) for _ in range(2)]
    app, ch = await start_picker(endpoints=addrs, refresh_metrics_interval=0.02)
    await fresh(app, 2)
    prompt = "shared system prompt " * 30
    for i in range(3):
        await pick(ch, content=prompt + str(i))
    h = app.telemetry.prefix_hit_ratio.collect()[0]
    count = [s.value for s in h.samples if s.name.endswith("_count")][0]
    total = [s.value for s in h.samples if s.name.endswith("_sum")][0]
    assert count == 3 and total > 1.0  # the 2nd and 3rd requests matched most of their blocks
    app.telemetry.refresh_pool(app.datastore, 2.0, prefix_stats=app.scheduler.stats)
    assert app.telemetry.prefix_size.collect()[0].samples[0].value > 0


async def test_base_model_requests_not_herded_onto_the_lora_pod(start_picker, servers):
    # the LoRA pod has free adapter slots; base-model traffic must still spread by load
    lora = await servers.add(vllm_page(kv=0.1, loras="sql-lora", max_lora=4))
    plain = await servers.add(vllm_page(kv=0.1))
    app, ch = await start_picker(endpoints=[lora, plain], refresh_metrics_interval=0.02)
    await fresh(app, 2)
    picks = [await pick(ch, model="base", content=f"unique prompt {i}") for i in range(20)]
    assert picks.count(plain) >= 5 and picks.count(lora) >= 5, picks
    assert await pick(ch, model="sql-lora") == lora


BACKLOG_CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: prefill-backlog-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: prefill-backlog-scorer, weight: 2}
  - {pluginRef: max-score-picker}
"""


async def test_prefill_backlog_spreads_cold_prompts_while_they_are_in_flight(start_picker, servers):
    """Two long cold prompts, both still in flight (their streams open, as Envoy keeps them to the
    response's end): the second goes to the pod not prefilling the first, every round; once both
    end, the pods' clocks are clear again."""
    import random
    import string

    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

    addrs = [await servers.add(vllm_page()) for _ in range(2)]
    app, ch = await start_picker(endpoints=addrs, refresh_metrics_interval=0.02, config_text=BACKLOG_CONFIG)
    await fresh(app, 2)
    rng = random.Random(7)
    stub = ep_grpc.ExternalProcessorStub(ch)
    for _ in range(4):
        calls, chosen = [], []
        for _ in range(2):
            prompt = "".join(rng.choice(string.ascii_letters) for _ in range(24000))
            call = stub.Process()
            await call.write(request_headers())
            for m in body_chunks(chat(content=prompt)):
                await call.write(m)
            chosen.append(set_headers(await call.read())["x-gateway-destination-endpoint"])
            calls.append(call)
        assert chosen[0] != chosen[1]
        for call in calls:
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
    assert all(e.inflight == 0 for e in app.datastore.endpoints.values())

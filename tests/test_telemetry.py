"""The picker's own metrics: names, labels and values after real requests through the ext_proc server,
and straight from RequestContexts (reference names and labels, TTFT/TPOT/SLO, llm-d copies, bounded labels)."""

from __future__ import annotations

import json
import random
import string
import time
import urllib.request

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from epp.datastore import Datastore, Metrics
from epp.director import RequestContext
from epp.models import ModelTable
from epp.resources import TargetModel
from epp.scheduling.framework import SchedulingRequest
from epp.telemetry import OTHER, Telemetry
from tests.extproc_client import body_chunks, chat, exchange, request_headers, response_headers


def scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def total(samples, metric, **labels):
    return sum(s.value for s in samples.get(metric, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def value(samples, metric, **labels):
    for s in samples.get(metric, []):
        if all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


async def test_request_metrics_by_model_and_errors(start_picker, tmp_path):
    (tmp_path / "m.yaml").write_text("""
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: alias}
spec:
  poolRef: {name: pool}
  rules: [{matches: [{model: {value: a}}], targets: [{modelRewrite: b}]}]
""")
    app, ch = await start_picker(endpoints=["127.0.0.1:8000", "127.0.0.2:8000"], manifests=[str(tmp_path)])
    resp = json.dumps({"model": "b", "usage": {"prompt_tokens": 10, "completion_tokens": 20}}).encode()
    for _ in range(3):
        await exchange(ch, [request_headers(), *body_chunks(chat("a")), response_headers(),
                            ep.ProcessingRequest(response_body=ep.HttpBody(body=resp, end_of_stream=True))])
    await exchange(ch, [request_headers(), *body_chunks(b"{bad")])
    m = scrape(app.metrics_port)
    assert value(m, "inference_objective_request_total", model_name="a", target_model_name="b") == 3
    assert value(m, "inference_objective_request_error_total", error_code="BadRequest") == 1
    assert value(m, "inference_objective_input_tokens_sum", model_name="a") == 30
    assert value(m, "inference_objective_output_tokens_count", model_name="a") == 3
    assert value(m, "inference_objective_running_requests", model_name="a") == 0
    assert value(m, "inference_objective_normalized_time_per_output_token_seconds_count", model_name="a") == 3
    assert value(m, "inference_extension_model_rewrite_decisions_total", model_rewrite_name="default/alias",
                 model_name="a", target_model="b") == 3
    assert total(m, "inference_extension_scheduler_attempts_total", status="success", target_model_name="b") == 3
    pods = {s.labels["pod_name"] for s in m["inference_extension_scheduler_attempts_total"]
            if s.labels["status"] == "success"}
    assert pods <= {"127.0.0.1:8000", "127.0.0.2:8000"} and pods  # static endpoints: the address is the pod
    assert value(m, "inference_objective_request_total", model_name="a", priority="0") == 3
    assert value(m, "inference_extension_scheduler_e2e_duration_seconds_count") == 3
    assert value(m, "inference_extension_picker_added_latency_seconds_count") == 3
    assert value(m, "inference_extension_response_first_byte_seconds_count", model_name="a") == 3
    assert value(m, "inference_extension_info") == 1
    app.scheduler.timing_sample = 1  # time every decision from now on
    await exchange(ch, [request_headers(), *body_chunks(chat("a"))])
    m = scrape(app.metrics_port)
    assert value(m, "inference_extension_plugin_duration_seconds_count", extension_point="Scorer",
                 plugin_type="queue-scorer") == 1
    assert value(m, "inference_extension_plugin_duration_seconds_count", extension_point="Picker",
                 plugin_type="max-score-picker") == 1
    for name in ("inference_objective_request_duration_seconds_bucket", "inference_objective_request_sizes_bucket",
                 "inference_objective_response_sizes_bucket"):
        assert name in m


async def test_pool_gauges_use_fresh_scrapes_only(start_picker):
    app, ch = await start_picker(endpoints=["127.0.0.1:8000", "127.0.0.2:8000", "127.0.0.3:8000"])
    now = time.monotonic()
    eps = list(app.datastore.endpoints.values())
    eps[0].metrics = Metrics(waiting=4, running=2, kv_usage=0.5, updated=now)
    eps[1].metrics = Metrics(waiting=2, running=4, kv_usage=0.3, updated=now)
    eps[2].metrics = Metrics(waiting=100, running=100, kv_usage=1.0, updated=now - 60)  # stale: left out
    app.telemetry.refresh_pool(app.datastore, staleness=2.0, now=now)
    m = scrape(app.metrics_port)
    assert value(m, "inference_pool_average_queue_size", name="pool") == 3
    assert value(m, "inference_pool_average_running_requests", name="pool") == 3
    assert abs(value(m, "inference_pool_average_kv_cache_utilization", name="pool") - 0.4) < 1e-9
    assert value(m, "inference_pool_ready_pods", name="pool") == 3
    assert value(m, "inference_pool_per_pod_queue_size", model_server_pod="127.0.0.1:8000") == 4
    assert value(m, "inference_pool_per_pod_queue_size", model_server_pod="127.0.0.3:8000") is None


# ---- names, labels and values without the gRPC path: real RequestContexts into one Telemetry ----



def families(t: Telemetry) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in t.registry.collect():
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def ctx_for(ds: Datastore, model: str, target: str | None = None, *, priority: int = 0, headers=None,
            ttft: float = 0.0, elapsed: float = 0.0, completion: int = 0, prompt: int = 0,
            cached: int = 0) -> RequestContext:
    """A routed request that started `elapsed` seconds ago and saw its first byte after `ttft`."""
    now = time.perf_counter()
    started = now - elapsed
    ep = next(iter(ds.endpoints.values()))
    sched = SchedulingRequest(request_id="r", model=target or model, client_model=model, priority=priority,
                              headers=headers or {})
    return RequestContext(request_id="r", sched=sched, endpoints=[ep], client_model=model,
                          target_model=target or model, stream=True, api="chat", request_size=100,
                          started=started, routed_at=started + 0.001,
                          first_byte_at=started + ttft if ttft else 0.0, served=ep, usage_prompt=prompt,
                          usage_completion=completion, usage_cached=cached, response_size=50, status="200")


def pool(*addresses: str) -> Datastore:
    ds = Datastore("pool", "ns")
    ds.set_static_endpoints(addresses or ("10.0.0.1:8000",))
    return ds


def test_reference_families_and_labels() -> None:
    t = Telemetry(pool_name="pool")
    ds = pool()
    c = ctx_for(ds, "m", priority=2, ttft=1.0, elapsed=2.0, completion=11, prompt=40, cached=32)
    t.routed(c)
    t.finished(c)
    m = families(t)
    assert value(m, "inference_objective_request_total", model_name="m", target_model_name="m", priority="2") == 1
    assert value(m, "inference_objective_prompt_cached_tokens_sum", model_name="m") == 32
    assert value(m, "inference_objective_prompt_cached_tokens_count", model_name="m") == 1
    # TTFT = first byte - start (1 s); TPOT = (end - first byte) / (11 - 1) ~ 0.1 s
    assert value(m, "inference_objective_request_ttft_seconds_sum", model_name="m") == pytest.approx(1.0)
    tpot = value(m, "inference_objective_request_tpot_seconds_sum", model_name="m")
    assert 0.1 <= tpot < 0.2
    assert value(m, "inference_objective_inference_request_metric", model_name="m", type="ttft") == \
        pytest.approx(1.0)
    assert value(m, "inference_objective_inference_request_metric", model_name="m", type="tpot") == tpot
    info = m["inference_extension_info"][0]
    assert set(info.labels) == {"commit", "build_ref"} and info.value == 1
    attempts = m["inference_extension_scheduler_attempts_total"][0]
    assert attempts.labels == {"status": "success", "target_model_name": "m", "pod_name": "10.0.0.1:8000",
                               "namespace": "", "port": "8000"}
    # the reference's buckets (a few spot checks)
    les = {s.labels["le"] for s in m["inference_objective_request_tpot_seconds_bucket"]}
    assert {"0.00205", "4.5", "360.0"} <= les
    les = {s.labels["le"] for s in m["inference_objective_output_tokens_bucket"]}
    assert "8192.0" in les and "16384.0" not in les


def test_slo_headers_count_violations() -> None:
    t = Telemetry()
    ds = pool()
    slow = ctx_for(ds, "m", headers={"x-llm-d-slo-ttft-ms": "500", "x-slo-tpot-ms": "1000"}, ttft=1.0,
                   elapsed=1.5, completion=3)
    fast = ctx_for(ds, "m", headers={"x-llm-d-slo-ttft-ms": "5000"}, ttft=1.0, elapsed=1.2, completion=3)
    bad = ctx_for(ds, "m", headers={"x-llm-d-slo-ttft-ms": "soon"}, ttft=1.0, elapsed=1.2)
    for c in (slow, fast, bad):
        t.routed(c)
        t.finished(c)
    m = families(t)
    assert value(m, "inference_objective_request_slo_violation_total", model_name="m", type="ttft") == 1
    assert value(m, "inference_objective_request_slo_violation_total", model_name="m", type="tpot") is None
    # the gauge holds the latest outcome: the fast request met its TTFT SLO
    assert value(m, "inference_objective_inference_request_metric", type="ttft_slo_violation") == 0
    assert value(m, "inference_objective_inference_request_metric", type="tpot_slo_violation") == 0


def test_llm_d_names_carry_the_same_values() -> None:
    t = Telemetry(pool_name="pool")
    ds = pool()
    for _ in range(3):
        c = ctx_for(ds, "m", ttft=0.5, elapsed=1.0, completion=5, prompt=7)
        t.routed(c)
        t.finished(c)
    t.refresh_pool(ds, staleness=2.0)
    m = families(t)
    pairs = [("inference_objective_request_total", "llm_d_epp_request_total"),
             ("inference_objective_request_sizes_count", "llm_d_epp_request_size_bytes_count"),
             ("inference_objective_input_tokens_sum", "llm_d_epp_request_input_tokens_sum"),
             ("inference_objective_request_ttft_seconds_count", "llm_d_epp_request_ttft_seconds_count"),
             ("inference_pool_ready_pods", "llm_d_epp_ready_endpoints"),
             ("inference_extension_info", "llm_d_epp_info")]
    for old, new in pairs:
        assert [s.value for s in m[old]] == [s.value for s in m[new]], (old, new)
    assert value(m, "llm_d_epp_request_total", model_name="m") == 3
    assert value(m, "llm_d_epp_scheduler_attempts_total", endpoint_name="10.0.0.1:8000") == 3
    assert not any(n.startswith("llm_d_epp_") for n in families(Telemetry(llmd_names=False)))


def test_attempt_series_of_departed_endpoints_are_dropped() -> None:
    t = Telemetry()
    ds = pool("10.0.0.1:8000", "10.0.0.2:8000")
    for endpoint in list(ds.endpoints.values()):
        c = ctx_for(ds, "m")
        c.endpoints = [endpoint]
        t.routed(c)
    assert len(families(t)["inference_extension_scheduler_attempts_total"]) == 2
    ds.set_static_endpoints(["10.0.0.2:8000"])
    t.refresh_pool(ds, staleness=2.0)
    left = families(t)["inference_extension_scheduler_attempts_total"]
    assert [s.labels["pod_name"] for s in left] == ["10.0.0.2:8000"]


def _names(n: int, rng: random.Random) -> list[str]:
    return ["".join(rng.choices(string.ascii_lowercase, k=12)) for _ in range(n)]


def _model_values(t: Telemetry) -> set[str]:
    return {s.labels["model_name"] for s in families(t)["inference_objective_request_total"]}


def test_cardinality_unknown_pool_caps_distinct_names() -> None:
    """15,000 client-chosen names and one of 1 MiB: at most 1000 keep their value, the rest are
    `other`; the page stays bounded."""
    t = Telemetry()
    ds = pool()
    t.refresh_pool(ds, staleness=2.0)  # the pool knows no model names: llm-d's cap applies
    names = [*_names(15_000, random.Random(7)), "x" * (1 << 20)]
    for name in names:
        c = ctx_for(ds, name, ttft=0.1, elapsed=0.2, completion=3, prompt=5)
        t.routed(c)
        t.finished(c)
    values = _model_values(t)
    assert len(values) == 1001 and OTHER in values
    assert max(len(v) for v in values) <= 128
    assert value(families(t), "inference_objective_request_total", model_name=OTHER) == 15_001 - 1000
    page = generate_latest(t.registry)
    series = sum(1 for line in page.splitlines() if line and not line.startswith(b"#"))
    print(f"\n15,000 names + 1 MiB name, pool knows none: {series} series, /metrics {len(page)} bytes")
    # per kept name: 10 histograms of 16..38 lines and 4 plain series, twice (llm-d names): ~520 lines
    assert series <= 1001 * 520
    assert len(page) < 128 << 20


def test_cardinality_known_pool_keeps_only_its_names() -> None:
    t = Telemetry()
    ds = pool("10.0.0.1:8000")
    ep = ds.endpoints["10.0.0.1:8000"]
    ep.metrics = Metrics(models=frozenset({"base"}), lora_running=frozenset({"adapter-a"}),
                         lora_waiting=frozenset({"adapter-b"}), updated=time.monotonic())
    ds.models = ModelTable(exact={"alias": ("ns/rw", (TargetModel("rewritten"),))})
    t.refresh_pool(ds, staleness=2.0)
    names = [*_names(15_000, random.Random(8)), "x" * (1 << 20), "base", "adapter-a", "adapter-b", "alias"]
    for name in names:
        c = ctx_for(ds, name)
        t.routed(c)
        t.finished(c)
    assert _model_values(t) == {OTHER, "base", "adapter-a", "adapter-b", "alias"}
    rewritten = ctx_for(ds, "alias", "rewritten")
    t.routed(rewritten)
    targets = {s.labels["target_model_name"] for s in families(t)["inference_objective_request_total"]}
    assert "rewritten" in targets and len(targets) == 6
    page = generate_latest(t.registry)
    print(f"\n15,000 names + 1 MiB name, pool knows 6: /metrics {len(page)} bytes")
    assert len(page) < 1 << 20
    # a model object added later is learnt at once (no wait for the pool refresh)
    ds.models = ModelTable(exact={"late": ("ns/rw2", (TargetModel("base"),))})
    c = ctx_for(ds, "late", "base")
    t.routed(c)
    assert "late" in _model_values(t)


def test_running_gauge_stays_balanced_for_overflow_names() -> None:
    t = Telemetry(max_label_values=2)
    ds = pool()
    ctxs = [ctx_for(ds, n) for n in ("a", "b", "c", "d")]
    for c in ctxs:
        t.routed(c)
    m = families(t)
    assert value(m, "inference_objective_running_requests", model_name=OTHER) == 2
    for c in ctxs:
        t.finished(c)
    m = families(t)
    assert all(s.value == 0 for s in m["inference_objective_running_requests"])


async def test_client_model_names_cannot_blow_up_the_page(start_picker, tmp_path):
    """Through the real ext_proc path: a 1 MiB model name and 300 others, with a pool that knows
    its models (an InferenceModelRewrite): only the known names and `other` are labels."""
    (tmp_path / "m.yaml").write_text("""
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: alias}
spec:
  poolRef: {name: pool}
  rules: [{matches: [{model: {value: a}}], targets: [{modelRewrite: b}]}]
""")
    app, ch = await start_picker(endpoints=["127.0.0.1:8000"], manifests=[str(tmp_path)])
    rng = random.Random(3)
    names = ["x" * (1 << 20), *_names(300, rng), "a"]
    resp = json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 2}}).encode()
    for name in names:
        await exchange(ch, [request_headers(), *body_chunks(chat(name), 4), response_headers(),
                            ep.ProcessingRequest(response_body=ep.HttpBody(body=resp, end_of_stream=True))])
    page = urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=5).read()
    m = scrape(app.metrics_port)
    models = {s.labels["model_name"] for s in m["inference_objective_request_total"]}
    assert models == {"a", OTHER}
    assert value(m, "inference_objective_request_total", model_name=OTHER) == 301
    print(f"\n/metrics after a 1 MiB name and 300 others: {len(page)} bytes")
    assert len(page) < 512 << 10  # before the bound: the 1 MiB name alone made it ~286 MB


async def test_models_the_pods_report_are_learnt_from_their_pages(start_picker):
    """The real poller reads the served model from a vLLM page (`model_name` label); from the next
    pool refresh that name keeps its label and every other client name is `other`."""
    from tests.metrics import pages
    from tests.metrics.test_scrape import FakeServer, until

    server = await FakeServer(pages.vllm()).start()
    try:
        app, ch = await start_picker(endpoints=[server.address], refresh_prometheus_metrics_interval=0.05)
        ep_ = app.datastore.endpoints[server.address]
        await until(lambda: ep_.metrics is not None and pages.MODEL in ep_.metrics.models)
        await until(lambda: pages.MODEL in app.telemetry.models.pinned)
        for name in (pages.MODEL, "typo-model", "another-one"):
            await exchange(ch, [request_headers(), *body_chunks(chat(name))])
        m = scrape(app.metrics_port)
        assert {s.labels["model_name"] for s in m["inference_objective_request_total"]} == {pages.MODEL, OTHER}
        assert value(m, "inference_objective_request_total", model_name=OTHER) == 2
    finally:
        await server.close()


def test_known_names_are_capped_too_operator_names_first(caplog) -> None:
    """A model server reporting thousands of adapters cannot pin them all; the operator's names
    (model objects) are pinned before the pods'."""
    t = Telemetry(max_label_values=50)
    ds = pool("10.0.0.1:8000")
    ds.endpoints["10.0.0.1:8000"].metrics = Metrics(
        lora_running=frozenset(f"adapter-{i:05d}" for i in range(5000)), lora_max=4, updated=time.monotonic())
    ds.models = ModelTable(exact={"zzz-configured": ("ns/rw", (TargetModel("zzz-target"),))})
    with caplog.at_level("WARNING", logger="epp.telemetry"):
        t.refresh_pool(ds, staleness=2.0)
        t.refresh_pool(ds, staleness=2.0)
    assert len(t.models.pinned) == 50
    assert {"zzz-configured", "zzz-target"} <= t.models.pinned
    assert sum("label cap" in r.getMessage() for r in caplog.records) == 1
    assert t.models("adapter-04999") == OTHER


def test_fast_observe_matches_observe() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from epp.telemetry import fast_observe

    r = CollectorRegistry()
    h = Histogram("h", "h", ("k",), buckets=(0.1, 1, 2.5, 10), registry=r)
    fast, slow = fast_observe(h.labels("fast")), h.labels("slow").observe
    for v in (-1, 0, 0.1, 0.10000001, 1, 2.4, 2.5, 9.99, 10, 11, 1e9, float("inf")):
        fast(v)
        slow(v)
    got: dict[str, dict[str, float]] = {"fast": {}, "slow": {}}
    for fam in r.collect():
        for s in fam.samples:
            got[s.labels["k"]][s.name + s.labels.get("le", "")] = s.value
    assert got["fast"] == got["slow"]


def test_fast_inc_matches_inc_and_leaves_other_values_their_own_inc() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from epp.telemetry import fast_inc, fast_observe

    r = CollectorRegistry()
    c = Counter("c", "c", ("k",), registry=r)
    g = Gauge("g", "g", ("k",), registry=r)
    fast_c, fast_g = fast_inc(c.labels("fast")), fast_inc(g.labels("fast"))
    for amount in (1.0, 2.5, 0.0):
        fast_c(amount)
        c.labels("slow").inc(amount)
    for amount in (1.0, 1.0, -1.0, 3.0):
        fast_g(amount)
        g.labels("slow").inc(amount)
    got = {(s.name, s.labels["k"]): s.value for fam in r.collect() for s in fam.samples}
    assert got[("c_total", "fast")] == got[("c_total", "slow")] == 3.5
    assert got[("g", "fast")] == got[("g", "slow")] == 4.0

    class FileValue:  # a value class of another kind (as the multiprocess mode's): its own inc runs
        def __init__(self) -> None:
            self.calls: list[float] = []

        def inc(self, amount: float) -> None:
            self.calls.append(amount)

    child = c.labels("other")
    child._value = FileValue()
    fast_inc(child)(2.0)
    assert child._value.calls == [2.0]
    h = Histogram("h", "h", buckets=(1.0,), registry=r)
    h._sum = FileValue()
    fast_observe(h)(0.5)
    assert h._sum.calls == [0.5]

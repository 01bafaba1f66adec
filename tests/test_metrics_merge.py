"""Worker pages merged into one (epp.metrics_merge): request counters and histograms add up, the
pool's gauges are worker 0's, the gauges of a worker's own requests add up."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from epp.metrics_merge import merge


def page(requests: int, latency: list[float], pool_kv: float, running: int) -> str:
    r = CollectorRegistry()
    c = Counter("inference_objective_request_total", "requests", ["model_name"], registry=r)
    c.labels("m").inc(requests)
    h = Histogram("inference_objective_request_duration_seconds", "e2e", ["model_name"], buckets=(0.1, 1.0),
                  registry=r)
    for v in latency:
        h.labels("m").observe(v)
    Gauge("inference_pool_average_kv_cache_utilization", "pool kv", ["name"], registry=r).labels("p").set(pool_kv)
    Gauge("inference_objective_running_requests", "running", ["model_name"], registry=r).labels("m").set(running)
    Gauge("inference_extension_flow_control_queue_size", "queued", registry=r).set(running * 10)
    return generate_latest(r).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_request_figures_add_up_and_pool_figures_are_worker_zeros() -> None:
    w0 = page(3, [0.05, 0.5], pool_kv=0.25, running=2)
    w1 = page(5, [0.05, 2.0, 2.0], pool_kv=0.30, running=4)
    got = samples(merge([w0, w1]).decode())
    m = (("model_name", "m"),)
    assert got[("inference_objective_request_total", m)] == 8
    assert got[("inference_objective_request_duration_seconds_bucket", (("le", "0.1"), *m))] == 2
    assert got[("inference_objective_request_duration_seconds_bucket", (("le", "1.0"), *m))] == 3
    assert got[("inference_objective_request_duration_seconds_count", m)] == 5
    assert abs(got[("inference_objective_request_duration_seconds_sum", m)] - 4.6) < 1e-9
    assert got[("inference_pool_average_kv_cache_utilization", (("name", "p"),))] == 0.25  # worker 0's
    assert got[("inference_objective_running_requests", m)] == 6  # each worker's own requests
    assert got[("inference_extension_flow_control_queue_size", ())] == 60


def test_a_created_time_is_the_earliest_workers() -> None:
    head = "# HELP x_total x\n# TYPE x_total counter\n"
    got = samples(merge([head + "x_total 1.0\nx_created 200.0\n", head + "x_total 2.0\nx_created 100.0\n"]).decode())
    assert got[("x_total", ())] == 3 and got[("x_created", ())] == 100.0


def test_series_only_one_worker_has_are_kept_and_one_page_merges_to_itself() -> None:
    w0 = page(1, [], pool_kv=0.5, running=0)
    r = CollectorRegistry()
    Counter("inference_objective_request_total", "requests", ["model_name"], registry=r).labels("other").inc(2)
    got = samples(merge([w0, generate_latest(r).decode()]).decode())
    assert got[("inference_objective_request_total", (("model_name", "m"),))] == 1
    assert got[("inference_objective_request_total", (("model_name", "other"),))] == 2
    assert merge([w0]).decode() == w0

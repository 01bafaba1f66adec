"""The picker's own metrics: names, labels and values after real requests through the ext_proc server."""

from __future__ import annotations

import json
import time
import urllib.request

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from prometheus_client.parser import text_string_to_metric_families

from epp.datastore import Metrics
from tests.extproc_client import body_chunks, chat, exchange, request_headers, response_headers


def scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


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
    assert value(m, "inference_extension_scheduler_attempts_total", status="success") == 3
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

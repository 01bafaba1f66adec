"""Engine metric maps: each engine's page becomes the same Metrics; overrides and aliases."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from epp.metrics.engines import (
    ENGINES,
    MissingMetrics,
    Source,
    apply_data_layer,
    apply_flag_overrides,
    apply_overrides,
    parse_spec,
    read_metrics,
    resolve_engine,
)
from epp.resources import ResourceError
from tests.metrics import pages


def test_vllm_current_kv_name() -> None:
    m = read_metrics(ENGINES["vllm"], pages.vllm(waiting=2, running=5, kv=0.25), now=12.5)
    assert (m.waiting, m.running, m.kv_usage) == (2, 5, 0.25)
    assert (m.block_size, m.num_blocks) == (16, 31250)
    assert m.updated == 12.5
    assert m.models == {pages.MODEL}  # the served base model, from the model_name label


def test_vllm_older_kv_name_detected() -> None:
    m = read_metrics(ENGINES["vllm"], pages.vllm(kv=0.6, old_kv_name=True).encode(), now=1)
    assert m.kv_usage == 0.6


def test_vllm_lora_newest_series_wins_and_csv_is_split() -> None:
    m = read_metrics(ENGINES["vllm"], pages.vllm(), now=0)
    assert m.lora_max == 4
    assert m.lora_running == frozenset({"sql-lora", "food-review"})
    assert m.lora_waiting == frozenset({"tweet"})


def test_vllm_lora_newest_regardless_of_page_order() -> None:
    page = pages.vllm(lora=False) + (
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a",waiting_lora_adapters=""} 100\n'
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="b,c",waiting_lora_adapters="a"} 300\n'
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="d",waiting_lora_adapters=""} 200\n'
    )
    m = read_metrics(ENGINES["vllm"], page, now=0)
    assert (m.lora_max, m.lora_running, m.lora_waiting) == (2, frozenset({"b", "c"}), frozenset({"a"}))


def test_vllm_without_lora_or_cache_config() -> None:
    page = pages.vllm(lora=False).replace("vllm:cache_config_info", "vllm:something_else")
    m = read_metrics(ENGINES["vllm"], page, now=0)
    assert (m.lora_max, m.lora_running, m.block_size, m.num_blocks) == (0, frozenset(), 0, 0)


def test_vllm_data_parallel_ranks_sum_counts_average_kv() -> None:
    page = (
        'vllm:num_requests_waiting{engine="0"} 1\nvllm:num_requests_waiting{engine="1"} 2\n'
        'vllm:num_requests_running{engine="0"} 3\nvllm:num_requests_running{engine="1"} 4\n'
        'vllm:kv_cache_usage_perc{engine="0"} 0.2\nvllm:kv_cache_usage_perc{engine="1"} 0.4\n'
    )
    m = read_metrics(ENGINES["vllm"], page, now=0)
    assert (m.waiting, m.running, m.kv_usage) == (3, 7, pytest.approx(0.3))


def test_sglang() -> None:
    m = read_metrics(ENGINES["sglang"], pages.sglang(waiting=3, running=7, usage=0.5), now=0)
    assert (m.waiting, m.running, m.kv_usage, m.block_size, m.num_blocks) == (3, 7, 0.5, 64, 8192)


def test_trtllm_serve() -> None:
    m = read_metrics(ENGINES["trtllm-serve"], pages.trtllm_serve(waiting=1, running=4, util=0.75), now=0)
    assert (m.waiting, m.running, m.kv_usage, m.block_size, m.num_blocks) == (1, 4, 0.75, 32, 4096)


def test_triton_label_selectors() -> None:
    m = read_metrics(ENGINES["triton-tensorrt-llm"], pages.triton(waiting=6, scheduled=8, fraction=0.125), now=0)
    assert (m.waiting, m.running, m.kv_usage, m.block_size, m.num_blocks) == (6, 8, 0.125, 64, 800)


def test_missing_required_signal_is_an_error() -> None:
    with pytest.raises(MissingMetrics) as err:
        read_metrics(ENGINES["vllm"], pages.sglang(), now=0)
    assert set(err.value.missing) == {"waiting", "running", "kv_usage"}
    with pytest.raises(MissingMetrics):
        read_metrics(ENGINES["vllm"], b"<html>not metrics</html>\n", now=0)
    page = pages.vllm().replace("vllm:num_requests_waiting", "vllm:x")
    with pytest.raises(MissingMetrics) as err:
        read_metrics(ENGINES["vllm"], page, now=0)
    assert err.value.missing == ["waiting"]


def test_nan_gauge_counts_as_missing() -> None:
    page = pages.vllm().replace("vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"" + pages.MODEL + "\"} 0.25",
                                "vllm:kv_cache_usage_perc{engine=\"0\"} NaN")
    with pytest.raises(MissingMetrics):
        read_metrics(ENGINES["vllm"], page, now=0)


@pytest.mark.parametrize(
    ("label", "engine"),
    [
        (None, "vllm"),
        ("", "vllm"),
        ("vllm", "vllm"),
        ("VLLM", "vllm"),
        ("sglang", "sglang"),
        ("trtllm", "trtllm-serve"),
        ("TensorRT-LLM", "trtllm-serve"),
        ("trtllm_serve", "trtllm-serve"),
        ("triton", "triton-tensorrt-llm"),
        ("triton-tensorrt-llm", "triton-tensorrt-llm"),
    ],
)
def test_resolve_engine_aliases(label: str | None, engine: str) -> None:
    assert resolve_engine(label).name == engine


def test_unknown_engine_falls_back_to_vllm_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="epp.metrics.engines")
    assert resolve_engine("mystery-engine-x").name == "vllm"
    assert resolve_engine("mystery-engine-x").name == "vllm"
    assert len([r for r in caplog.records if "unknown engine" in r.getMessage()]) == 1


def test_override_one_signal_keeps_the_rest() -> None:
    specs = apply_overrides({"vllm": {"waiting": "my:queue"}})
    vllm = specs["vllm"]
    assert vllm.waiting == (Source("my:queue"),)
    assert vllm.running == ENGINES["vllm"].running
    assert vllm.kv_usage == ENGINES["vllm"].kv_usage
    assert ENGINES["vllm"].waiting[0].name == "vllm:num_requests_waiting"  # built-ins untouched
    page = pages.vllm(waiting=2).replace("vllm:num_requests_waiting", "my:queue")
    assert read_metrics(vllm, page, now=0).waiting == 2
    assert "my:queue" in vllm.names


def test_override_forms_labels_alternatives_label_reads_and_lora_off() -> None:
    specs = apply_overrides({
        "triton": {"running": {"name": "nv_trt_llm_request_metrics", "labels": {"request_type": "active"}}},
        "sglang": {"kvUsage": ["sglang:kv_usage", "sglang:token_usage"],
                   "blockSize": {"name": "sglang:cache_config_info", "label": "num_pages"}},
        "vllm": {"lora": None},
    })
    m = read_metrics(specs["triton-tensorrt-llm"], pages.triton(), now=0)
    assert m.running == 9
    m = read_metrics(specs["sglang"], pages.sglang(usage=0.5), now=0)
    assert (m.kv_usage, m.block_size) == (0.5, 8192)
    assert read_metrics(specs["vllm"], pages.vllm(), now=0).lora_running == frozenset()


def test_override_new_engine_from_base() -> None:
    specs = apply_overrides({"my-engine": {"base": "sglang", "waiting": "my_engine_queue"}})
    spec = resolve_engine("my-engine", specs)
    assert spec.name == "my-engine"
    assert spec.running == ENGINES["sglang"].running
    page = pages.sglang(waiting=3).replace("sglang:num_queue_reqs", "my_engine_queue")
    assert read_metrics(spec, page, now=0).waiting == 3


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"vllm": {"waiting": None}}, "engineMetrics.vllm.waiting"),
        ({"vllm": {"queue": "x"}}, "engineMetrics.vllm.queue"),
        ({"vllm": {"waiting": 3}}, "engineMetrics.vllm.waiting"),
        ({"vllm": {"waiting": {"labels": {"a": "b"}}}}, "engineMetrics.vllm.waiting.name"),
        ({"new": {"base": "nope"}}, "engineMetrics.new.base"),
        ({"vllm": {"base": "sglang"}}, "engineMetrics.vllm.base"),
        ({"vllm": "x"}, "engineMetrics.vllm"),
        ({"vllm": {"lora": {"name": "x", "bogus": "y"}}}, "engineMetrics.vllm.lora"),
    ],
)
def test_override_errors_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ResourceError) as err:
        apply_overrides(overrides)
    assert err.value.field == field


def test_names_for_filter_include_every_alternative() -> None:
    names = ENGINES["vllm"].names
    assert "vllm:kv_cache_usage_perc" in names and "vllm:gpu_cache_usage_perc" in names
    assert "vllm:lora_requests_info" in names and "vllm:cache_config_info" in names
    assert len(names) == len(set(names))


# ---- engines as they ship now (protocol.md §14) ------------------------------------------------


def test_vllm_adapter_in_flight_counts_once() -> None:
    m = read_metrics(ENGINES["vllm"], pages.vllm_lora_in_flight(), now=0)
    assert m.lora_running == frozenset({"sql-lora"})
    assert m.lora_waiting == frozenset()  # listed under both labels, holds one slot
    assert m.lora_max - len(m.lora_running) - len(m.lora_waiting) == 1


def test_sglang_0511_page_gauges_and_priority_total() -> None:
    m = read_metrics(ENGINES["sglang"], pages.sglang_0511(total_waiting=4, total_running=6), now=0)
    # the priority="" total, not the sum of total and parts (which would be 8 and 12)
    assert (m.waiting, m.running, m.kv_usage) == (4, 6, 0.375)
    assert (m.block_size, m.num_blocks) == (32, 16384)
    assert m.models == {pages.MODEL}


def test_sglang_priority_parts_without_total_are_added() -> None:
    page = pages.sglang_0511(total_waiting=5).replace(
        'sglang:num_queue_reqs{engine_type="unified",model_name="' + pages.MODEL
        + '",pp_rank="0",tp_rank="0",priority=""} 5', "")
    m = read_metrics(ENGINES["sglang"], page, now=0)
    assert m.waiting == 5  # 3 + 2: the parts of one queue


def test_sglang_older_cache_config_info_still_read() -> None:
    m = read_metrics(ENGINES["sglang"], pages.sglang(), now=0)
    assert (m.block_size, m.num_blocks) == (64, 8192)


def test_where_each_engine_serves_its_page() -> None:
    assert (ENGINES["vllm"].scheme, ENGINES["vllm"].path, ENGINES["vllm"].port) == ("http", "/metrics", None)
    assert ENGINES["sglang"].path == "/metrics"
    assert ENGINES["trtllm-serve"].path == "/prometheus/metrics"  # /metrics is JSON there
    assert (ENGINES["triton-tensorrt-llm"].path, ENGINES["triton-tensorrt-llm"].port) == ("/metrics", 8002)
    assert all(spec.insecure_skip_verify for spec in ENGINES.values())  # the reference's default


# ---- the reference's flags ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "match"),
    [
        ("vllm:num_requests_waiting", "vllm:num_requests_waiting", ()),
        ("nv_trt_llm_request_metrics{request_type=waiting}", "nv_trt_llm_request_metrics",
         (("request_type", "waiting"),)),
        ('x{a="b,c", d = e}', "x", (("a", "b,c"), ("d", "e"))),
        ('"sglang:num_queue_reqs"', "sglang:num_queue_reqs", ()),  # the chart's --flag="name"
        ("x{}", "x", ()),
    ],
)
def test_parse_spec(text: str, name: str, match: tuple) -> None:
    assert parse_spec(text) == Source(name, match)


@pytest.mark.parametrize("text", ["", "{a=b}", "x{a=b", "x{a}", "x y", "x{a=b}}", "1x"])
def test_parse_spec_errors(text: str) -> None:
    with pytest.raises(ResourceError) as err:
        parse_spec(text, "--total-queued-requests-metric")
    assert err.value.field == "--total-queued-requests-metric"


def test_flags_as_the_chart_renders_them_for_triton() -> None:
    """The v1.5 chart's triton-tensorrt-llm args, applied to the default engine, read a Triton page."""
    specs = apply_flag_overrides(
        ENGINES,
        queued="nv_trt_llm_request_metrics{request_type=waiting}",
        running="nv_trt_llm_request_metrics{request_type=scheduled}",
        kv="nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}",
        lora="",
    )
    m = read_metrics(specs["vllm"], pages.triton(waiting=6, scheduled=8, fraction=0.125), now=0)
    assert (m.waiting, m.running, m.kv_usage) == (6, 8, 0.125)
    assert specs["vllm"].lora is None
    assert specs["sglang"] is ENGINES["sglang"]  # engines named by a pod label keep their own map
    assert ENGINES["vllm"].lora is not None  # built-ins untouched


def test_flags_for_sglang_cache_info_read_its_labels() -> None:
    specs = apply_flag_overrides(ENGINES, queued='"sglang:num_queue_reqs"', running="sglang:num_running_reqs",
                                 kv="sglang:token_usage", cache_info="sglang:cache_config_info")
    m = read_metrics(specs["vllm"], pages.sglang(), now=0)
    assert (m.waiting, m.running, m.block_size, m.num_blocks) == (3, 7, 64, 8192)
    # an unknown info metric is read with vLLM's label names
    specs = apply_flag_overrides(ENGINES, cache_info="my:cache_info")
    page = pages.vllm().replace("vllm:cache_config_info", "my:cache_info")
    assert read_metrics(specs["vllm"], page, now=0).block_size == 16
    assert read_metrics(apply_flag_overrides(ENGINES, cache_info="")["vllm"], pages.vllm(), now=0).block_size == 0


def test_flags_where_apply_to_every_engine() -> None:
    specs = apply_flag_overrides(ENGINES, scheme="https", path="prom", port=9400, insecure_skip_verify=False)
    for spec in specs.values():
        assert (spec.scheme, spec.path, spec.port, spec.insecure_skip_verify) == ("https", "/prom", 9400, False)
    untouched = apply_flag_overrides(ENGINES)
    assert untouched == ENGINES


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"scheme": "ftp"}, "--model-server-metrics-scheme"),
        ({"port": 0}, "--model-server-metrics-port"),
        ({"port": 70000}, "--model-server-metrics-port"),
        ({"queued": ""}, "--total-queued-requests-metric"),
        ({"kv": "bad{"}, "--kv-cache-usage-percentage-metric"),
        ({"lora": "{x=y}"}, "--lora-info-metric"),
    ],
)
def test_flag_errors_name_the_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ResourceError) as err:
        apply_flag_overrides(ENGINES, **kwargs)
    assert err.value.field == flag


def test_data_layer_config() -> None:
    @dataclass
    class DataLayer:
        scheme: str | None = None
        path: str | None = None
        port: int | None = None
        insecure_skip_verify: bool | None = None

    specs = apply_data_layer(ENGINES, DataLayer(path="/custom", port=9090))
    assert (specs["sglang"].path, specs["sglang"].port, specs["sglang"].scheme) == ("/custom", 9090, "http")
    assert apply_data_layer(ENGINES, DataLayer()) == ENGINES
    assert apply_data_layer(ENGINES, None) == ENGINES

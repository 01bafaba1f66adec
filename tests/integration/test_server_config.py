"""What the server takes from the config beyond scheduling: the data layer's where-to-scrape
settings (flags win over them) and the config's warnings, logged once at start."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from epp.cli import parse_args
from epp.datalayer import DataLayerConfig
from epp.metrics.engines import TRITON_METRICS_PORT
from epp.server import data_layer_given, engine_specs
from tests.metrics import pages

LLMD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def test_data_layer_applies_to_every_engine_and_flags_win():
    dl = DataLayerConfig(scheme="https", path="/stats", port=9100, insecure_skip_verify=False)
    specs = engine_specs({}, parse_args(["--pool-name", "p"]), dl)
    assert {(s.scheme, s.path, s.port, s.insecure_skip_verify) for s in specs.values()} == {
        ("https", "/stats", 9100, False)}
    flagged = parse_args(["--pool-name", "p", "--model-server-metrics-path", "/flag",
                          "--model-server-metrics-port", "9200", "--model-server-metrics-scheme", "http"])
    specs = engine_specs({}, flagged, dl)
    assert {(s.scheme, s.path, s.port, s.insecure_skip_verify) for s in specs.values()} == {
        ("http", "/flag", 9200, False)}  # insecure came from the config alone


def test_a_data_source_with_defaults_keeps_each_engines_own_path_and_port():
    plain = engine_specs({}, parse_args(["--pool-name", "p"]))
    assert data_layer_given(DataLayerConfig()) == data_layer_given(DataLayerConfig(path="/metrics"))
    specs = engine_specs({}, parse_args(["--pool-name", "p"]), DataLayerConfig())
    assert specs == plain
    assert specs["triton-tensorrt-llm"].port == TRITON_METRICS_PORT
    only_port = engine_specs({}, parse_args(["--pool-name", "p"]), DataLayerConfig(port=9300))
    assert only_port["triton-tensorrt-llm"].path == plain["triton-tensorrt-llm"].path
    assert {s.port for s in only_port.values()} == {9300}


async def _page_server(path: str) -> tuple[web.AppRunner, int, list[str]]:
    seen: list[str] = []

    async def metrics(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text=pages.vllm(waiting=7, running=3))

    app = web.Application()
    app.router.add_get(path, metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port, seen


async def _until(cond, what: str) -> None:
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not seen within 4 s: {what}")


async def test_the_picker_scrapes_where_the_config_data_source_says(start_picker):
    runner, port, seen = await _page_server("/custom-metrics")
    try:
        cfg = LLMD + (
            "plugins:\n- type: queue-scorer\n- name: m\n  type: metrics-data-source\n"
            "  parameters: {path: /custom-metrics}\n"
            "dataLayer: {sources: [{pluginRef: m}]}\n"
            "schedulingProfiles: [{name: default, plugins: [{pluginRef: queue-scorer}]}]\n")
        app, _ = await start_picker(endpoints=[f"127.0.0.1:{port}"], config_text=cfg)
        ep = app.datastore.endpoints[f"127.0.0.1:{port}"]
        await _until(lambda: ep.metrics is not None and ep.metrics.waiting == 7, "metrics read from /custom-metrics")
        assert seen and set(seen) == {"/custom-metrics"}
    finally:
        await runner.cleanup()


async def test_a_flag_wins_over_the_config_data_source(start_picker):
    runner, port, seen = await _page_server("/from-flag")
    try:
        cfg = LLMD + ("plugins:\n- type: queue-scorer\n- type: metrics-data-source\n"
                      "  parameters: {path: /from-config}\n")
        app, _ = await start_picker(endpoints=[f"127.0.0.1:{port}"], config_text=cfg,
                                    model_server_metrics_path="/from-flag")
        ep = app.datastore.endpoints[f"127.0.0.1:{port}"]
        await _until(lambda: ep.metrics is not None and ep.metrics.waiting == 7, "metrics read from /from-flag")
        assert set(seen) == {"/from-flag"}
    finally:
        await runner.cleanup()


async def test_config_warnings_are_logged_once_at_start(start_picker, caplog):
    caplog.set_level(logging.INFO)
    cfg = LLMD + ("plugins: [{type: queue-scorer}, {type: endpoint-notification-source}]\n"
                  "dataLayer: {injectDefaults: false, sources: [{pluginRef: endpoint-notification-source}]}\n")
    app, _ = await start_picker(endpoints=["127.0.0.1:9"], config_text=cfg)
    assert app.config.warnings
    msgs = [r.getMessage() for r in caplog.records if r.name == "epp.server"]
    for w in app.config.warnings:
        assert sum(m == f"config: {w}" for m in msgs) == 1
    warned = [r for r in caplog.records if r.name == "epp.server" and r.getMessage().startswith("config: ")]
    assert {r.levelno for r in warned} == {logging.WARNING}
    # no metrics-data-source is wired: the picker does not scrape (as the warning says)
    assert app.scraper is None


async def test_no_warnings_no_config_lines(start_picker, caplog):
    caplog.set_level(logging.INFO)
    app, _ = await start_picker(endpoints=["127.0.0.1:9"])
    assert app.config.warnings == ()
    assert not [r for r in caplog.records if r.name == "epp.server" and r.getMessage().startswith("config: ")]
    assert app.scraper is not None

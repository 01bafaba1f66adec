"""Flag names, defaults, the --flag=false form, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from epp.cli import parse_args, parse_duration


def test_reference_defaults(monkeypatch):
    monkeypatch.delenv("NAMESPACE", raising=False)
    o = parse_args(["--pool-name", "p"])
    assert (o.grpc_port, o.grpc_health_port, o.metrics_port) == (9002, 9003, 9090)
    assert o.secure_serving is True and o.pool_namespace == "default"
    assert o.refresh_metrics_interval == 0.05 and o.refresh_prometheus_metrics_interval == 5.0
    assert o.pool_group == "inference.networking.k8s.io"
    assert o.grpc_server == "native"
    assert parse_args(["--pool-name", "p", "--grpc-server", "grpcio"]).grpc_server == "grpcio"


def test_namespace_env_and_bool_forms(monkeypatch):
    monkeypatch.setenv("NAMESPACE", "prod")
    from epp import cli
    o = cli.parse_args(["--pool-name", "p", "--secure-serving=false", "--ha-enable-leader-election"])
    assert o.secure_serving is False and o.ha_enable_leader_election is True
    assert cli.build_parser().parse_args(["--pool-name", "p"]).pool_namespace == "prod"
    assert parse_args(["--pool-name", "p", "--secure-serving", "false"]).secure_serving is False


@pytest.mark.parametrize(("text", "secs"), [("50ms", 0.05), ("5s", 5.0), ("1m30s", 90.0), ("0.2", 0.2)])
def test_durations(text, secs):
    assert parse_duration(text) == pytest.approx(secs)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--pool-name is required"),
        (["--pool-name", "p", "--secure-serving=maybe"], "expected true or false"),
        (["--pool-name", "p", "--grpc-port", "70000"], "port out of range"),
        (["--pool-name", "p", "--refresh-metrics-interval", "fast"], "invalid duration"),
        (["--pool-name", "p", "--endpoint-selector", "app=x"], "must be given together"),
        (["--pool-name", "p", "--endpoints", "10.0.0.1"], "expected ip:port"),
        (["--pool-name", "p", "--manifests", "/nonexistent"], "does not exist"),
        (["--pool-name", "p", "--config-text", "a", "--config-file", "b"], "not both"),
        (["--pool-name", "p", "--grpc-server", "grpc-go"], "invalid choice"),
    ],
)
def test_bad_flags_exit_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_module_help_runs():
    out = subprocess.run([sys.executable, "-m", "epp", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--pool-name" in out.stdout and "--manifests" in out.stdout


# ---- the reference's flags (GIE v1.5 chart args, llm-d v0.10) ---------------------------------------
def test_chart_args_parse_with_their_meaning(tmp_path):
    cfg = tmp_path / "default-plugins.yaml"
    cfg.write_text("")
    o = parse_args(["--pool-name", "p", "--pool-namespace", "ns", "--pool-group", "inference.networking.k8s.io",
                    "--zap-encoder", "json", "--config-file", str(cfg), "--v", "1", "--tracing=false",
                    "--total-queued-requests-metric", "sglang:num_queue_reqs",
                    "--total-running-requests-metric", "sglang:num_running_reqs",
                    "--kv-cache-usage-percentage-metric", "sglang:token_usage", "--lora-info-metric", "",
                    "--cache-info-metric", "sglang:cache_config_info", "--ha-enable-leader-election"])
    assert (o.log_level, o.log_format, o.tracing, o.ha_enable_leader_election) == ("info", "json", False, True)
    assert o.metric_flags == {"total-queued-requests-metric": "sglang:num_queue_reqs",
                              "total-running-requests-metric": "sglang:num_running_reqs",
                              "kv-cache-usage-percentage-metric": "sglang:token_usage", "lora-info-metric": "",
                              "cache-info-metric": "sglang:cache_config_info"}
    assert not o.notices


def test_reference_flag_defaults():
    o = parse_args(["--pool-name", "p"])
    assert o.enable_pprof is True and o.metrics_endpoint_auth is True and o.tracing is False
    assert o.drain_timeout == 30.0 and not o.disable_endpoint_subset_filter and not o.metric_flags
    assert o.model_server_metrics_scheme is None and o.model_server_metrics_port is None
    # the gRPC receive limit follows the body cap
    assert o.grpc_recv_limit == 16 * 1024 * 1024 + (1 << 20)
    assert parse_args(["--pool-name", "p", "--max-request-body-bytes", "1000"]).grpc_recv_limit == 1000 + (1 << 20)
    assert parse_args(["--pool-name", "p", "--grpc-max-recv-msg-size", "10Mi"]).grpc_recv_limit == 10 << 20


@pytest.mark.parametrize(("argv", "attr", "value"), [
    (["--enable-pprof=false"], "enable_pprof", False),
    (["--enable-pprof", "false"], "enable_pprof", False),
    (["--metrics-endpoint-auth=false"], "metrics_endpoint_auth", False),
    (["--tracing"], "tracing", True),
    (["--tracing=true"], "tracing", True),
    (["--disable-endpoint-subset-filter"], "disable_endpoint_subset_filter", True),
    (["--drain-timeout=45s"], "drain_timeout", 45.0),
    (["--drain-timeout", "0"], "drain_timeout", 0.0),
    (["--grpc-max-recv-msg-size=10485760"], "grpc_max_recv_msg_size", 10485760),
    (["--grpc-max-recv-msg-size", "10MiB"], "grpc_max_recv_msg_size", 10 << 20),
    (["--grpc-max-recv-msg-size", "25MB"], "grpc_max_recv_msg_size", 25_000_000),
    (["--grpc-max-send-msg-size", "1Gi"], "grpc_max_send_msg_size", 1 << 30),
    (["--model-server-metrics-scheme", "https"], "model_server_metrics_scheme", "https"),
    (["--model-server-metrics-path=/m"], "model_server_metrics_path", "/m"),
    (["--model-server-metrics-port", "8081"], "model_server_metrics_port", 8081),
    (["--model-server-metrics-port", "0"], "model_server_metrics_port", None),  # the reference's "unset"
    (["--model-server-metrics-https-insecure-skip-verify=false"], "model_server_metrics_insecure", False),
    (["--zap-log-level", "debug"], "log_level", "debug"),
    (["--zap-log-level=error"], "log_level", "error"),
    (["--zap-log-level", "5"], "log_level", "debug"),
    (["--zap-log-level", "2", "--v", "9"], "log_level", "info"),  # zap's level wins over --v
    (["--v", "4"], "log_level", "debug"),
    (["-v", "3"], "log_level", "info"),
    (["--v=1"], "log_level", "info"),
    (["--zap-encoder", "console"], "log_format", "text"),
    (["--zap-devel"], "log_format", "text"),
    (["--zap-devel=false"], "log_format", "json"),
    (["--zap-stacktrace-level", "error"], "log_stacktrace_level", "error"),
    (["--zap-time-encoding", "epoch"], "log_time_encoding", "epoch"),
])
def test_reference_flag_forms(argv, attr, value):
    assert getattr(parse_args(["--pool-name", "p", *argv]), attr) == value


@pytest.mark.parametrize("flag", ["--health-checking", "--emit-endpoint-scores", "--enable-grpc-stream-metrics",
                                  "--allow-experimental-plugins", "--tls-min-version=VersionTLS13",
                                  "--metrics-cert-dir=/certs"])
def test_flags_without_effect_are_notices_not_errors(flag):
    o = parse_args(["--pool-name", "p", flag])
    name = flag.split("=")[0]
    assert len(o.notices) == 1 and o.notices[0].startswith(f"{name} has no effect here: ")


@pytest.mark.parametrize(("argv", "message"), [
    (["--grpc-max-recv-msg-size", "10invalid"], "invalid size"),
    (["--grpc-max-recv-msg-size=-10Mi"], "invalid size"),
    (["--grpc-max-recv-msg-size", "10Ei"], "larger than gRPC allows"),
    (["--total-queued-requests-metric", "q{broken"], "expected {label=value"),
    (["--zap-log-level", "loud"], "invalid log level"),
    (["--v", "lots"], "--v takes a number"),
    (["--model-server-metrics-scheme", "ftp"], "invalid choice"),
    (["--drain-timeout", "soon"], "invalid duration"),
    (["--endpoint-selector", "tier!=frontend", "--endpoint-target-ports", "8000"], "only key=value terms"),
    (["--endpoint-selector", "env in (prod,staging)", "--endpoint-target-ports", "8000"], "only key=value terms"),
])
def test_bad_reference_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--pool-name", "p", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_standalone_mode_names_the_pool_after_the_deployment(monkeypatch):
    monkeypatch.setenv("POD_NAME", "vllm-llama3-epp-7d9f8b6c5-x2x9z")
    o = parse_args(["--endpoint-selector", "app=vllm", "--endpoint-target-ports", "8000,8000,8001"])
    assert o.standalone and o.pool_name == "vllm-llama3-epp"
    assert o.endpoint_target_ports == [8000, 8001]  # duplicates dropped, as the reference does
    monkeypatch.setenv("POD_NAME", "plainname")
    assert parse_args(["--endpoint-selector", "app=vllm", "--endpoint-target-ports", "8000"]).pool_name == "plainname"
    assert not parse_args(["--pool-name", "p"]).standalone


def test_more_than_eight_target_ports_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--endpoint-selector", "app=x",
                    "--endpoint-target-ports", ",".join(str(8000 + i) for i in range(9))])
    assert "1 to 8 ports" in capsys.readouterr().err


def test_metric_flags_reach_the_engine_map():
    from epp.server import engine_specs

    o = parse_args(["--pool-name", "p", "--total-queued-requests-metric", "my_queue{rank=0}", "--lora-info-metric", "",
                    "--model-server-metrics-path", "/m", "--model-server-metrics-port", "9100"])
    specs = engine_specs(None, o)
    vllm = specs["vllm"]
    assert vllm.waiting[0].name == "my_queue" and vllm.waiting[0].match == (("rank", "0"),)
    assert vllm.lora is None
    assert all(s.path == "/m" and s.port == 9100 for s in specs.values())  # where pages are: every engine
    assert specs["sglang"].waiting[0].name == "sglang:num_queue_reqs"  # names: the unlabelled default only


def test_help_explains_the_reference_flags():
    out = subprocess.run([sys.executable, "-m", "epp", "--help"], capture_output=True, text=True, timeout=60)
    for flag in ("--drain-timeout", "--grpc-max-recv-msg-size", "--metrics-endpoint-auth", "--enable-pprof",
                 "--tracing", "--zap-encoder", "--zap-log-level", "--total-queued-requests-metric",
                 "--disable-endpoint-subset-filter", "--health-checking", "no effect here"):
        assert flag in out.stdout, flag


@pytest.mark.parametrize(("encoding", "check"), [
    ("epoch", lambda ts: isinstance(ts, float) and ts > 1e9),
    ("millis", lambda ts: isinstance(ts, float) and ts > 1e12),
    ("nano", lambda ts: isinstance(ts, int) and ts > 1e18),
    ("rfc3339", lambda ts: ts.endswith("Z") and "." not in ts),
    ("rfc3339nano", lambda ts: len(ts.split(".")[1]) == 10),
    ("", lambda ts: len(ts.split(".")[1]) == 4),  # ours: milliseconds + Z
])
def test_zap_time_encodings(encoding, check):
    import json
    import logging

    from epp.logs import JsonFormatter

    rec = logging.LogRecord("epp.x", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    out = json.loads(JsonFormatter(encoding).format(rec))
    assert out["msg"] == "hello there" and check(out["ts"]), out["ts"]


def test_zap_stacktrace_level_adds_the_callers_stack():
    import json
    import logging

    from epp.logs import JsonFormatter, TextFormatter

    def where_it_failed() -> logging.LogRecord:
        return logging.LogRecord("epp.x", logging.ERROR, __file__, 1, "boom", (), None)

    rec = where_it_failed()
    out = json.loads(JsonFormatter(stack_level=logging.ERROR).format(rec))
    assert "test_zap_stacktrace_level_adds_the_callers_stack" in out["stacktrace"]
    assert "stacktrace" not in json.loads(JsonFormatter().format(rec))
    info = logging.LogRecord("epp.x", logging.INFO, __file__, 1, "fine", (), None)
    assert "stacktrace" not in json.loads(JsonFormatter(stack_level=logging.ERROR).format(info))
    assert "\n" in TextFormatter(stack_level=logging.ERROR).format(rec)

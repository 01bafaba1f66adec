"""The sidecar's flags (llm-d pd-sidecar names and defaults), its usage rewriting, and the process:
`python -m epp sidecar` serving TLS by default, proxying to a simulated engine."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from epp.sidecar.options import OptionError, parse_options
from epp.sidecar.proxy import prefill_body
from epp.sidecar.usage import SSERewriter, rewrite_json
from epp.sim.server import SimServer, SimServerConfig

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_llmds():
    o = parse_options([], env={})
    assert (o.port, o.model_server_port, o.kv_connector, o.secure_proxy, o.enable_ssrf_protection) == \
        (8000, 8200, "nixlv2", True, False)
    assert (o.prefill_max_retries, o.prefill_retry_backoff, o.enable_prefiller_sampling) == (0, 0.2, False)
    assert o.engine_url == "http://localhost:8200"


def test_flag_forms():
    o = parse_options(["--port=9000", "--vllm-port", "9200", "--secure-proxy=false", "--enable-ssrf-protection",
                       "--inference-pool", "ns/pool", "--prefill-max-retries", "3", "--prefill-retry-backoff",
                       "1s", "--enable-tls", "prefiller", "--tls-insecure-skip-verify=prefiller,decoder"], env={})
    assert (o.port, o.model_server_port, o.secure_proxy, o.enable_ssrf_protection) == (9000, 9200, False, True)
    assert o.pool_namespace_name == ("ns", "pool") and o.prefill_max_retries == 3 and o.prefill_retry_backoff == 1.0
    assert o.prefill_scheme == "https" and o.tls_insecure_skip_verify == ("prefiller", "decoder")
    assert "--vllm-port is deprecated" in o.warnings[0]
    # --model-server-port wins over the deprecated alias
    assert parse_options(["--vllm-port", "1", "--model-server-port", "2"], env={}).model_server_port == 2
    assert parse_options([], env={"ENABLE_PREFILLER_SAMPLING": "true"}).enable_prefiller_sampling
    assert parse_options([], env={"INFERENCE_POOL": "p"}).inference_pool == "p"


def test_configuration_yaml(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("port: 8100\nprefill-max-retries: 2\nsecure-proxy: false\n")
    o = parse_options(["--configuration-file", str(path), "--port", "8101"], env={})
    assert (o.port, o.prefill_max_retries, o.secure_proxy) == (8101, 2, False)
    with pytest.raises(OptionError, match="unknown key 'nope'"):
        parse_options(["--configuration", "nope: 1"], env={})


@pytest.mark.parametrize(("argv", "message"), [
    (["--kv-connector", "sglang"], "not supported by this sidecar"),
    (["--kv-connector", "nixl"], "unknown 'nixl'"),
    (["--ec-connector", "ec-nixl"], "encode disaggregation is not supported"),
    (["--decode-chunk-size", "256"], "chunked decode is not supported"),
    (["--enable-ssrf-protection"], "needs the InferencePool"),
    (["--enable-tls", "proxy"], "unknown stage 'proxy'"),
    (["--pool-group", "x.io"], "unsupported 'x.io'"),
    (["--port", "0x"], "expected a port number"),
    (["--prefill-retry-backoff", "soon"], "expected a duration"),
])
def test_bad_flags(argv: list[str], message: str):
    with pytest.raises(OptionError, match=re.escape(message)):
        parse_options(argv, env={})


def test_prefill_body_limits_and_streaming():
    body = {"prompt": "p", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 50,
            "min_tokens": 4}
    p = prefill_body(body, "chat")
    assert p["stream"] is False and "stream_options" not in p
    assert (p["max_tokens"], p["max_completion_tokens"], p["min_tokens"]) == (1, 1, 1)
    assert p["kv_transfer_params"] == {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                       "remote_block_ids": None, "remote_host": None, "remote_port": None}
    assert body["stream"] is True and body["max_tokens"] == 50  # the original is untouched
    assert prefill_body({"input": "x"}, "responses")["max_output_tokens"] == 1
    assert prefill_body({"sampling_params": {"temperature": 0}}, "generate")["sampling_params"] == \
        {"temperature": 0, "max_tokens": 1, "min_tokens": 1}


def test_usage_rewrite_json_and_sse_split_anywhere():
    doc = {"choices": [], "usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 0}}}
    assert json.loads(rewrite_json(json.dumps(doc).encode(), 7))["usage"]["prompt_tokens_details"] == \
        {"cached_tokens": 7}
    no_details = {"usage": {"prompt_tokens": 1}}
    assert json.loads(rewrite_json(json.dumps(no_details).encode(), 3))["usage"]["prompt_tokens_details"] == \
        {"cached_tokens": 3}
    assert rewrite_json(b"not json", 3) == b"not json"
    stream = (b'data: {"choices":[{"text":"a"}]}\n\n' + b"data: " + json.dumps(doc).encode() + b"\n\ndata: [DONE]\n\n")
    for cut in range(1, len(stream)):
        rw = SSERewriter(5)
        out = rw.feed(stream[:cut]) + rw.feed(stream[cut:]) + rw.flush()
        lines = [ln for ln in out.decode().split("\n") if ln]
        assert lines[0] == 'data: {"choices":[{"text":"a"}]}' and lines[-1] == "data: [DONE]"
        assert json.loads(lines[1][6:])["usage"]["prompt_tokens_details"]["cached_tokens"] == 5


def test_sse_long_lines_pass_unbuffered():
    rw = SSERewriter(1)
    big = b"data: " + b"x" * (2 << 20)
    out = rw.feed(big)
    assert out == big and rw.flush() == b""  # passed on, not held


async def test_the_process_serves_tls_by_default_and_proxies(tmp_path: Path):
    engine = await SimServer(SimServerConfig(time_scale=0.01)).start()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "epp", "sidecar", "--port", "0", "--host", "127.0.0.1",
                             "--model-server-port", str(engine.port), "--engine-host", "127.0.0.1"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert proc.stderr is not None
        port = 0
        deadline = time.monotonic() + 30
        while not port and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(r"listening on port (\d+)", line)
            port = int(m.group(1)) if m else 0
        assert port, "sidecar did not start"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        async with aiohttp.ClientSession() as http:
            async with http.post(f"https://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                                 ssl=ctx) as r:
                assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            await engine.stop()


def test_bad_flags_exit_2():
    r = subprocess.run([sys.executable, "-m", "epp", "sidecar", "--kv-connector", "mooncake"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "not supported by this sidecar" in r.stderr

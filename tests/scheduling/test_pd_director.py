"""P/D through the picker's ext_proc server (real grpc.aio client over loopback): llm-d's
pd-epp-config and pods labelled `llm-d.ai/role` from manifests; the decision carries the decode pod
as destination (header and `envoy.lb`) and the prefill pod as `x-prefiller-host-port` in the same
header mutation; a client-sent one never reaches the sidecar."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from tests.extproc_client import body_chunks, chat, destination_metadata, exchange, request_headers, set_headers

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PD_CONFIG = (CONFIGS / "llmd-pd-epp-config.yaml").read_text()
LONG = "".join(f"paragraph {i}: a long document the model must read before answering. " for i in range(50))
PREFILL = "x-prefiller-host-port"

MANIFESTS = """\
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: pool}
spec: {selector: {matchLabels: {app: vllm}}, targetPorts: [{number: 8000}]}
""" + "".join(f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: vllm, llm-d.ai/role: {role}}}}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: "True"}}]}}
""" for name, role, ip in (("prefill-0", "prefill", "127.0.0.11"), ("decode-0", "decode", "127.0.0.21"),
                           ("decode-1", "decode", "127.0.0.22")))
PREFILL_PODS = {"127.0.0.11:8000"}
DECODE_PODS = {"127.0.0.21:8000", "127.0.0.22:8000"}


def routed(replies: list[ep.ProcessingResponse]) -> ep.ProcessingResponse:
    (h,) = [r for r in replies if r.WhichOneof("response") == "request_headers"]
    return h


async def start(start_picker, tmp_path: Path):
    (tmp_path / "objs.yaml").write_text(MANIFESTS)
    app, ch = await start_picker(manifests=[str(tmp_path / "objs.yaml")], config_text=PD_CONFIG, endpoints=[])
    for _ in range(200):
        if len(app.datastore.endpoints) == 3:
            break
        await asyncio.sleep(0.02)
    assert {e.role for e in app.datastore.endpoints.values()} == {"prefill", "decode"}
    return app, ch


async def test_long_prompt_names_a_prefill_pod_short_does_not(start_picker, tmp_path):
    app, ch = await start(start_picker, tmp_path)
    h = routed(await exchange(ch, [request_headers(), *body_chunks(chat("m", LONG))]))
    headers = set_headers(h)
    dest = headers["x-gateway-destination-endpoint"]
    assert dest in DECODE_PODS and destination_metadata(h) == dest
    assert headers[PREFILL] in PREFILL_PODS
    keys = [m.header.key for m in h.request_headers.response.header_mutation.set_headers]
    assert keys.index("x-gateway-destination-endpoint") < keys.index(PREFILL)  # one mutation, both

    h = routed(await exchange(ch, [request_headers(), *body_chunks(chat("m", "hi"))]))
    assert PREFILL not in set_headers(h) and set_headers(h)["x-gateway-destination-endpoint"] in DECODE_PODS


async def test_a_client_sent_prefill_header_is_removed_or_replaced(start_picker, tmp_path):
    app, ch = await start(start_picker, tmp_path)
    evil = {PREFILL: "169.254.169.254:80"}
    h = routed(await exchange(ch, [request_headers(extra=evil), *body_chunks(chat("m", "hi"))]))
    mutation = h.request_headers.response.header_mutation
    assert PREFILL not in set_headers(h) and list(mutation.remove_headers) == [PREFILL]

    h = routed(await exchange(ch, [request_headers(extra=evil), *body_chunks(chat("m", LONG + "!"))]))
    mutation = h.request_headers.response.header_mutation
    (opt,) = [m for m in mutation.set_headers if m.header.key == PREFILL]
    assert opt.header.raw_value.decode() in PREFILL_PODS
    assert opt.append_action == opt.OVERWRITE_IF_EXISTS_OR_ADD and PREFILL not in mutation.remove_headers


async def test_completions_and_the_cached_repeat(start_picker, tmp_path):
    app, ch = await start(start_picker, tmp_path)
    aligned = LONG[: 64 * 50]  # 50 whole blocks of 16 tokens (64 bytes): a repeat leaves nothing uncached
    body = json.dumps({"model": "m", "prompt": aligned, "max_tokens": 4}).encode()
    first = set_headers(routed(await exchange(ch, [request_headers("/v1/completions"), *body_chunks(body)])))
    assert PREFILL in first
    again = json.dumps({"model": "m", "prompt": aligned + " and?", "max_tokens": 4}).encode()
    second = set_headers(routed(await exchange(ch, [request_headers("/v1/completions"), *body_chunks(again)])))
    # the picker knows the decode pod holds the prompt now: decode alone, on the same pod
    assert PREFILL not in second
    assert second["x-gateway-destination-endpoint"] == first["x-gateway-destination-endpoint"]


async def test_decisions_are_counted_under_llmds_metric_names(start_picker, tmp_path):
    app, ch = await start(start_picker, tmp_path)
    for text in (LONG, "hi", "hello"):
        await exchange(ch, [request_headers(), *body_chunks(chat("m", text))])
    reg = app.telemetry.registry
    labels = {"plugin_name": "disagg-profile-handler", "plugin_type": "disagg-profile-handler", "model_name": "m"}
    assert reg.get_sample_value("llm_d_epp_disagg_decision_total", {**labels, "decision_type": "prefill-decode"}) == 1
    assert reg.get_sample_value("llm_d_epp_disagg_decision_total", {**labels, "decision_type": "decode-only"}) == 2
    assert reg.get_sample_value("llm_d_inference_scheduler_disagg_decision_total",
                                {"model_name": "m", "decision_type": "decode-only"}) == 2

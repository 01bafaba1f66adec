"""P/D disaggregation in the scheduler: roles, disagg-profile-handler, the deciders, data parallel.

The configs are llm-d's shapes (tests/configs/llmd-pd-epp-config.yaml is its pd-epp-config.yaml
unchanged); pods carry the `llm-d.ai/role` label as Endpoint.role."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from epp.datastore import Endpoint
from epp.scheduling.config import ConfigError, build_scheduler, load_config
from epp.scheduling.dataparallel import DP_HEADER, DataParallelScheduler
from epp.scheduling.disagg import ENCODE_HEADER, PREFILL_HEADER, DisaggScheduler
from epp.scheduling.framework import SchedulingRequest
from tests.scheduling.util import ep, req

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PD_CONFIG = (CONFIGS / "llmd-pd-epp-config.yaml").read_text()
LONG = "".join(f"line {i}: the quick brown fox jumps over the lazy dog. " for i in range(40))  # ~550 tokens
SHORT = "hi"  # 1 token


def pool(*roles: str) -> list[Endpoint]:
    out = []
    for i, role in enumerate(roles, start=1):
        e = ep(i, labels={"llm-d.ai/role": role} if role else {})
        e.role = role
        out.append(e)
    return out


def pd_scheduler(text: str = PD_CONFIG) -> DisaggScheduler:
    sched = build_scheduler(load_config(text), rng=random.Random(0))
    assert isinstance(sched, DisaggScheduler)
    return sched


def route(sched: DisaggScheduler, request: SchedulingRequest, eps: list[Endpoint]) -> tuple[Endpoint, dict[str, str]]:
    res = sched.schedule(request, eps)
    assert res.endpoints, res.reason
    sched.on_routed(request, res.endpoints[0])
    return res.endpoints[0], dict(res.headers)


def test_llmd_pd_config_is_accepted_unchanged():
    cfg = load_config(PD_CONFIG)
    assert cfg.handler == "disagg-profile-handler"
    assert [p.name for p in cfg.profiles] == ["prefill", "decode"]
    assert cfg.profile.name == "decode"  # the profile whose pick is the destination
    assert cfg.plugin("prefix-based-pd-decider").params.non_cached_tokens == 16


def test_long_prompt_gets_a_prefill_pod_and_a_decode_pod():
    sched = pd_scheduler()
    eps = pool("prefill", "decode", "prefill", "decode")
    dest, headers = route(sched, req(LONG), eps)
    assert dest.role == "decode"
    prefill = headers[PREFILL_HEADER]
    assert prefill in {e.address for e in eps if e.role == "prefill"}
    assert sched.decisions["prefill-decode"] == 1


def test_short_prompt_is_decoded_alone():
    sched = pd_scheduler()
    eps = pool("prefill", "decode")
    dest, headers = route(sched, req(SHORT), eps)
    assert dest.role == "decode" and PREFILL_HEADER not in headers
    assert sched.decisions["decode-only"] == 1


def test_prompt_cached_on_the_decode_pod_is_decoded_alone():
    sched = pd_scheduler()
    eps = pool("prefill", "decode", "decode")
    first, h1 = route(sched, req(LONG, rid="a"), eps)
    assert PREFILL_HEADER in h1
    # the same prompt plus a short question: the decode pod holds the prefix, < 16 tokens are new
    again, h2 = route(sched, req(LONG + "and?", rid="b"), eps)
    assert again is first and PREFILL_HEADER not in h2
    # a different long prompt is disaggregated again
    _, h3 = route(sched, req("other " * 400, rid="c"), eps)
    assert PREFILL_HEADER in h3


def test_the_prefill_pod_learns_the_prompt_too():
    sched = pd_scheduler()
    eps = pool("prefill", "decode")
    route(sched, req(LONG, rid="a"), eps)
    # the prefill profile's prefix scorer now sees the prompt on the prefill pod
    scorer = sched.prefill.scorers[0].scorer
    assert scorer.ratios(req(LONG), [eps[0]])[0] > 0.9


def test_unlabelled_pods_decode_and_never_prefill():
    sched = pd_scheduler()
    eps = pool("", "")
    dest, headers = route(sched, req(LONG), eps)
    assert dest in eps and PREFILL_HEADER not in headers  # no prefill pod: decode alone, no error


def test_no_decode_pod_is_an_error():
    sched = pd_scheduler()
    res = sched.schedule(req(LONG), pool("prefill", "prefill"))
    assert not res.endpoints and "decode" in res.reason
    assert sched.decisions["failed"] == 1


def test_both_role_pods_serve_either_stage():
    sched = pd_scheduler()
    eps = pool("both", "prefill-decode")
    dest, headers = route(sched, req(LONG), eps)
    assert dest in eps and headers[PREFILL_HEADER] in {e.address for e in eps}


ALWAYS = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-filter
- type: decode-filter
- type: queue-scorer
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters: {deciders: {prefill: always-disagg-pd-decider}}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}]
"""


def test_always_decider_disaggregates_even_short_prompts_and_header_only_requests():
    sched = pd_scheduler(ALWAYS)
    eps = pool("prefill", "decode")
    _, headers = route(sched, req(SHORT), eps)
    assert headers == {PREFILL_HEADER: "10.0.0.1:8000"}
    _, headers = route(sched, req(""), eps)
    assert headers == {PREFILL_HEADER: "10.0.0.1:8000"}


def test_without_a_decider_prefill_never_runs():
    sched = pd_scheduler(ALWAYS.replace("  parameters: {deciders: {prefill: always-disagg-pd-decider}}\n", ""))
    _, headers = route(sched, req(LONG), pool("prefill", "decode"))
    assert headers == {}


@pytest.mark.parametrize(("params", "prompt", "expected"), [
    ("{nonCachedTokens: 0}", LONG, False),  # 0 switches the decider off
    ("{nonCachedTokens: 100}", LONG, True),
    ("{nonCachedTokens: 1000}", LONG, False),  # ~550 tokens < 1000
    ("{nonCachedTokens: 16, promptTokens: 1000}", LONG, False),  # the prompt gate
    ("{nonCachedTokens: 16, promptTokens: 500}", LONG, True),
    ("{nonCachedTokens: 16}", "x" * 60, False),  # 15 tokens
    ("{nonCachedTokens: 16}", "x" * 64, True),  # 16 tokens
])
def test_prefix_decider_thresholds(params: str, prompt: str, expected: bool):
    text = PD_CONFIG.replace("  parameters:\n    nonCachedTokens: 16\n", f"  parameters: {params}\n")
    assert params in text
    sched = pd_scheduler(text)
    _, headers = route(sched, req(prompt), pool("prefill", "decode"))
    assert (PREFILL_HEADER in headers) is expected


def test_decider_without_prefix_matching_says_no():
    text = ALWAYS.replace("- type: always-disagg-pd-decider\n", "- type: prefix-based-pd-decider\n"
                          "  parameters: {nonCachedTokens: 1}\n").replace(
        "prefill: always-disagg-pd-decider", "prefill: prefix-based-pd-decider")
    sched = pd_scheduler(text)
    _, headers = route(sched, req(LONG), pool("prefill", "decode"))
    assert headers == {}  # as the reference without prefix match info


def test_prefill_first_runs_prefill_whenever_its_profile_exists():
    text = ALWAYS.replace("  parameters: {deciders: {prefill: always-disagg-pd-decider}}",
                          "  parameters: {stageOrder: prefill-first}")
    sched = pd_scheduler(text)
    dest, headers = route(sched, req(SHORT), pool("prefill", "decode"))
    assert dest.role == "decode" and headers == {PREFILL_HEADER: "10.0.0.1:8000"}


def test_legacy_flat_parameters_and_the_old_handler_name():
    text = ALWAYS.replace("- type: disagg-profile-handler\n  parameters: {deciders: {prefill: "
                          "always-disagg-pd-decider}}",
                          "- type: pd-profile-handler\n  parameters: {deciderPluginName: always-disagg-pd-decider, "
                          "decodeProfile: decode, primaryPort: 8000}")
    sched = pd_scheduler(text)
    _, headers = route(sched, req(SHORT), pool("prefill", "decode"))
    assert PREFILL_HEADER in headers


@pytest.mark.parametrize(("params", "message"), [
    ("{stageOrder: sideways}", "invalid stage order 'sideways'"),
    ("{stageOrder: prefill-first, deciders: {prefill: always-disagg-pd-decider}}",
     "a prefill decider is not supported in prefill-first"),
    ("{decodeProfile: decode, deciders: {prefill: always-disagg-pd-decider}}", "not both"),
    ("{deciders: {prefill: nowhere}}", "deciders.prefill: no plugin named \"nowhere\""),
    ("{deciders: {prefill: queue-scorer}}", "\"queue-scorer\" is a queue-scorer; expected"),
    ("{profiles: {decode: main}, deciders: {prefill: always-disagg-pd-decider}}",
     "needs a decode profile named \"main\""),
    ("{profiles: {decoder: x}}", "profiles.decoder: unknown field"),
])
def test_bad_handler_parameters_are_refused(params: str, message: str):
    text = ALWAYS.replace("{deciders: {prefill: always-disagg-pd-decider}}", params)
    with pytest.raises(ConfigError) as e:
        load_config(text)
    assert message in str(e.value), str(e.value)


E_P_D = (CONFIGS / "llmd-sim-e-p-d.yaml").read_text()


def test_encode_stage_for_multimodal_requests():
    sched = pd_scheduler(E_P_D)
    eps = pool("encode", "prefill", "decode")
    image = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                                       {"type": "image_url", "image_url": {"url": "x"}}]}]}
    r = SchedulingRequest("r", "m", prompt="what is it?", body=image)
    dest, headers = route(sched, r, eps)
    assert dest.role == "decode" and headers[ENCODE_HEADER] == "10.0.0.1:8000"
    text_only = SchedulingRequest("t", "m", prompt="what is it?", body={"messages": [{"role": "user",
                                                                                      "content": "hello"}]})
    _, headers = route(sched, text_only, eps)
    assert ENCODE_HEADER not in headers


def test_finish_reaches_both_profiles_once():
    sched = pd_scheduler(ALWAYS)
    eps = pool("prefill", "decode")
    r = req(SHORT)
    dest, _ = route(sched, r, eps)
    sched.on_finished(r, dest)
    sched.on_finished(r, dest)  # a second finish for the same request does not reach prefill again
    assert "disagg:stages" not in r.scratch


DP = (CONFIGS / "llmd-dp-epp-config.yaml").read_text()


def test_data_parallel_sends_to_the_primary_port_and_names_the_rank():
    sched = build_scheduler(load_config(DP.replace("primaryPort: 8000", "primaryPort: 9000")),
                            rng=random.Random(0))
    assert isinstance(sched, DataParallelScheduler)
    ranks = [Endpoint(address=f"10.0.0.7:{p}", ip="10.0.0.7", port=p, pod="default/dp") for p in (8000, 8001)]
    res = sched.schedule(req(SHORT), ranks)
    assert res.endpoints[0] in ranks
    assert res.headers == [(DP_HEADER, res.endpoints[0].address)]
    assert res.destination == "10.0.0.7:9000"


def test_data_parallel_needs_one_profile():
    text = DP + """- name: other
  plugins:
  - pluginRef: decode-filter
"""
    with pytest.raises(ConfigError) as e:
        load_config(text)
    assert "exactly one scheduling profile" in str(e.value)


def test_the_deploy_files_shape_without_block_settings():
    # llm-d's deploy/config/pd-epp-config.yaml gives the producer only its two caps (autoTune on)
    text = PD_CONFIG.replace("    blockSizeTokens: 16\n    autoTune: false\n", "")
    assert "autoTune" not in text
    sched = pd_scheduler(text)
    eps = pool("prefill", "decode")
    _, headers = route(sched, req(LONG), eps)
    assert PREFILL_HEADER in headers
    _, headers = route(sched, req(SHORT), eps)
    assert PREFILL_HEADER not in headers


def test_the_server_sees_the_decode_profiles_scorers():
    from epp.server import session_header

    text = PD_CONFIG.replace("- type: max-score-picker\n",
                             "- type: max-score-picker\n- type: session-affinity-scorer\n")
    text = text.replace("  - pluginRef: decode-filter\n",
                        "  - pluginRef: decode-filter\n  - pluginRef: session-affinity-scorer\n")
    sched = pd_scheduler(text)
    assert sched.scorers is sched.decode.scorers
    assert session_header(sched) == "x-session-token"

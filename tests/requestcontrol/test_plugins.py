"""Request-control plugins: the CEL-subset expressions, request-attribute-reporter, the served verifier."""

from __future__ import annotations

import pytest

from epp.director import RequestContext
from epp.requestcontrol.attribute_reporter import RequestAttributeReporter, usage_of
from epp.requestcontrol.base import ResponseInfo, build_request_control
from epp.requestcontrol.expr import ExprError, compile_expr
from epp.requestcontrol.served_verifier import DestinationEndpointServedVerifier
from epp.scheduling.framework import SchedulingRequest
from epp.scheduling.registry import REQUEST_CONTROL, ConfigError, Params, plugin_type

USAGE = {"usage": {"prompt_tokens": 32.0, "completion_tokens": 10.0, "total_tokens": 42.0}}


@pytest.mark.parametrize(("text", "value"), [
    ("usage.prompt_tokens + usage.completion_tokens", 42.0),
    ("(has(usage.prompt_tokens) ? usage.prompt_tokens : 0) + (has(usage.nope) ? usage.nope : 0)", 32.0),
    ("usage.completion_tokens > 0 && !(usage.prompt_tokens < 1)", True),
    ("usage.total_tokens * 2 - 4 / 2 % 3", 82.0),
    ("has(usage.prompt_token_details.cached_tokens)", False),
    ("-usage.completion_tokens", -10.0),
    ("true || usage.nope", True),  # short-circuit, as CEL's
])
def test_expressions(text, value):
    assert compile_expr(text)(USAGE) == value


@pytest.mark.parametrize("text", [
    "usage.prompt_tokens + -", "usage.prompt_tokens > ", "", "foo.bar", "has(usage)", "1 +* 2", "usage.$",
    "(" * 100 + "1" + ")" * 100, "!" * 100 + "true", "x" * 3000,
])
def test_bad_expressions_fail_to_compile(text):
    with pytest.raises(ExprError):
        compile_expr(text)


@pytest.mark.parametrize("text", ["usage.non_existent_field", "usage.prompt_tokens / 0", "usage.prompt_tokens && true"])
def test_runtime_errors(text):
    with pytest.raises(ExprError):
        compile_expr(text)(USAGE)


def _ctx(prompt: int = 0, completion: int = 0, cached: int = 0) -> RequestContext:
    ctx = RequestContext(request_id="r", sched=SchedulingRequest(request_id="r", model="m"), endpoints=[],
                         client_model="m", target_model="m", stream=False, api="chat", request_size=0, started=0.0)
    ctx.usage_prompt, ctx.usage_completion, ctx.usage_cached = prompt, completion, cached
    return ctx


def _reporter(expression: str, condition: str | None = None, **key: str) -> RequestAttributeReporter:
    attr = {"key": {"name": "x-gateway-inference-request-cost", **key}, "expression": expression}
    if condition is not None:
        attr["condition"] = condition
    cls = plugin_type("request-attribute-reporter").cls
    return cls("r", cls.parse(Params({"attributes": [attr]}, "parameters")), None)


def test_reporter_values_as_the_reference_computes_them():
    r = _reporter("usage.prompt_tokens")
    assert r.response_complete(_ctx(7, 3)) == {"envoy.lb": {"x-gateway-inference-request-cost": 7.0}}
    assert _reporter("usage.prompt_tokens", namespace="custom-ns").response_complete(_ctx(7)) == {
        "custom-ns": {"x-gateway-inference-request-cost": 7.0}}
    # zero values, unmet or non-boolean conditions, non-numbers and runtime errors report nothing
    assert _reporter("usage.prompt_tokens", "has(usage.prompt_tokens)").response_complete(_ctx(0)) is None
    assert _reporter("usage.prompt_tokens", "usage.completion_tokens > 0").response_complete(_ctx(5, 0)) is None
    assert _reporter("usage.prompt_tokens", "usage.completion_tokens > 0").response_complete(_ctx(5, 1)) is not None
    assert _reporter("usage.prompt_tokens", "usage.prompt_tokens").response_complete(_ctx(5)) is None
    assert _reporter("usage.prompt_tokens > 1").response_complete(_ctx(5)) is None
    assert _reporter("usage.non_existent_field").response_complete(_ctx(5)) is None
    # truncated to an integer
    assert _reporter("usage.prompt_tokens / 2").response_complete(_ctx(5)) == {
        "envoy.lb": {"x-gateway-inference-request-cost": 2.0}}
    assert usage_of(_ctx(1, 2, 3)) == {"prompt_tokens": 1.0, "completion_tokens": 2.0, "total_tokens": 3.0,
                                       "prompt_token_details": {"cached_tokens": 3.0}}


@pytest.mark.parametrize(("attributes", "field"), [
    ([], "parameters.attributes"),
    ([{"key": {"name": "a"}, "expression": "1"}, {"key": {"name": "b"}, "expression": "1"}], "parameters.attributes"),
    ([{"key": {}, "expression": "usage.prompt_tokens"}], "parameters.attributes[0].key.name"),
    ([{"key": {"name": "a"}}], "parameters.attributes[0].expression"),
    ([{"key": {"name": "a"}, "expression": "usage.prompt_tokens + -"}], "parameters.attributes[0].expression"),
    ([{"key": {"name": "a"}, "expression": "1", "condition": "usage.prompt_tokens > "}],
     "parameters.attributes[0].condition"),
    ([{"key": {"name": "a", "ns": "x"}, "expression": "1"}], "parameters.attributes[0].key.ns"),
])
def test_reporter_bad_parameters(attributes, field):
    cls = plugin_type("request-attribute-reporter").cls
    with pytest.raises(ConfigError) as e:
        cls.parse(Params({"attributes": attributes}, "parameters"))
    assert e.value.field == field


def test_served_verifier_texts():
    v = DestinationEndpointServedVerifier()
    assert v.response_header(_ctx(), ResponseInfo("10.0.0.1:8000", True)) == [
        ("x-conformance-test-served-endpoint", "10.0.0.1:8000")]
    assert v.response_header(_ctx(), ResponseInfo(None, True)) == [
        ("x-conformance-test-served-endpoint", "fail: missing destination endpoint served metadata")]
    assert v.response_header(_ctx(), ResponseInfo(None, False)) == [
        ("x-conformance-test-served-endpoint", "fail: missing envoy lb metadata")]


def test_build_request_control_takes_only_request_control_specs():
    class Spec:
        def __init__(self, name, type_, kind, params=None):
            self.name, self.type, self.kind, self.params = name, type_, kind, params

    reporter_params = plugin_type("request-attribute-reporter").cls.parse(
        Params({"attributes": [{"key": {"name": "c"}, "expression": "usage.total_tokens"}]}, ""))
    rc = build_request_control([Spec("q", "queue-scorer", "scorer"),
                                Spec("v", "destination-endpoint-served-verifier", REQUEST_CONTROL),
                                Spec("r", "request-attribute-reporter", REQUEST_CONTROL, reporter_params)])
    assert [p.name for p in rc.response_header] == ["v"]
    assert [p.name for p in rc.response_complete] == ["r"]
    assert build_request_control([]).empty

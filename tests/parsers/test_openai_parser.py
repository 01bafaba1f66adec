"""openai-parser and passthrough-parser behind the RequestParser contract, and parser selection."""

from __future__ import annotations

import json

import pytest

from epp.parsers import DEFAULT_PARSER, ParseError, build_parser
from epp.parsers.openai_parser import OpenAIParser
from epp.parsers.passthrough import PassthroughParser
from epp.scheduling.registry import PARSER, ConfigError, Params, plugin_type


def test_registered_as_parsers_with_strict_empty_parameters():
    for name, cls in (("openai-parser", OpenAIParser), ("passthrough-parser", PassthroughParser)):
        pt = plugin_type(name)
        assert pt is not None and pt.kind == PARSER and pt.cls is cls
        assert cls.parse(Params({}, "parameters")) is None  # the class-level parse reads Params
        with pytest.raises(ConfigError, match="parameters.x: unknown field"):
            cls.parse(Params({"x": 1}, "parameters"))


def test_openai_parser_reads_model_stream_prompt_and_rewrites():
    p = OpenAIParser("p", None, None)
    body = json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    r = p.parse({}, body, "/v1/chat/completions")
    assert (r.api, r.model, r.stream, r.grpc) == ("chat", "a", True, False)
    assert r.prompt == '[{"role":"user","content":"hi"}]'
    assert r.rewrite is not None and json.loads(r.rewrite("b"))["model"] == "b"
    assert r.body is not None and r.body["stream"] is True


@pytest.mark.parametrize(("body", "reason"), [
    (b"", "empty request body"),
    (b"{", "not valid JSON"),
    (b'{"prompt":"x"}', "model not found in request body"),
    (b"\xff", "not valid UTF-8"),
    (b'{"model":"m","prompt":' + b"[" * 3000 + b"]" * 3000 + b"}", "nested too deeply"),
])
def test_openai_parser_errors_are_400_parse_errors(body, reason):
    with pytest.raises(ParseError) as e:
        OpenAIParser().parse({}, body, "/v1/completions")
    assert reason in e.value.message and e.value.status == 400 and e.value.grpc_status is None


def test_passthrough_never_reads_the_body():
    r = PassthroughParser().parse({"x": "y"}, b"\xff not json at all", "/anything")
    assert (r.api, r.model, r.prompt, r.rewrite, r.body) == ("passthrough", "", "", None, None)


def test_build_parser_defaults_and_selects_by_spec():
    assert isinstance(build_parser(None), OpenAIParser) and build_parser(None).name == DEFAULT_PARSER

    class Spec:
        name, type, kind, params = "pt", "passthrough-parser", PARSER, None

    p = build_parser(Spec())
    assert isinstance(p, PassthroughParser) and p.name == "pt"

    class NotAParser(Spec):
        type = "queue-scorer"

    with pytest.raises(ValueError, match="not a request parser"):
        build_parser(NotAParser())

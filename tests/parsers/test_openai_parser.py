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


class _Spec:
    def __init__(self, type_: str, name: str = "") -> None:
        self.type, self.name, self.kind, self.params = type_, name or type_, PARSER, None


def test_several_parsers_are_chosen_by_path_suffix_first_match_then_fallback():
    from epp.parsers import ParserRegistry

    reg = build_parser([_Spec("vllmgrpc-parser"), _Spec("openai-parser"), _Spec("passthrough-parser"),
                        _Spec("openai-parser", "never-reached")])
    assert isinstance(reg, ParserRegistry)
    assert [p.name for p in reg.parsers] == ["vllmgrpc-parser", "openai-parser", "passthrough-parser"]
    assert reg.resolve("/v1/chat/completions?x=1").name == "openai-parser"
    assert reg.resolve("/v1/completions/").name == "openai-parser"
    assert reg.resolve("/vllm.grpc.engine.VllmEngine/Generate").name == "vllmgrpc-parser"
    assert reg.resolve("/v1/models").name == "passthrough-parser"
    r = reg.parse({}, b"not json", "/healthz")
    assert r.api == "passthrough"
    r = reg.parse({}, b'{"model":"m","prompt":"x"}', "/v1/completions")
    assert (r.api, r.model) == ("completions", "m")


def test_several_parsers_without_a_fallback_reject_unclaimed_paths():
    reg = build_parser([_Spec("openai-parser"), _Spec("vllmgrpc-parser")])
    with pytest.raises(ParseError, match="no parser registered matching path suffix for: /v1/models") as e:
        reg.parse({}, b"{}", "/v1/models")
    assert e.value.status == 400
    # one parser serves every path, as the GIE reference uses its single parser
    single = build_parser([_Spec("openai-parser")])
    assert single.parse({}, b'{"model":"m","prompt":"x"}', "/v1/other").model == "m"

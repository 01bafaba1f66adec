"""OpenAI body parsing, usage extraction and the streaming model-name restorer."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epp import openai


@pytest.mark.parametrize(
    ("path", "api"),
    [("/v1/chat/completions", "chat"), ("/v1/completions", "completions"), ("/v1/responses", "responses"),
     ("/v1/embeddings", "embeddings"), ("/v1/chat/completions?x=1", "chat"),
     ("/openai/v1/completions/", "completions")],
)
def test_api_for_path(path, api):
    assert openai.api_for_path(path)[0] == api


def test_unknown_path_defaults_to_completions():
    assert openai.api_for_path("/v1/other") is None
    with pytest.raises(openai.BadRequest, match="prompt is required"):
        openai.parse_request(b'{"model":"m"}', "/v1/other")


def test_prompt_text_chat_is_messages_in_order():
    raw = b'{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":"U"}]}'
    p = openai.parse_request(raw, "/v1/chat/completions")
    assert openai.prompt_text(p) == '[{"role":"system","content":"S"},{"role":"user","content":"U"}]'
    p = openai.parse_request(b'{"model":"m","prompt":"abc","stream":true}', "/v1/completions")
    assert openai.prompt_text(p) == "abc" and p.stream


def test_rewrite_keeps_everything_else():
    p = openai.parse_request('{"model":"a","prompt":"ü","max_tokens":5}'.encode(), "/v1/completions")
    out = json.loads(openai.rewrite_model(p, "b"))
    assert out == {"model": "b", "prompt": "ü", "max_tokens": 5}


def test_usage_from_json_and_sse():
    u = openai.Usage()
    openai.usage_from_json(b'{"usage":{"prompt_tokens":3,"completion_tokens":4}}', u)
    assert (u.prompt_tokens, u.completion_tokens, u.found) == (3, 4, True)
    u = openai.Usage()
    openai.usage_from_json(b"not json but has \"usage\"", u)
    assert not u.found


sse_stream = (b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
              b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":21}}\n\n'
              b"data: [DONE]\n\n")


@given(st.lists(st.integers(min_value=0, max_value=len(sse_stream)), max_size=12))
def test_sse_usage_found_whatever_the_chunking(cuts):
    s = openai.SSEUsageScanner()
    prev = 0
    for c in sorted(cuts):
        s.feed(sse_stream[prev:c])
        prev = c
    s.feed(sse_stream[prev:])
    s.finish()
    assert (s.usage.prompt_tokens, s.usage.completion_tokens) == (9, 21)
    assert s.done


restore_body = (b'data: {"model":"target-model","x":1}\n\ndata: {"model": "target-model"}\n\n'
                b'{"model":"target-model-2"} "model":"target" "target-model"')


@given(st.lists(st.integers(min_value=0, max_value=len(restore_body)), max_size=15))
def test_restorer_is_chunking_independent(cuts):
    r = openai.ModelRestorer("target-model", "client")
    out, prev = [], 0
    for c in sorted(cuts):
        out.append(r.feed(restore_body[prev:c], False))
        prev = c
    out.append(r.feed(restore_body[prev:], True))
    expected = (b'data: {"model":"client","x":1}\n\ndata: {"model": "client"}\n\n'
                b'{"model":"target-model-2"} "model":"target" "target-model"')
    assert b"".join(out) == expected


def test_restorer_does_not_delay_complete_events():
    r = openai.ModelRestorer("t", "c")
    event = b'data: {"model":"t","choices":[{"finish_reason":null}]}\n\n'
    assert r.feed(event, False) == event.replace(b'"t"', b'"c"')


def test_prompt_text_is_a_prefix_of_the_full_encoding_when_cut():
    msgs = [{"role": "user", "content": f"message {i} " + "x" * 500} for i in range(400)]
    p = openai.parse_request(json.dumps({"model": "m", "messages": msgs}).encode(), "/v1/chat/completions")
    full = json.dumps(msgs, separators=(",", ":"), ensure_ascii=False)
    cut = openai.prompt_text(p, limit=10_000)
    assert 10_000 <= len(cut) < 11_000 and full.startswith(cut)
    assert openai.prompt_text(p, limit=10**9) == full
    p = openai.parse_request(json.dumps({"model": "m", "prompt": "y" * 100_000}).encode(), "/v1/completions")
    assert openai.prompt_text(p) == "y" * openai.PROMPT_LIMIT


def test_prompt_text_cuts_inside_one_huge_message():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": 'q "é"\n' * 30_000}]
    p = openai.parse_request(json.dumps({"model": "m", "messages": msgs}).encode(), "/v1/chat/completions")
    full = json.dumps(msgs, separators=(",", ":"), ensure_ascii=False)
    cut = openai.prompt_text(p, limit=5000)
    assert len(cut) == 5000 and full.startswith(cut)


def test_prompt_text_of_a_token_array_is_the_prefix_of_its_encoding():
    toks = list(range(1_000_000))
    p = openai.parse_request(json.dumps({"model": "m", "prompt": toks}).encode(), "/v1/completions")
    full_start = json.dumps(toks[:20_000], separators=(",", ":"))
    assert openai.prompt_text(p) == full_start[: openai.PROMPT_LIMIT]
    nested = [{"type": "text", "text": "é" * 10}, [1, 2.5, True, None], "x"]
    p = openai.parse_request(json.dumps({"model": "m", "input": nested}).encode(), "/v1/embeddings")
    full = json.dumps(nested, separators=(",", ":"), ensure_ascii=False)
    assert openai.prompt_text(p) == full
    assert all(openai.prompt_text(p, limit=n) == full[:n] for n in range(len(full) + 2))


def test_container_bound_counts_only_structure():
    # braces inside strings are text: a 200 KB code listing is a normal body
    code = "{[" * 100_000
    p = openai.parse_request(json.dumps({"model": "m", "prompt": code}).encode(), "/v1/completions")
    assert p.body["prompt"] == code
    bomb = b'{"model":"m","messages":[' + b",".join([b'{"role":"user","content":"a"}'] * 100_001) + b"]}"
    with pytest.raises(openai.BadRequest, match="more than 100000 JSON objects"):
        openai.parse_request(bomb, "/v1/chat/completions")
    arrays = json.dumps({"model": "m", "prompt": [[1]] * 100_001}).encode()
    with pytest.raises(openai.BadRequest, match="more than 100000 JSON arrays"):
        openai.parse_request(arrays, "/v1/completions")
    # brackets in strings, escaped quotes and backslashes around them, do not count
    text = ['[\"[', "\\[", "x"] * 40_000
    p = openai.parse_request(json.dumps({"model": "m", "prompt": text}).encode(), "/v1/completions")
    assert p.body["prompt"] == text
    exactly = json.dumps({"model": "m", "messages": [{"role": "user", "content": "{"}] * 99_999}).encode()
    assert len(openai.parse_request(exactly, "/v1/chat/completions").body["messages"]) == 99_999


def test_deep_nesting_is_a_bad_request():
    with pytest.raises(openai.BadRequest, match="nested too deeply"):
        openai.parse_request(b'{"model":"m","prompt":' + b"[" * 5000 + b"]" * 5000 + b"}", "/v1/completions")


def test_rewrite_of_a_lone_surrogate_escapes_it():
    p = openai.parse_request(b'{"model":"a","prompt":"x\\ud800y \xc3\xa9"}', "/v1/completions")
    out = openai.rewrite_model(p, "b")
    assert json.loads(out) == {"model": "b", "prompt": "x\ud800y é"}
    out.decode("utf-8")  # valid UTF-8 on the wire


def test_cached_tokens_read_from_usage():
    for key in ("prompt_tokens_details", "input_tokens_details", "prompt_token_details"):
        u = openai.Usage()
        openai.usage_from_json(json.dumps({"usage": {"prompt_tokens": 7, key: {"cached_tokens": 5}}}).encode(), u)
        assert (u.prompt_tokens, u.cached_tokens) == (7, 5)
    s = openai.SSEUsageScanner()
    s.feed(b'data: {"usage":{"prompt_tokens":7,"completion_tokens":10,"prompt_tokens_details":{"cached_tokens":5}}}\n')
    assert s.usage.cached_tokens == 5


def _count_lists(v) -> int:
    if isinstance(v, list):
        return 1 + sum(_count_lists(x) for x in v)
    if isinstance(v, dict):
        return sum(_count_lists(x) for x in v.values())
    return 0


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ax\n', max_size=6),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(alphabet='[]"\\k', max_size=3), kids, max_size=3),
    max_leaves=25,
)


@given(_json_values, st.booleans())
def test_array_scan_counts_exactly_the_arrays(value, ascii_only):
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert openai._arrays_outside_strings(raw) == _count_lists(value)


def test_fast_decoder_gives_what_json_gives():
    """msgspec decodes bodies; whatever it refuses json decodes, so accepted bodies, values and
    error messages are json's."""
    import json as _json

    from epp.openai import _decode, _loads

    cases = [b'{"model":"m","messages":[{"role":"user","content":"h\\u00e9 \\"q\\" \\n"}],"stream":true}',
             b'{"a":1,"a":2}', b'{"n":123456789012345678901234567890,"f":1.5e300,"z":-0.0}',
             b'{"x":NaN,"y":Infinity}', b'{"big":1e999}', b'{"s":"\\ud800"}', b'[' * 900 + b']' * 900]
    for raw in cases:
        got, want = _loads(raw), _json.loads(raw)
        assert repr(got) == repr(want), raw[:40]
        assert repr(_decode(raw)) == repr(want)
    for bad in (b'{"model": }', b'{"a":1', b"\xff\xfe{}"):
        with pytest.raises(ValueError) as fast:
            _loads(bad)
        with pytest.raises(ValueError) as slow:
            _json.loads(bad)
        assert type(fast.value) is type(slow.value) and str(fast.value) == str(slow.value)
    with pytest.raises(RecursionError):
        _loads(b"[" * 100000 + b"]" * 100000)


def test_fast_string_encoding_writes_what_json_writes() -> None:
    """Prompt text for prefix matching: strings are encoded by msgspec, byte for byte as json.dumps
    (compact, ensure_ascii=False) writes them; a lone surrogate falls back to json."""
    import json as _json

    from epp.openai import _dumps

    cases = ['a"b\\c', "line\nnext\ttab\r\b\f", "".join(chr(i) for i in range(32)), "\x7f\u2028\u2029",
             "é中文🙂", "\ud800 lone", "", "x" * 70000]
    for s in cases:
        assert _dumps(s) == _json.dumps(s, separators=(",", ":"), ensure_ascii=False)
    assert _dumps({"a": [1, 2.5, None, True]}) == '{"a":[1,2.5,null,true]}'


def test_bracket_counts_are_exact_few_or_many() -> None:
    from epp.openai import _FEW, _occurrences

    for body in (b"", b"no brackets", b"[" * 3 + b"x" * 70000 + b"[", b"[x]" * (_FEW + 1), b"[" * (5 * _FEW)):
        assert _occurrences(body, b"[") == body.count(b"[")


def test_the_one_call_encoding_of_small_chat_messages_equals_the_stepwise_one() -> None:
    """Small lists of string-valued messages are encoded in one msgspec call; the text must be the
    json.dumps one character for character (escapes, non-ASCII, key order), and anything else (a
    lone surrogate, non-string values, a list too long to be sure) takes the step-by-step path."""
    import json

    samples = [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        [{"role": "user", "content": 'quote " back \\ slash / nl \n tab \t cr \r bell \x07 del \x7f'}],
        [{"content": "é ü 中文 🙂 \u2028 \u2029", "role": "user", "name": "x"}],
        [{}],
        [{"role": "user", "content": "\ud800 lone"}],
        [{"role": "user", "content": [{"type": "text", "text": "parts"}]}],
        [{"role": "user", "content": "a" * 20_000}],
    ]
    for messages in samples:
        want = json.dumps(messages, separators=(",", ":"), ensure_ascii=False)
        got = openai._json_prefix(messages, openai.PROMPT_LIMIT)
        assert got == want[:openai.PROMPT_LIMIT]
    assert openai._whole_if_small(samples[0], openai.PROMPT_LIMIT) is not None
    assert openai._whole_if_small(samples[4], openai.PROMPT_LIMIT) is None  # msgspec refuses it
    assert openai._whole_if_small(samples[5], openai.PROMPT_LIMIT) is None  # not all strings
    assert openai._whole_if_small(samples[6], openai.PROMPT_LIMIT) is None  # could be cut
    assert openai._whole_if_small(samples[0], 20) is None

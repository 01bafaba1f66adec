"""vllmgrpc-parser: gRPC framing, GenerateRequest/EmbedRequest decoding, errors with gRPC status,
the response usage scanner, and garbage bytes (hypothesis: only ParseError ever escapes)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp._gen import vllm_engine_pb2 as pb
from epp.parsers import ParsedRequest, ParseError
from epp.parsers.vllmgrpc import (
    EMBED_PATH,
    GENERATE_PATH,
    INVALID_ARGUMENT,
    PROMPT_TOKENS,
    UNIMPLEMENTED,
    UsageScanner,
    VllmGrpcParser,
    frame,
    method_of,
    token_prompt,
    unframe,
)
from epp.scheduling.registry import PARSER, ConfigError, Params, plugin_type

GEN = "/" + GENERATE_PATH
EMB = "/" + EMBED_PATH


def parse(msg: object, path: str = GEN) -> ParsedRequest:
    body = frame(msg.SerializeToString())  # type: ignore[attr-defined]
    return VllmGrpcParser().parse({":path": path}, body, path)


def parse_error(body: bytes | None, path: str = GEN) -> ParseError:
    with pytest.raises(ParseError) as e:
        VllmGrpcParser().parse({":path": path}, body, path)
    return e.value


# ---- framing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x00\x00\x00"])
def test_unframe_short_header(data: bytes) -> None:
    with pytest.raises(ParseError) as e:
        unframe(data)
    assert e.value.grpc_status == INVALID_ARGUMENT
    assert e.value.message == (
        f"invalid or unsupported gRPC payload: expected at least 5 bytes for header, got {len(data)}")


def test_unframe_none_is_an_empty_body() -> None:
    with pytest.raises(ParseError, match="got 0"):
        unframe(None)


def test_unframe_compressed_is_unimplemented() -> None:
    with pytest.raises(ParseError) as e:
        unframe(b"\x01\x00\x00\x00\x00")
    assert e.value.grpc_status == UNIMPLEMENTED
    assert "compressed gRPC payload is not supported" in e.value.message


def test_unframe_bad_flag() -> None:
    with pytest.raises(ParseError, match="invalid compressed flag 7") as e:
        unframe(b"\x07\x00\x00\x00\x00")
    assert e.value.grpc_status == INVALID_ARGUMENT


def test_unframe_incomplete() -> None:
    with pytest.raises(ParseError, match="header indicates 10 bytes, but only 5 bytes are available"):
        unframe(b"\x00\x00\x00\x00\x0a12345")


def test_unframe_length_near_uint32_max() -> None:
    with pytest.raises(ParseError, match="header indicates 4294967295 bytes, but only 4 bytes"):
        unframe(b"\x00\xff\xff\xff\xff\xaa\xbb\xcc\xdd")


def test_unframe_exact_and_trailing_bytes_ignored() -> None:
    assert unframe(b"\x00\x00\x00\x00\x05hello") == b"hello"
    assert unframe(b"\x00\x00\x00\x00\x05helloEXTRA") == b"hello"
    assert unframe(b"\x00\x00\x00\x00\x00") == b""


@given(st.binary(max_size=300))
def test_frame_roundtrip(msg: bytes) -> None:
    framed = frame(msg)
    assert framed[0] == 0 and int.from_bytes(framed[1:5], "big") == len(msg)
    assert unframe(framed) == msg


# ---- the wire: our .proto must match vLLM's field numbers ---------------------------------------


def test_wire_bytes_match_vllm_field_numbers() -> None:
    # GenerateRequest: request_id=1, tokenized=2, text=3, sampling_params=4, stream=5, mm_inputs=7
    assert pb.GenerateRequest(request_id="r", text="hi", stream=True).SerializeToString() == (
        b"\x0a\x01r" b"\x1a\x02hi" b"\x28\x01")
    tok = pb.GenerateRequest(tokenized=pb.TokenizedInput(original_text="a", input_ids=[1, 300]))
    # TokenizedInput: original_text=1, input_ids=2 (packed varints)
    assert tok.SerializeToString() == b"\x12\x08" b"\x0a\x01a" b"\x12\x03\x01\xac\x02"
    # SamplingParams.max_tokens=8
    sp = pb.GenerateRequest(text="x", sampling_params=pb.SamplingParams(max_tokens=5))
    assert sp.SerializeToString() == b"\x1a\x01x" b"\x22\x02\x40\x05"
    assert pb.DESCRIPTOR.package == "vllm.grpc.engine"
    assert pb.DESCRIPTOR.services_by_name["VllmEngine"].methods_by_name["Generate"].full_name == (
        "vllm.grpc.engine.VllmEngine.Generate")


def test_fields_outside_our_proto_still_decode() -> None:
    # a client built on vLLM's full definition sends fields we leave out: SamplingParams.top_p (2,
    # float), .seed (24), .logit_bias (26, map<int32,float>), MultimodalInputs.pixel_values (2)
    sampling = b"\x15\x00\x00\x00\x3f" b"\xc0\x01\x07" b"\xd2\x01\x07\x08\x05\x15\x00\x00\x80\x3f" b"\x40\x10"
    mm = b"\x12\x02\x0a\x00" b"\x2a\x04\x08\x01\x10\x02" b"\x32\x01h"
    raw = b"\x1a\x05hello" b"\x22" + bytes([len(sampling)]) + sampling + b"\x3a" + bytes([len(mm)]) + mm
    got = VllmGrpcParser().parse({}, frame(raw), GEN)
    assert got.prompt == "hello"
    assert got.extra["max_tokens"] == 16
    assert got.extra["mm_features"] == [{"modality": "image", "hash": "h", "offset": 1, "length": 2}]


# ---- Generate ---------------------------------------------------------------------------------


def test_text_request() -> None:
    got = parse(pb.GenerateRequest(text="Hello world"))
    assert got.api == "grpc-generate"
    assert got.grpc is True
    assert got.model == ""
    assert got.prompt == "Hello world"
    assert got.token_ids is None
    assert got.stream is False
    assert got.rewrite is None  # vLLM's messages carry no model name
    assert "max_tokens" not in got.extra


def test_text_request_stream_and_request_id() -> None:
    got = parse(pb.GenerateRequest(request_id="abc", text="Hello world", stream=True))
    assert got.stream is True
    assert got.extra["grpc_request_id"] == "abc"


def test_long_text_is_cut_for_prefix_matching() -> None:
    from epp.openai import PROMPT_LIMIT

    got = parse(pb.GenerateRequest(text="x" * (PROMPT_LIMIT + 100)))
    assert got.prompt == "x" * PROMPT_LIMIT


def test_tokenized_request() -> None:
    got = parse(pb.GenerateRequest(tokenized=pb.TokenizedInput(original_text="Tokenized hello",
                                                                 input_ids=[11, 12, 13])))
    assert got.api == "grpc-generate"
    assert got.token_ids == (11, 12, 13)
    assert got.extra["prompt_tokens"] == 3
    assert got.prompt == token_prompt([11, 12, 13])
    assert len(got.prompt) == 12  # 4 characters a token


def test_huge_token_prompt_keeps_the_leading_ids_and_the_count() -> None:
    ids = list(range(PROMPT_TOKENS + 500))
    got = parse(pb.GenerateRequest(tokenized=pb.TokenizedInput(input_ids=ids)))
    assert got.token_ids == tuple(ids[:PROMPT_TOKENS])
    assert got.extra["prompt_tokens"] == PROMPT_TOKENS + 500
    assert got.prompt == token_prompt(ids[:PROMPT_TOKENS])
    emb = parse(pb.EmbedRequest(tokenized=pb.TokenizedInput(input_ids=ids)), EMB)
    assert emb.token_ids == tuple(ids[:PROMPT_TOKENS]) and emb.extra["prompt_tokens"] == PROMPT_TOKENS + 500


def test_tokenized_empty_ids_is_accepted() -> None:
    got = parse(pb.GenerateRequest(tokenized=pb.TokenizedInput()))
    assert got.token_ids == ()
    assert got.prompt == ""


def test_multimodal_features_pad_missing_hashes() -> None:
    got = parse(pb.GenerateRequest(
        tokenized=pb.TokenizedInput(input_ids=[201, 202, 203, 204]),
        mm_inputs=pb.MultimodalInputs(
            mm_placeholders=[pb.PlaceholderRange(offset=0, length=1), pb.PlaceholderRange(offset=2, length=2)],
            mm_hashes=["hash-only"],
        ),
    ))
    assert got.extra["mm_features"] == [
        {"modality": "image", "hash": "hash-only", "offset": 0, "length": 1},
        {"modality": "image", "hash": "", "offset": 2, "length": 2},
    ]


def test_multimodal_without_placeholders_adds_nothing() -> None:
    got = parse(pb.GenerateRequest(tokenized=pb.TokenizedInput(input_ids=[1]),
                                   mm_inputs=pb.MultimodalInputs(mm_hashes=["a"])))
    assert "mm_features" not in got.extra


@pytest.mark.parametrize(("sampling", "want"), [
    (pb.SamplingParams(max_tokens=256), 256),
    (pb.SamplingParams(max_tokens=0), 0),  # an explicit 0 binds
    (pb.SamplingParams(temperature=0.5), None),
    (None, None),
])
def test_max_tokens(sampling: pb.SamplingParams | None, want: int | None) -> None:
    req = pb.GenerateRequest(text="hello")
    if sampling is not None:
        req.sampling_params.CopyFrom(sampling)
    got = parse(req)
    assert got.extra.get("max_tokens") == want


def test_no_input_is_invalid_argument() -> None:
    e = parse_error(frame(pb.GenerateRequest(request_id="x").SerializeToString()))
    assert e.message == "not supported request inputType"
    assert e.grpc_status == INVALID_ARGUMENT
    assert e.status == 400


def test_malformed_protobuf() -> None:
    e = parse_error(frame(b"\x1a\x10short"))  # a length-delimited field longer than the message
    assert e.message.startswith("unmarshaling GenerateRequest:")
    assert e.grpc_status == INVALID_ARGUMENT


def test_invalid_utf8_text_is_rejected() -> None:
    e = parse_error(frame(b"\x1a\x02\xff\xfe"))
    assert e.message.startswith("unmarshaling GenerateRequest")


def test_framing_errors_through_the_parser() -> None:
    assert parse_error(b"\x00\x00\x00").grpc_status == INVALID_ARGUMENT
    assert parse_error(b"\x01\x00\x00\x00\x00").grpc_status == UNIMPLEMENTED
    assert parse_error(None).grpc_status == INVALID_ARGUMENT


# ---- Embed ------------------------------------------------------------------------------------


def test_embed_request() -> None:
    got = parse(pb.EmbedRequest(request_id="e1", tokenized=pb.TokenizedInput(original_text="Embed this",
                                                                              input_ids=[4, 5, 6])), EMB)
    assert got.api == "grpc-embed"
    assert got.token_ids == (4, 5, 6)
    assert got.prompt == token_prompt([4, 5, 6])
    assert got.stream is False
    assert got.grpc is True
    assert got.extra["grpc_request_id"] == "e1"


def test_embed_without_tokenized_input() -> None:
    e = parse_error(frame(pb.EmbedRequest(request_id="e").SerializeToString()), EMB)
    assert e.message == "missing tokenized input in EmbedRequest"
    assert e.grpc_status == INVALID_ARGUMENT


# ---- paths ------------------------------------------------------------------------------------


def test_path_matching() -> None:
    assert method_of(GEN) == "generate"
    assert method_of(EMB) == "embed"
    assert method_of("/prefix/vllm.grpc.engine.VllmEngine/Generate") == "generate"  # suffix, as the reference
    assert method_of("/vllm.grpc.engine.VllmEngine/HealthCheck") == ""
    assert method_of("/vllm.grpc.engine.VllmEngine/GenerateX") == ""
    assert method_of("/v1/completions") == ""


@pytest.mark.parametrize("body", [None, b"", b"\xff garbage", frame(pb.GenerateRequest(text="x").SerializeToString())])
def test_other_paths_pass_through_unparsed(body: bytes | None) -> None:
    got = VllmGrpcParser().parse({}, body, "/vllm.grpc.engine.VllmEngine/HealthCheck")
    assert got.api == "passthrough"
    assert got.grpc is True
    assert got.prompt == ""
    assert got.extra["skip_response_processing"] is True


def test_path_falls_back_to_the_path_header() -> None:
    got = VllmGrpcParser().parse({":path": GEN}, frame(pb.GenerateRequest(text="hi").SerializeToString()), "")
    assert got.api == "grpc-generate"


# ---- token ids as prompt text -----------------------------------------------------------------


def test_token_prompt_prefixes_follow_token_prefixes() -> None:
    a = token_prompt([1, 2, 3, 4, 5, 6])
    b = token_prompt([1, 2, 3, 4, 9, 9, 9])
    assert a[:16] == b[:16] and a[16:20] != b[16:20]
    assert token_prompt([]) == ""
    assert token_prompt([0]) == "AAAA"
    assert token_prompt([(1 << 24) - 1]) == "////"
    assert token_prompt([1 << 24 | 5]) == token_prompt([5])  # ids past 24 bits fold (affinity only)


@given(st.lists(st.integers(0, (1 << 24) - 1), max_size=50), st.lists(st.integers(0, (1 << 24) - 1), max_size=50))
def test_token_prompt_is_injective_below_2_24(a: list[int], b: list[int]) -> None:
    pa, pb_ = token_prompt(a), token_prompt(b)
    assert len(pa) == 4 * len(a)
    assert (pa == pb_) == (a == b)
    assert pa.isascii()


def test_token_prompt_is_capped() -> None:
    ids = list(range(PROMPT_TOKENS + 10))
    assert len(token_prompt(ids)) == 4 * PROMPT_TOKENS


# ---- the plugin ---------------------------------------------------------------------------------


def test_registered_as_a_parser() -> None:
    pt = plugin_type("vllmgrpc-parser")
    assert pt is not None and pt.kind == PARSER and pt.cls is VllmGrpcParser
    assert pt.cls.parse(Params({}, "plugins[0].parameters")) is None
    with pytest.raises(ConfigError, match="unknown field"):
        pt.cls.parse(Params({"maxMessageBytes": 1}, "plugins[0].parameters"))
    parser = pt.cls("grpc", None, None)
    assert parser.name == "grpc"
    assert parser.needs_body is True


# ---- response usage ---------------------------------------------------------------------------


def _resp(msg: object) -> bytes:
    return frame(msg.SerializeToString())  # type: ignore[attr-defined]


def test_usage_from_stream_split_anywhere() -> None:
    stream = (
        _resp(pb.GenerateResponse(chunk=pb.GenerateStreamChunk(token_ids=[4])))
        + _resp(pb.GenerateResponse(chunk=pb.GenerateStreamChunk(token_ids=[5], prompt_tokens=10,
                                                                 completion_tokens=2)))
        + _resp(pb.GenerateResponse(complete=pb.GenerateComplete(finish_reason="stop", prompt_tokens=10,
                                                                 completion_tokens=5, cached_tokens=3)))
    )
    for cut in range(len(stream) + 1):
        s = UsageScanner("generate")
        s.feed(stream[:cut])
        s.feed(stream[cut:])
        s.finish()
        assert s.messages == 3
        assert (s.usage.prompt_tokens, s.usage.completion_tokens, s.usage.found) == (10, 5, True)
        assert s.usage.cached_tokens == 3


def test_usage_chunks_without_counts_leave_usage_unset() -> None:
    s = UsageScanner("generate")
    s.feed(_resp(pb.GenerateResponse(chunk=pb.GenerateStreamChunk(token_ids=[1, 2]))))
    assert s.messages == 1 and not s.usage.found


def test_usage_from_embed_response() -> None:
    body = _resp(pb.EmbedResponse(embedding=[1.0, 2.0], prompt_tokens=7, embedding_dim=2))
    for method in ("embed", ""):
        s = UsageScanner(method)
        s.feed(body)
        assert (s.usage.prompt_tokens, s.usage.completion_tokens, s.usage.found) == (7, 0, True)


def test_usage_skips_oversized_and_compressed_messages_without_buffering() -> None:
    big = pb.GenerateResponse(complete=pb.GenerateComplete(output_ids=list(range(5000)), prompt_tokens=99,
                                                           completion_tokens=99))
    tail = _resp(pb.GenerateResponse(complete=pb.GenerateComplete(prompt_tokens=3, completion_tokens=4)))
    compressed = b"\x01" + (3).to_bytes(4, "big") + b"zzz"
    stream = _resp(big) + compressed + tail
    s = UsageScanner("generate", max_message=1000)
    for i in range(0, len(stream), 7):
        s.feed(stream[i:i + 7])
        assert len(s._buf) < 1000 + 5
    assert (s.usage.prompt_tokens, s.usage.completion_tokens) == (3, 4)


# ---- garbage in, ParseError out -----------------------------------------------------------------

_PATHS = st.sampled_from([GEN, EMB, "/vllm.grpc.engine.VllmEngine/HealthCheck", ""])


def _only_parse_errors(body: bytes | None, path: str) -> None:
    try:
        got = VllmGrpcParser().parse({}, body, path)
    except ParseError as e:
        assert e.grpc_status in (INVALID_ARGUMENT, UNIMPLEMENTED)
        assert e.message and "\n" not in e.message
        return
    assert got.grpc is True
    assert len(got.prompt) <= max(PROMPT_TOKENS * 4, len(body or b""))


@settings(max_examples=300)
@given(st.one_of(st.none(), st.binary(max_size=200)), _PATHS)
def test_garbage_bodies(body: bytes | None, path: str) -> None:
    _only_parse_errors(body, path)


@settings(max_examples=500)
@given(st.binary(max_size=200), _PATHS)
def test_garbage_messages_in_valid_frames(payload: bytes, path: str) -> None:
    _only_parse_errors(frame(payload), path)


@settings(max_examples=200)
@given(st.binary(max_size=300), st.integers(1, 64), st.sampled_from(["generate", "embed", ""]))
def test_usage_scanner_never_raises(data: bytes, step: int, method: str) -> None:
    s = UsageScanner(method, max_message=64)
    for i in range(0, len(data), step):
        s.feed(data[i:i + step])
    assert len(s._buf) <= 64 + 5

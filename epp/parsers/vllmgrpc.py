"""`vllmgrpc-parser`: gRPC requests to vLLM's gRPC engine (service `vllm.grpc.engine.VllmEngine`).

The request body Envoy hands over is the HTTP/2 DATA of one gRPC call: length-prefixed messages,
each a 1-byte compressed flag and a 4-byte big-endian length before the protobuf bytes. The call's
path, `/vllm.grpc.engine.VllmEngine/<Method>`, says which message it is:

- `.../Generate` (GenerateRequest): the prompt is `text`, or `tokenized.input_ids`; `stream` is the
  request's flag; `sampling_params.max_tokens` and multimodal placeholders go to `extra`.
- `.../Embed` (EmbedRequest): `tokenized.input_ids` (required).
- any other path (HealthCheck, GetModelInfo, another service): routed without reading the body,
  like the reference (no prompt, `extra["skip_response_processing"]`).

vLLM's messages carry no model name (one engine serves one model), so `model` is "" and there is no
`rewrite`: InferenceModel rewrites cannot apply to this traffic. Errors are ParseError with a gRPC
status (INVALID_ARGUMENT; UNIMPLEMENTED for a compressed message, which the reference does not
decode either), answered to the client as a gRPC error rather than an HTTP 400.

Token ids become prompt text for prefix matching: 4 ASCII characters a token (base64 of the id's
low 24 bits), so the prefix index's 4-bytes-a-token blocks cover whole tokens. `token_ids` holds the
leading PROMPT_TOKENS (16384) ids and `extra["prompt_tokens"]` the full count, so the CPU a request
costs does not grow with a prompt past what prefix matching reads.

`frame`/`unframe` are the gRPC message framing; `UsageScanner` reads token counts from the response
stream (GenerateStreamChunk, GenerateComplete, EmbedResponse).
"""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

from epp._gen import vllm_engine_pb2 as pb
from epp.openai import PROMPT_LIMIT, Usage
from epp.parsers import ParseDispatch, ParsedRequest, ParseError
from epp.scheduling.registry import PARSER, Params, register

SERVICE = "vllm.grpc.engine.VllmEngine"
GENERATE_PATH = f"{SERVICE}/Generate"
EMBED_PATH = f"{SERVICE}/Embed"
HEADER_LEN = 5  # compressed flag + 4-byte big-endian length

# google.rpc.Code values
INVALID_ARGUMENT = 3
UNIMPLEMENTED = 12

PAYLOAD_ERROR = "invalid or unsupported gRPC payload"  # the reference's text for any framing error
PROMPT_TOKENS = PROMPT_LIMIT // 4  # token ids rendered for prefix matching (4 characters each)


def _bad(message: str, grpc_status: int = INVALID_ARGUMENT) -> ParseError:
    return ParseError(message, status=400, code="BadRequest", grpc_status=grpc_status)


def unframe(data: bytes | None) -> bytes:
    """The first message of a gRPC body (bytes after it are ignored, as the reference does).

    ParseError for a short header, a compressed message or a length past the end of the body; the
    length is only compared, never allocated, so a forged header costs nothing."""
    data = data or b""
    if len(data) < HEADER_LEN:
        raise _bad(f"{PAYLOAD_ERROR}: expected at least {HEADER_LEN} bytes for header, got {len(data)}")
    flag = data[0]
    if flag == 1:
        raise _bad(f"{PAYLOAD_ERROR}: compressed gRPC payload is not supported", UNIMPLEMENTED)
    if flag != 0:
        raise _bad(f"{PAYLOAD_ERROR}: invalid compressed flag {flag}")
    length = int.from_bytes(data[1:HEADER_LEN], "big")
    if len(data) - HEADER_LEN < length:
        raise _bad(f"{PAYLOAD_ERROR}: incomplete gRPC payload: header indicates {length} bytes, "
                   f"but only {len(data) - HEADER_LEN} bytes are available")
    return data[HEADER_LEN:HEADER_LEN + length]


def frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


_SWAP = sys.byteorder == "little"


def token_prompt(ids: Sequence[int], limit: int = PROMPT_TOKENS) -> str:
    """Text standing for the leading `limit` token ids, 4 characters each (base64 of the low 24 bits
    of each id, big-endian): equal id prefixes give equal text prefixes. Ids from 2**24 up share a
    rendering with a smaller id; for routing affinity that costs at most a wrong guess."""
    a = array("I", ids[:limit])
    if _SWAP:
        a.byteswap()
    raw = a.tobytes()
    packed = bytearray(len(a) * 3)
    packed[0::3] = raw[1::4]  # drop each id's high byte
    packed[1::3] = raw[2::4]
    packed[2::3] = raw[3::4]
    return base64.b64encode(packed).decode("ascii")


def method_of(path: str) -> str:
    """"generate", "embed" or "" for a gRPC path (suffix match, as the reference claims paths)."""
    path = path.split("?", 1)[0]
    if path.endswith(GENERATE_PATH):
        return "generate"
    if path.endswith(EMBED_PATH):
        return "embed"
    return ""


def _decode(message: Any, raw: bytes) -> None:
    try:
        message.ParseFromString(raw)
    except Exception as e:  # DecodeError, and anything else upb raises on hostile bytes
        name = type(message).__name__
        raise _bad(f"unmarshaling {name}: {e}" if str(e) else f"unmarshaling {name}: malformed message") from None


def _leading_ids(ids: Sequence[int], extra: dict[str, Any]) -> tuple[int, ...]:
    """The first PROMPT_TOKENS ids (what prefix matching reads; copying each id out of protobuf
    costs ~25 ns, so a huge prompt is not copied whole); extra["prompt_tokens"] is the full count."""
    extra["prompt_tokens"] = len(ids)
    return tuple(ids[:PROMPT_TOKENS] if len(ids) > PROMPT_TOKENS else ids)


def _mm_features(mm: Any) -> list[dict[str, Any]]:
    """The reference's multimodal features: one image a placeholder, hashes paired by position."""
    hashes = list(mm.mm_hashes)
    return [
        {"modality": "image", "hash": hashes[i] if i < len(hashes) else "", "offset": p.offset, "length": p.length}
        for i, p in enumerate(mm.mm_placeholders)
    ]


def parse_generate(raw: bytes) -> ParsedRequest:
    """A GenerateRequest's routing facts."""
    req = pb.GenerateRequest()
    _decode(req, raw)
    extra: dict[str, Any] = {"grpc_method": "Generate"}
    if req.request_id:
        extra["grpc_request_id"] = req.request_id
    which = req.WhichOneof("input")
    token_ids: tuple[int, ...] | None = None
    if which == "text":
        prompt = req.text[:PROMPT_LIMIT]
    elif which == "tokenized":
        token_ids = _leading_ids(req.tokenized.input_ids, extra)
        prompt = token_prompt(token_ids)
    else:
        raise _bad("not supported request inputType")
    if req.HasField("sampling_params") and req.sampling_params.HasField("max_tokens"):
        extra["max_tokens"] = req.sampling_params.max_tokens  # an explicit 0 is kept
    if req.HasField("mm_inputs"):
        features = _mm_features(req.mm_inputs)
        if features:
            extra["mm_features"] = features
    return ParsedRequest(api="grpc-generate", model="", stream=req.stream, prompt=prompt, token_ids=token_ids,
                         grpc=True, extra=extra)


def parse_embed(raw: bytes) -> ParsedRequest:
    """An EmbedRequest's routing facts (the reference requires tokenized input)."""
    req = pb.EmbedRequest()
    _decode(req, raw)
    if not req.HasField("tokenized"):
        raise _bad("missing tokenized input in EmbedRequest")
    extra: dict[str, Any] = {"grpc_method": "Embed"}
    token_ids = _leading_ids(req.tokenized.input_ids, extra)
    if req.request_id:
        extra["grpc_request_id"] = req.request_id
    return ParsedRequest(api="grpc-embed", model="", prompt=token_prompt(token_ids), token_ids=token_ids,
                         grpc=True, extra=extra)


@register("vllmgrpc-parser", PARSER)
class VllmGrpcParser:
    """vLLM gRPC Generate and Embed calls; other gRPC paths pass through unparsed."""

    needs_body = True
    parse = ParseDispatch()  # Cls.parse(Params) for the config, instance.parse(...) per request
    # path suffixes it serves when several parsers are configured (as llm-d's vllmgrpc-parser claims them)
    claims = ("vllm.grpc.engine.VllmEngine/Generate", "vllm.grpc.engine.VllmEngine/Embed")

    def __init__(self, name: str = "vllmgrpc-parser", params: None = None, ctx: object = None) -> None:
        self.name = name

    @classmethod
    def parse_params(cls, p: Params) -> None:
        """No parameters (as the reference)."""
        p.done()

    def parse_request(self, headers: Mapping[str, str], body: bytes | None, path: str) -> ParsedRequest:
        """Unframe and decode the call's request message; ParseError (with grpc_status) when it
        cannot be served."""
        method = method_of(path or headers.get(":path", ""))
        if not method:
            return ParsedRequest(api="passthrough", model="", grpc=True, extra={"skip_response_processing": True})
        raw = unframe(body)
        return parse_generate(raw) if method == "generate" else parse_embed(raw)


class UsageScanner:
    """Token counts from a vLLM gRPC response body fed in arbitrary chunks.

    `method` is the request's ("generate", "embed", from `method_of`); with "" each complete
    message is tried as a GenerateResponse (a chunk or the final GenerateComplete) and then as an
    EmbedResponse, as the reference does. The last counts seen win. Memory is bounded: a message
    over `max_message` bytes is skipped without being buffered."""

    __slots__ = ("_buf", "_skip", "max_message", "messages", "method", "usage")

    def __init__(self, method: str = "", max_message: int = 1 << 20) -> None:
        self.usage = Usage()
        self.method = method
        self.max_message = max_message
        self.messages = 0
        self._buf = b""
        self._skip = 0  # bytes of an oversized message still to pass over

    def feed(self, chunk: bytes) -> None:
        if self._skip:
            n = min(self._skip, len(chunk))
            self._skip -= n
            chunk = chunk[n:]
        data = self._buf + chunk if self._buf else chunk
        pos = 0
        while len(data) - pos >= HEADER_LEN:
            flag = data[pos]
            length = int.from_bytes(data[pos + 1:pos + HEADER_LEN], "big")
            if flag != 0 or length > self.max_message:
                # compressed or too big: pass over it (the bytes may not have arrived yet)
                end = pos + HEADER_LEN + length
                if end > len(data):
                    self._skip = end - len(data)
                    pos = len(data)
                    break
                pos = end
                continue
            end = pos + HEADER_LEN + length
            if end > len(data):
                break
            self._read(data[pos + HEADER_LEN:end])
            pos = end
        self._buf = data[pos:]

    def finish(self) -> None:
        """The body ended (as openai.SSEUsageScanner's): a partial message left over is dropped."""
        self._buf = b""
        self._skip = 0

    def _read(self, raw: bytes) -> None:
        self.messages += 1
        if self.method != "embed" and self._read_generate(raw):
            return
        if self.method != "generate":
            self._read_embed(raw)

    def _read_generate(self, raw: bytes) -> bool:
        gen = pb.GenerateResponse()
        try:
            gen.ParseFromString(raw)
        except Exception:
            gen.Clear()
        which = gen.WhichOneof("response")
        if which is not None:
            part = gen.chunk if which == "chunk" else gen.complete
            if part.prompt_tokens or part.completion_tokens:
                self.usage.prompt_tokens = part.prompt_tokens
                self.usage.completion_tokens = part.completion_tokens
                self.usage.cached_tokens = part.cached_tokens
                self.usage.found = True
            return True
        return False

    def _read_embed(self, raw: bytes) -> None:
        emb = pb.EmbedResponse()
        try:
            emb.ParseFromString(raw)
        except Exception:
            return
        if emb.prompt_tokens:
            self.usage.prompt_tokens = emb.prompt_tokens
            self.usage.completion_tokens = self.usage.cached_tokens = 0
            self.usage.found = True

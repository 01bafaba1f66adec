"""OpenAI request and response bodies: API type, validation, model rewrite, usage, model restore.

Pure functions over bytes and dicts; nothing here knows gRPC or scheduling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec

# path suffix -> (api name, the field that must be present and non-empty)
_APIS: tuple[tuple[str, str, str], ...] = (
    ("/chat/completions", "chat", "messages"),
    ("/completions", "completions", "prompt"),
    ("/responses", "responses", "input"),
    ("/embeddings", "embeddings", "input"),
    ("/conversations", "conversations", "items"),
)


class BadRequest(ValueError):
    """The body cannot be served; the message is safe to return to the client."""


@dataclass(slots=True)
class ParsedBody:
    """A request body after validation."""

    api: str
    model: str
    body: dict[str, Any]
    stream: bool


def api_for_path(path: str) -> tuple[str, str] | None:
    """(api, required field) for a request path, ignoring the query string; None if unknown."""
    q = path.find("?")
    if q >= 0:
        path = path[:q]
    path = path.rstrip("/")
    for suffix, api, required in _APIS:
        if path.endswith(suffix):
            return api, required
    return None


MAX_CONTAINERS = 100_000  # JSON objects, and arrays, in one body: thousands of messages, far below a bomb
_SCAN_FROM = 64 * 1024  # bodies smaller than this cannot hold a bomb worth the checks


class _TooManyObjects(Exception):
    """Raised from inside json.loads (not a ValueError: that would read as bad JSON)."""


_NOT_QUOTE_OR_BRACKET = bytes(b for b in range(256) if b not in b'"[')


def _arrays_outside_strings(raw: bytes) -> int:
    """`[` that open arrays, not text. With escaped backslashes and quotes removed, every `"` left
    delimits a string; keeping only quotes and brackets, then dropping adjacent quote pairs (a
    string without brackets, or a string's end next to the next one's start: parity and sides are
    unchanged), leaves a short residue whose even pieces between quotes are the structure.
    All C-level passes; the residue is small unless the body really has that many arrays."""
    bare = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    residue = bare.translate(None, _NOT_QUOTE_OR_BRACKET).replace(b'""', b"")
    return b"".join(residue.split(b'"')[::2]).count(b"[")


_fast_decode = msgspec.json.Decoder().decode


def _loads(raw: bytes) -> Any:
    """The body as Python values, by msgspec's decoder (a 200 KB chat: ~55 µs against json's ~170).
    A body it refuses (bad JSON, but also NaN, 1e999 or a lone surrogate, which json accepts) is
    decoded by json instead, so what is accepted and every error message stay json's."""
    try:
        return _fast_decode(raw)
    except (ValueError, RecursionError):
        return json.loads(raw)


_FEW = 256  # up to this many occurrences, find() calls beat one count() over the whole body


def _occurrences(raw: bytes, byte: bytes) -> int:
    """raw.count(byte), found by memchr-speed find() calls while there are few (a 200 KB chat has
    a handful of brackets: ~2 µs instead of count()'s ~50), by count() once there are more."""
    n = 0
    i = raw.find(byte)
    while i >= 0:
        n += 1
        if n > _FEW:
            return raw.count(byte)
        i = raw.find(byte, i + 1)
    return n


def _decode(raw: bytes) -> Any:
    """json.loads, bounded: a body with more than MAX_CONTAINERS objects (or arrays) is refused
    before it is decoded whole (5.5 million `{}` took ~0.45 s and ~400 MB). Counting brackets is a
    C loop; only a body with that many brackets anywhere pays more: objects are counted as the
    decoder builds them (it stops at the bound), arrays by a scan that skips strings."""
    if len(raw) < _SCAN_FROM:
        return _loads(raw)
    n_arrays = _occurrences(raw, b"[")
    if _occurrences(raw, b"{") <= MAX_CONTAINERS and n_arrays <= MAX_CONTAINERS:
        return _loads(raw)
    if n_arrays > MAX_CONTAINERS and _arrays_outside_strings(raw) > MAX_CONTAINERS:
        raise BadRequest(f"request body has more than {MAX_CONTAINERS} JSON arrays")
    built = 0

    def bounded(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal built
        built += 1
        if built > MAX_CONTAINERS:
            raise _TooManyObjects
        return dict(pairs)

    try:
        return json.loads(raw, object_pairs_hook=bounded)
    except _TooManyObjects:
        raise BadRequest(f"request body has more than {MAX_CONTAINERS} JSON objects") from None


def parse_request(raw: bytes, path: str) -> ParsedBody:
    """Validate an OpenAI request body; raise BadRequest with a one-line reason."""
    api_req = api_for_path(path) or ("completions", "prompt")
    api, required = api_req
    if not raw:
        raise BadRequest("empty request body")
    try:
        body = _decode(raw)
    except BadRequest:
        raise
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except ValueError as e:
        raise BadRequest(f"request body is not valid JSON: {e.args[0].split(':')[0]}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is None:
        raise BadRequest("model not found in request body")
    if not isinstance(model, str) or not model:
        raise BadRequest("model must be a non-empty string")
    value = body.get(required)
    if value is None or value == "" or value == [] or value == {}:
        raise BadRequest(f"{required} is required for {api} requests")
    if api == "chat":
        if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
            raise BadRequest("messages must be a list of message objects")
    elif api == "completions" and not isinstance(value, str | list):
        raise BadRequest("prompt must be a string or a list")
    stream = body.get("stream") is True
    return ParsedBody(api=api, model=model, body=body, stream=stream)


PROMPT_LIMIT = 64 * 1024  # characters: prefix matching reads at most 256 blocks (16 KB by default)


_fast_encode = msgspec.json.Encoder().encode


def _dumps(value: object) -> str:
    """Compact JSON, as json.dumps(separators=(",", ":"), ensure_ascii=False) writes it. A string
    (the bulk of a prompt) by msgspec, which writes the same escapes ~4x faster (a 64 K-character
    message: ~20 µs against ~75); one it cannot encode (a lone surrogate) and every other value by json."""
    if type(value) is str:
        try:
            return _fast_encode(value).decode()
        except UnicodeEncodeError:
            pass
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _json_prefix(value: object, limit: int) -> str:
    """The first `limit` characters of `_dumps(value)`, encoding no more of `value` than that needs
    (a 1M-token prompt array or a huge message is not encoded whole to hash its first blocks).
    An escaped string's prefix is the prefix of its escape, so cutting strings is exact."""
    fast = _whole_if_small(value, limit)
    if fast is not None:
        return fast
    parts: list[str] = []
    size = 0

    def emit(v: object) -> bool:  # False once `limit` characters are out
        nonlocal size
        if isinstance(v, str):
            room = limit - size
            s = _dumps(v[:room]) if len(v) > room else _dumps(v)
        elif isinstance(v, dict):
            parts.append("{")
            size += 1
            sep = ""
            for k, x in v.items():
                if size >= limit:
                    return False
                key = sep + _dumps(k) + ":"
                parts.append(key)
                size += len(key)
                sep = ","
                if not emit(x):
                    return False
            s = "}"
        elif isinstance(v, list):
            parts.append("[")
            size += 1
            first = True
            for x in v:
                if size >= limit:
                    return False
                if not first:
                    parts.append(",")
                    size += 1
                first = False
                if type(x) is int:  # token ids: the common long array, encoded without a call per item
                    t = str(x)
                    parts.append(t)
                    size += len(t)
                elif not emit(x):
                    return False
            s = "]"
        else:
            s = _dumps(v)
        parts.append(s)
        size += len(s)
        return size < limit

    emit(value)
    out = "".join(parts)
    return out[:limit] if len(out) > limit else out


def _whole_if_small(value: object, limit: int) -> str | None:
    """`_dumps(value)` in one encoder call for the usual chat shape (a list of objects whose values
    are strings) when even six characters out per character in (the longest escape) stays under
    `limit`, so nothing is cut; None otherwise (or for a lone surrogate, which msgspec refuses)."""
    if type(value) is not list:
        return None
    chars = 2
    for m in value:
        if type(m) is not dict:
            return None
        chars += 3
        for k, x in m.items():
            if type(x) is not str:
                return None
            chars += len(k) + len(x) + 6
        if 6 * chars >= limit:  # a long list (a client's hundred thousand messages) stops here
            return None
    try:
        return _fast_encode(value).decode()
    except UnicodeEncodeError:
        return None


def prompt_text(parsed: ParsedBody, limit: int = PROMPT_LIMIT) -> str:
    """The leading `limit` characters of the text whose prefix identifies cached KV blocks; chat: the
    messages in order, as compact JSON; a string prompt/input as is; anything else as compact JSON.
    Only what is needed is encoded (see _json_prefix)."""
    b = parsed.body
    if parsed.api == "chat":
        return _json_prefix(b.get("messages"), limit)
    value = b.get("prompt") if parsed.api == "completions" else b.get("input") or b.get("items")
    if isinstance(value, str):
        return value[:limit]
    return _json_prefix(value, limit)


def rewrite_model(parsed: ParsedBody, target: str) -> bytes:
    """The body re-encoded with `model` set to the target."""
    parsed.body["model"] = target
    try:
        return json.dumps(parsed.body, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        # a lone surrogate ("\ud800" in the client's JSON) has no UTF-8 form: escape everything
        # non-ASCII instead, which decodes to exactly what the client sent
        return json.dumps(parsed.body, separators=(",", ":")).encode()


@dataclass(slots=True)
class Usage:
    """Token counts from a response."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt_tokens_details.cached_tokens
    found: bool = False


def _usage_from(obj: Any, into: Usage) -> None:
    if not isinstance(obj, dict):
        return
    u = obj.get("usage")
    if isinstance(u, dict):
        p, c = u.get("prompt_tokens", u.get("input_tokens")), u.get("completion_tokens", u.get("output_tokens"))
        if isinstance(p, int):
            into.prompt_tokens = p
            into.found = True
        if isinstance(c, int):
            into.completion_tokens = c
            into.found = True
        # OpenAI's name; the Responses API's; the spelling the reference's own Usage type uses
        details = u.get("prompt_tokens_details") or u.get("input_tokens_details") or u.get("prompt_token_details")
        if isinstance(details, dict):
            cached = details.get("cached_tokens")
            if isinstance(cached, int) and not isinstance(cached, bool):
                into.cached_tokens = cached


def usage_from_json(raw: bytes, into: Usage) -> None:
    """Read `usage` from a complete JSON response body; ignores bodies that are not JSON."""
    if b'"usage"' not in raw:
        return
    try:
        _usage_from(json.loads(raw), into)
    except ValueError:
        return


class SSEUsageScanner:
    """Finds `usage` in a server-sent-event stream fed in arbitrary chunks.

    Only lines that contain `"usage"` are decoded, so a token stream without usage costs one
    substring search per chunk.
    """

    __slots__ = ("_carry", "done", "usage")

    def __init__(self) -> None:
        self._carry = b""
        self.usage = Usage()
        self.done = False  # saw `data: [DONE]`

    def feed(self, chunk: bytes) -> None:
        data = self._carry + chunk if self._carry else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            self._carry = data[-65536:] if len(data) > 65536 else data
            return
        self._carry = data[cut + 1 :]
        complete = data[: cut + 1]
        if b"[DONE]" in complete:
            self.done = True
        if b'"usage"' not in complete:
            return
        for line in complete.split(b"\n"):
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    _usage_from(json.loads(line[5:]), self.usage)
                except ValueError:
                    continue

    def finish(self) -> None:
        if self._carry:
            self.feed(b"\n")


class ModelRestorer:
    """Replaces the target model name with the client's in a response streamed in chunks.

    Handles both `"model":"x"` and `"model": "x"`; a match split across two chunks is caught by
    holding back the last few bytes of each chunk until the next one (or the end) arrives.
    """

    __slots__ = ("_hold", "_pairs", "_tail")

    def __init__(self, target: str, client: str) -> None:
        t, c = json.dumps(target).encode(), json.dumps(client).encode()
        self._pairs = [(b'"model":' + t, b'"model":' + c), (b'"model": ' + t, b'"model": ' + c)]
        self._hold = max(len(a) for a, _ in self._pairs) - 1
        self._tail = b""

    def _replace(self, data: bytes) -> bytes:
        for a, b in self._pairs:
            if a in data:
                data = data.replace(a, b)
        return data

    def feed(self, chunk: bytes, end: bool) -> bytes:
        data = self._tail + chunk if self._tail else chunk
        if end:
            self._tail = b""
            return self._replace(data)
        data = self._replace(data)
        # keep back only a suffix that could start a pattern completed by the next chunk, so
        # an SSE event is never delayed unless it really ends mid-pattern
        n = len(data)
        i = data.find(b'"', max(0, n - self._hold))
        while i >= 0:
            rest = data[i:]
            if any(a.startswith(rest) for a, _ in self._pairs):
                self._tail = rest
                return data[:i]
            i = data.find(b'"', i + 1)
        self._tail = b""
        return data

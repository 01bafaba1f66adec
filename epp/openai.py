"""OpenAI request and response bodies: API type, validation, model rewrite, usage, model restore.

Pure functions over bytes and dicts; nothing here knows gRPC or scheduling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

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


def parse_request(raw: bytes, path: str) -> ParsedBody:
    """Validate an OpenAI request body; raise BadRequest with a one-line reason."""
    api_req = api_for_path(path) or ("completions", "prompt")
    api, required = api_req
    if not raw:
        raise BadRequest("empty request body")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8") from None
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


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def prompt_text(parsed: ParsedBody, limit: int = PROMPT_LIMIT) -> str:
    """The leading text (at least `limit` characters when there are that many) whose prefix identifies
    cached KV blocks; chat: the messages in order, as compact JSON. Stopping early keeps a long
    conversation from being re-encoded whole just to hash its first blocks."""
    b = parsed.body
    if parsed.api == "chat":
        messages = b.get("messages")
        if not isinstance(messages, list):
            return _dumps(messages)
        parts, size = [], 1
        for m in messages:
            remaining = limit - size
            if isinstance(m, dict) and any(isinstance(v, str) and len(v) > remaining for v in m.values()):
                # one huge message: encode only the start of its long strings, then cut the artificial
                # ending off (an escaped string's prefix is the prefix of its escape)
                m = {k: v[:remaining] if isinstance(v, str) else v for k, v in m.items()}
                parts.append(_dumps(m))
                return ("[" + ",".join(parts))[:limit]
            piece = _dumps(m)
            parts.append(piece)
            size += len(piece) + 1
            if size >= limit:
                return "[" + ",".join(parts)  # a prefix of the full JSON list
        return "[" + ",".join(parts) + "]"
    value = b.get("prompt") if parsed.api == "completions" else b.get("input") or b.get("items")
    if isinstance(value, str):
        return value[:limit]
    return _dumps(value)[:limit]


def rewrite_model(parsed: ParsedBody, target: str) -> bytes:
    """The body re-encoded with `model` set to the target."""
    parsed.body["model"] = target
    return json.dumps(parsed.body, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(slots=True)
class Usage:
    """Token counts from a response."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
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

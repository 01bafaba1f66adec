"""Reporting the prefill's cached tokens in the decode answer's usage, as llm-d's sidecar does:
`usage.prompt_tokens_details.cached_tokens` becomes what the prefill pod found in its prefix cache
(the decode pod's own figure would count the transferred blocks, which nobody computed there).

Works on a whole JSON body or on an SSE stream line by line; only lines that carry a usage object
are decoded, and a line longer than MAX_LINE passes through unchanged (bounded memory).
"""

from __future__ import annotations

import json
from typing import Any

MAX_LINE = 1 << 20  # SSE bytes buffered while waiting for a line end


def set_cached_tokens(doc: Any, cached: int) -> bool:
    """Set usage.prompt_tokens_details.cached_tokens in a response object; False if it has no usage."""
    if not isinstance(doc, dict):
        return False
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        return False
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return True
    details["cached_tokens"] = cached
    return True


def cached_tokens_of(doc: Any) -> int:
    """usage.prompt_tokens_details.cached_tokens of a response object (0 when absent)."""
    try:
        value = doc["usage"]["prompt_tokens_details"]["cached_tokens"]
    except (KeyError, TypeError):
        return 0
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def rewrite_json(body: bytes, cached: int) -> bytes:
    """A JSON response body with the cached tokens set (unchanged when it is not such JSON)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    if not set_cached_tokens(doc, cached):
        return body
    return json.dumps(doc, separators=(",", ":")).encode()


def rewrite_sse_line(line: bytes, cached: int) -> bytes:
    """One SSE line (with its line end) with the cached tokens set in a `data:` usage chunk."""
    if not line.startswith(b"data:") or b'"usage"' not in line or b'"prompt_tokens"' not in line:
        return line
    stripped = line.rstrip(b"\r\n")
    end = line[len(stripped):]
    payload = stripped[5:].strip()
    try:
        doc = json.loads(payload)
    except ValueError:
        return line
    if not set_cached_tokens(doc, cached):
        return line
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + end


class SSERewriter:
    """Feeds SSE bytes in arbitrary chunks, returns the rewritten bytes of the complete lines."""

    def __init__(self, cached: int) -> None:
        self.cached = cached
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        self._buf += chunk
        out = bytearray()
        start = 0
        buf = self._buf
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            out += rewrite_sse_line(bytes(buf[start:nl + 1]), self.cached)
            start = nl + 1
        del buf[:start]
        if len(buf) > MAX_LINE:  # a line this long is no usage chunk worth decoding: pass it on
            out += buf
            buf.clear()
        return bytes(out)

    def flush(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rewrite_sse_line(rest, self.cached) if rest else b""

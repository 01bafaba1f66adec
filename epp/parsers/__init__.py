"""Request parsers (the config's `parser:` section): turn a request's headers and body into what
routing needs. One module a parser type; each registers itself under its type name (kind PARSER).

- `openai-parser` (default): OpenAI JSON bodies (epp.openai).
- `passthrough-parser`: routes on headers alone, the body is forwarded untouched.
- `vllmgrpc-parser`: gRPC requests to vLLM's gRPC server (protobuf bodies, gRPC status errors).

The contract every parser keeps is `RequestParser` below; the director calls only that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class ParseError(ValueError):
    """A request that cannot be served. `status` is the HTTP status to answer with; `grpc_status`
    (a google.rpc code) is set by parsers of gRPC traffic, which are answered with gRPC errors."""

    def __init__(self, message: str, status: int = 400, code: str = "BadRequest",
                 grpc_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.grpc_status = grpc_status


@dataclass(slots=True)
class ParsedRequest:
    """What routing needs from one request."""

    api: str  # "chat", "completions", "responses", "embeddings", "conversations", "grpc-generate", "passthrough"
    model: str  # "" when the request names none (passthrough)
    stream: bool = False
    prompt: str = ""  # text whose prefix identifies cached KV blocks
    token_ids: tuple[int, ...] | None = None  # when the request already carries tokens
    body: Mapping[str, Any] | None = None  # the decoded JSON body, when there is one
    # re-encode the body with another model name; None: this parser cannot rewrite
    rewrite: Callable[[str], bytes] | None = None
    grpc: bool = False  # errors for this request must be gRPC status errors
    extra: dict[str, Any] = field(default_factory=dict)


class RequestParser(Protocol):
    """One parser instance per picker; `parse` runs once per request on the serving loop."""

    name: str
    needs_body: bool  # False: the pick can be made on headers (the body is not read)

    def parse(self, headers: Mapping[str, str], body: bytes | None, path: str) -> ParsedRequest:
        """Parse one request; raise ParseError with a one-line reason safe to return to clients."""
        ...


DEFAULT_PARSER = "openai-parser"


def build_parser(spec: Any = None) -> RequestParser:
    """The parser a config selects: a PluginSpec (name, type, params) of kind PARSER, or None for
    the default `openai-parser`. Raises ValueError for a spec that is not a parser."""
    from epp.scheduling.registry import PARSER, plugin_type  # lazy: the parser modules import the registry

    type_name = spec.type if spec is not None else DEFAULT_PARSER
    pt = plugin_type(type_name)
    if pt is None or pt.kind != PARSER:
        raise ValueError(f"{type_name!r} is not a request parser")
    if spec is None:
        return pt.cls(DEFAULT_PARSER, None, None)  # type: ignore[no-any-return]
    return pt.cls(spec.name, spec.params, None)  # type: ignore[no-any-return]


class ParseDispatch:
    """For parser classes: the plugin contract reads parameters with `Cls.parse(Params)`, the
    RequestParser contract parses a request with `instance.parse(headers, body, path)`. One name,
    two contracts: on the class `parse` is the class's `parse_params`, on an instance its
    `parse_request`. (Use: `parse = ParseDispatch()` in the class body.)"""

    def __get__(self, obj: Any, owner: Any) -> Any:
        return owner.parse_params if obj is None else obj.parse_request

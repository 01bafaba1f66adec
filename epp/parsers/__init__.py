"""Request parsers (the config's `parser:` section): turn a request's headers and body into what
routing needs. One module a parser type; each registers itself under its type name (kind PARSER).

- `openai-parser` (default): OpenAI JSON bodies (epp.openai).
- `passthrough-parser`: routes on headers alone, the body is forwarded untouched.
- `vllmgrpc-parser`: gRPC requests to vLLM's gRPC server (protobuf bodies, gRPC status errors).

The contract every parser keeps is `RequestParser` below; the director calls only that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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

def _one(spec: Any) -> RequestParser:
    from epp.scheduling.registry import PARSER, plugin_type  # lazy: the parser modules import the registry

    type_name = spec.type if spec is not None else DEFAULT_PARSER
    pt = plugin_type(type_name)
    if pt is None or pt.kind != PARSER:
        raise ValueError(f"{type_name!r} is not a request parser")
    if spec is None:
        return pt.cls(DEFAULT_PARSER, None, None)  # type: ignore[no-any-return]
    return pt.cls(spec.name, spec.params, None)  # type: ignore[no-any-return]


def claims_of(parser: Any) -> tuple[str, ...]:
    """The path suffixes a parser serves (no slashes at either end); () = every path (a fallback)."""
    claims = getattr(parser, "claims", ())
    return tuple(c.strip().strip("/") for c in claims if c.strip().strip("/"))


class ParserRegistry:
    """Several parsers (llm-d's `requestHandler.parsers`): a request goes to the first, in config
    order, whose claimed path suffix its path ends with; a parser claiming no paths is the fallback
    and ends the list (later ones are never reached). No match and no fallback: 400."""

    def __init__(self, parsers: Sequence[RequestParser]) -> None:
        self.name = "parser-registry"
        self.entries: list[tuple[RequestParser, tuple[str, ...]]] = []
        self.fallback: RequestParser | None = None
        for p in parsers:
            claims = claims_of(p)
            if not claims:
                self.fallback = p
                break
            self.entries.append((p, claims))
        self.parsers = [p for p, _ in self.entries] + ([self.fallback] if self.fallback is not None else [])
        self.needs_body = any(p.needs_body for p in self.parsers)

    def resolve(self, path: str) -> RequestParser | None:
        """The parser for a request path (query string ignored), or None."""
        p = path.split("?", 1)[0].strip().rstrip("/")
        for parser, claims in self.entries:
            for suffix in claims:
                if p.endswith(suffix):
                    return parser
        return self.fallback

    def parse(self, headers: Mapping[str, str], body: bytes | None, path: str) -> ParsedRequest:
        """Parse with the parser the path resolves to."""
        parser = self.resolve(path)
        if parser is None:
            raise ParseError(f"no parser registered matching path suffix for: {path}")
        return parser.parse(headers, body, path)


def build_parser(spec: Any = None) -> RequestParser:
    """The parser a config selects: a PluginSpec (name, type, params) of kind PARSER, None for the
    default `openai-parser`, or a sequence of specs (several parsers, chosen by path: ParserRegistry;
    one spec: that parser for every path, as the GIE reference uses its one parser). Raises
    ValueError for a spec that is not a parser."""
    if isinstance(spec, list | tuple):
        if len(spec) <= 1:
            return _one(spec[0] if spec else None)
        return ParserRegistry([_one(sp) for sp in spec])
    return _one(spec)


class ParseDispatch:
    """For parser classes: the plugin contract reads parameters with `Cls.parse(Params)`, the
    RequestParser contract parses a request with `instance.parse(headers, body, path)`. One name,
    two contracts: on the class `parse` is the class's `parse_params`, on an instance its
    `parse_request`. (Use: `parse = ParseDispatch()` in the class body.)"""

    def __get__(self, obj: Any, owner: Any) -> Any:
        return owner.parse_params if obj is None else obj.parse_request

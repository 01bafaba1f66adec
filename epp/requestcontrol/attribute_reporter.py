"""`request-attribute-reporter`: a number computed from the response's `usage`, returned to the proxy
as dynamic metadata on the last response-body reply (for Envoy rate limiting or billing).

Parameters, as the reference reads them (exactly one attribute):

    attributes:
    - key: {namespace: envoy.lb, name: x-gateway-inference-request-cost}   # namespace optional
      expression: usage.prompt_tokens + usage.completion_tokens             # must give a number
      condition: has(usage.completion_tokens)                                # optional, must give a bool

`usage` has `prompt_tokens`, `completion_tokens`, `total_tokens` (0 when the engine reported none) and
`prompt_token_details.cached_tokens` when reported. Expressions are a safe CEL subset (epp.requestcontrol.expr).
Nothing is reported when the condition is false or not a bool, the expression fails or is not a
number, or the value truncates to 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from epp.requestcontrol.expr import ExprError, Node, compile_expr
from epp.scheduling.registry import REQUEST_CONTROL, ConfigError, Params, register

if TYPE_CHECKING:
    from epp.director import RequestContext

log = logging.getLogger("epp.requestcontrol")

DEFAULT_NAMESPACE = "envoy.lb"
COST_KEY = "x-gateway-inference-request-cost"


@dataclass(frozen=True, slots=True)
class Attribute:
    """One reported value: where it goes and how it is computed."""

    namespace: str
    name: str
    expression: Node
    condition: Node | None
    source: str  # the expression text, for logs


def _compile(p: Params, key: str, required: bool) -> tuple[Node | None, str]:
    text = p.get(key)
    if text is None or text == "":
        if required:
            raise ConfigError(p.field(key), "required")
        return None, ""
    if not isinstance(text, str):
        raise ConfigError(p.field(key), f"expected a CEL expression string, got {text!r}")
    try:
        return compile_expr(text), text.strip()
    except ExprError as e:
        raise ConfigError(p.field(key), f"invalid expression: {e}") from None


def usage_of(ctx: RequestContext) -> dict[str, Any]:
    """The `usage` variable for one finished request (the reference's Usage as a JSON Struct)."""
    usage: dict[str, Any] = {
        "prompt_tokens": float(ctx.usage_prompt),
        "completion_tokens": float(ctx.usage_completion),
        "total_tokens": float(ctx.usage_prompt + ctx.usage_completion),
    }
    if ctx.usage_cached:
        usage["prompt_token_details"] = {"cached_tokens": float(ctx.usage_cached)}
    return usage


@register("request-attribute-reporter", REQUEST_CONTROL)
class RequestAttributeReporter:
    """Response-complete plugin: {namespace: {name: value}} or nothing."""

    def __init__(self, name: str, params: Attribute, ctx: object = None) -> None:
        self.name = name
        self.attribute = params

    @classmethod
    def parse(cls, p: Params) -> Attribute:
        raw = p.get("attributes")
        p.done()
        if not isinstance(raw, list) or len(raw) != 1:
            raise ConfigError(p.field("attributes"), "must contain exactly one entry")
        a = Params(raw[0], p.field("attributes") + "[0]")
        k = a.sub("key")
        name = k.string("name", "")
        if not name:
            raise ConfigError(k.field("name"), "required (the metadata key to set)")
        namespace = k.string("namespace", DEFAULT_NAMESPACE)
        k.done()
        expression, source = _compile(a, "expression", True)
        condition, _ = _compile(a, "condition", False)
        a.done()
        assert expression is not None
        return Attribute(namespace=namespace, name=name, expression=expression, condition=condition,
                         source=source)

    def response_complete(self, ctx: RequestContext) -> Mapping[str, Mapping[str, float]] | None:
        """The value for this request, or None when there is nothing to report."""
        a = self.attribute
        env = {"usage": usage_of(ctx)}
        try:
            if a.condition is not None and a.condition(env) is not True:
                return None
            value = a.expression(env)
        except ExprError as e:
            log.debug("request-attribute-reporter %s: %s (%s)", self.name, e, a.source)
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
        n = int(value)  # truncated to an integer, as the reference reports it
        if n == 0:
            return None
        return {a.namespace: {a.name: float(n)}}

"""What request-control plugins see and return, and building them from a config's plugin list.

Two extension points, both on the response path (the reference's ResponseHeader and
ResponseBody-at-end points):
- `response_header(ctx, info)`: response headers to add;
- `response_complete(ctx)`: dynamic metadata ({namespace: {key: number}}) for the last response-body
  reply, read by Envoy (rate limiting on `envoy.lb` keys, for example).
A plugin implements either or both; the director calls only the ones that exist.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from epp.director import RequestContext


@dataclass(frozen=True, slots=True)
class ResponseInfo:
    """The response headers message as plugins see it."""

    served: str | None  # the endpoint the proxy reports as having served (metadata, or the route's header)
    lb_metadata: bool  # the message carried an `envoy.lb` metadata namespace at all
    headers: Mapping[str, str] = field(default_factory=dict)


class ResponseHeaderPlugin(Protocol):
    name: str

    def response_header(self, ctx: RequestContext, info: ResponseInfo) -> list[tuple[str, str]]: ...


class ResponseCompletePlugin(Protocol):
    name: str

    def response_complete(self, ctx: RequestContext) -> Mapping[str, Mapping[str, float]] | None: ...


@dataclass(frozen=True, slots=True)
class RequestControl:
    """The request-control plugins of one picker, split by extension point (config order kept)."""

    response_header: tuple[Any, ...] = ()
    response_complete: tuple[Any, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.response_header or self.response_complete)


def build_request_control(specs: Iterable[Any]) -> RequestControl:
    """Instances of every REQUEST_CONTROL spec (PluginSpec: name, type, kind, params) in `specs`."""
    from epp.scheduling.registry import REQUEST_CONTROL, plugin_type  # lazy: plugin modules import the registry

    header, complete = [], []
    for spec in specs:
        if spec.kind != REQUEST_CONTROL:
            continue
        pt = plugin_type(spec.type)
        if pt is None:
            raise ValueError(f"unknown request-control plugin type {spec.type!r}")
        plugin = pt.cls(spec.name, spec.params, None)
        if hasattr(plugin, "response_header"):
            header.append(plugin)
        if hasattr(plugin, "response_complete"):
            complete.append(plugin)
    return RequestControl(tuple(header), tuple(complete))

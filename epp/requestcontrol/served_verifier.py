"""`destination-endpoint-served-verifier` (conformance tests only): echoes the endpoint the proxy
reports as having served the request in response header `x-conformance-test-served-endpoint`.

Without this plugin in the config the header is never set. When the proxy reported nothing the
header says so (`fail: ...`, the reference's texts) instead of guessing from the pick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from epp.requestcontrol.base import ResponseInfo
from epp.scheduling.registry import REQUEST_CONTROL, NoParams, register

if TYPE_CHECKING:
    from epp.director import RequestContext

SERVED_ECHO_HEADER = "x-conformance-test-served-endpoint"
MISSING_LB = "fail: missing envoy lb metadata"
MISSING_SERVED = "fail: missing destination endpoint served metadata"


@register("destination-endpoint-served-verifier", REQUEST_CONTROL)
class DestinationEndpointServedVerifier(NoParams):
    """Response-header plugin: the served endpoint, or why it is unknown."""

    def __init__(self, name: str = "destination-endpoint-served-verifier", params: None = None,
                 ctx: object = None) -> None:
        self.name = name

    def response_header(self, ctx: RequestContext, info: ResponseInfo) -> list[tuple[str, str]]:
        """One header: the served address, or a `fail:` text."""
        if info.served:
            return [(SERVED_ECHO_HEADER, info.served)]
        return [(SERVED_ECHO_HEADER, MISSING_SERVED if info.lb_metadata else MISSING_LB)]

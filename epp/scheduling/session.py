"""Session affinity: a client that carries back the token of the endpoint that served it returns there.

The director sets the response header `x-session-token: <token>` naming the endpoint that served
the request; a client that sends the same header on its next request scores that endpoint 1.0.
The token is the endpoint address in unpadded URL-safe base64: opaque to clients, cheap to decode,
and meaningless (ignored) once the endpoint leaves the pool.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from epp.datastore import Endpoint
from epp.scheduling.cycle import Cycle
from epp.scheduling.loadguard import LoadGuard
from epp.scheduling.registry import SCORER, BuildContext, Params, register

SESSION_TOKEN_HEADER = "x-session-token"
_MAX_TOKEN_LEN = 128  # an ip:port never needs more; longer values are not ours


def encode_session_token(address: str) -> str:
    """The token for an endpoint address ("ip:port"), for the response header."""
    return base64.urlsafe_b64encode(address.encode()).rstrip(b"=").decode("ascii")


def decode_session_token(token: str | None) -> str | None:
    """The endpoint address a token names, or None when it is missing or malformed."""
    if not token or len(token) > _MAX_TOKEN_LEN:
        return None
    token = token.strip()
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        address = raw.decode("ascii")
    except (binascii.Error, ValueError):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return address


@register("session-affinity-scorer", SCORER)
class SessionAffinityScorer:
    """1.0 for the endpoint named by the request's session token header, 0 for the others."""

    BOUNDED = True  # scores are constants or ratios in 0..1 by construction

    def __init__(self, name: str, params: tuple[str, bool], ctx: BuildContext) -> None:
        self.name = name
        self.header, use_guard = params
        self.guard: LoadGuard | None = ctx.guard if use_guard and ctx.guard.enabled else None

    @classmethod
    def parse(cls, p: Params) -> tuple[str, bool]:
        header = p.string("header", SESSION_TOKEN_HEADER).lower()
        guard = p.boolean("loadGuard", True)
        p.done()
        return header, guard

    def score(self, cycle: Cycle, endpoints: Sequence[Endpoint]) -> list[float]:
        out = [0.0] * len(endpoints)
        address = decode_session_token(cycle.request.headers.get(self.header))
        if address is None:
            return out
        for i, ep in enumerate(endpoints):
            if ep.address == address:
                out[i] = 1.0
                break
        else:
            return out
        return out if self.guard is None else self.guard.apply(cycle, endpoints, out)

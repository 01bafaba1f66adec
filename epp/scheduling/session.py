"""Session affinity: a client that carries back the token of the endpoint that served it returns there.

The director sets the response header `x-session-token: <token>` naming the endpoint that served
the request; a client that sends the same header on its next request scores that endpoint 1.0.

The token is `<address>.<mac>`, both unpadded URL-safe base64: the endpoint address and the first
16 bytes of HMAC-SHA256 over it with the picker's session key. A client cannot forge a token for a
pod it was not sent to (the plain-base64 tokens of earlier versions could name any ip:port); a
token made with another key, or altered, is ignored (compared in constant time); one naming an
endpoint that left the pool is meaningless and ignored too. Decoding costs one HMAC of ~20 bytes.

The key: the first line of the file named by `configure_session_keys(path)` (the process wires
`--session-key-file` to it) or by the `EPP_SESSION_KEY_FILE` environment variable; further lines
are older keys still accepted (rotation: add the new key first, drop the old one after the
session lifetime). Without a file each process generates a random key at start, so tokens survive
neither a restart nor a move to another replica: replicas behind one gateway must share a key
file (a mounted Secret; docs/security.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence

from epp.datastore import Endpoint
from epp.scheduling.cycle import Cycle
from epp.scheduling.loadguard import LoadGuard
from epp.scheduling.registry import SCORER, BuildContext, Params, register

SESSION_TOKEN_HEADER = "x-session-token"
SESSION_KEY_ENV = "EPP_SESSION_KEY_FILE"
_MAX_TOKEN_LEN = 128  # an ip:port and its MAC never need more; longer values are not ours
_MAC_BYTES = 16
_MIN_KEY_BYTES = 16
_CONTEXT = b"epp-session-token-v1\0"  # a MAC made with this key for another purpose never matches

_keys: tuple[bytes, ...] = ()  # signing key first, then keys still accepted; () until first use


def read_session_keys(path: str) -> tuple[bytes, ...]:
    """The keys in a key file: one per non-empty line (surrounding whitespace ignored), the signing
    key first. ValueError when there is none or one is shorter than 16 bytes."""
    with open(path, "rb") as f:
        keys = tuple(line.strip() for line in f.read().splitlines() if line.strip())
    if not keys:
        raise ValueError(f"session key file {path}: no key")
    if any(len(k) < _MIN_KEY_BYTES for k in keys):
        raise ValueError(f"session key file {path}: every key needs at least {_MIN_KEY_BYTES} bytes")
    return keys


def configure_session_keys(path: str | None = None, keys: Sequence[bytes] = ()) -> None:
    """Use the keys of `path` (or `keys`); with neither, a fresh random key for this process."""
    global _keys
    if path:
        _keys = read_session_keys(path)
    elif keys:
        if any(len(k) < _MIN_KEY_BYTES for k in keys):
            raise ValueError(f"every session key needs at least {_MIN_KEY_BYTES} bytes")
        _keys = tuple(keys)
    else:
        _keys = (secrets.token_bytes(32),)


def _current_keys() -> tuple[bytes, ...]:
    if not _keys:
        configure_session_keys(os.environ.get(SESSION_KEY_ENV) or None)
    return _keys


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, _CONTEXT + payload, hashlib.sha256).digest()[:_MAC_BYTES]


def encode_session_token(address: str) -> str:
    """The signed token for an endpoint address ("ip:port"), for the response header."""
    payload = address.encode()
    return f"{_b64(payload)}.{_b64(_mac(_current_keys()[0], payload))}"


def decode_session_token(token: str | None) -> str | None:
    """The endpoint address a token names, or None when it is missing, malformed, or not signed
    with one of our keys."""
    if not token or len(token) > _MAX_TOKEN_LEN:
        return None
    body, sep, tag = token.strip().partition(".")
    if not sep:
        return None
    try:
        payload, mac = _unb64(body), _unb64(tag)
        address = payload.decode("ascii")
    except (binascii.Error, ValueError):
        return None
    if len(mac) != _MAC_BYTES:
        return None
    # every key is checked: the time taken does not depend on which key (if any) matched
    ok = False
    for key in _current_keys():
        ok |= hmac.compare_digest(_mac(key, payload), mac)
    if not ok:
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

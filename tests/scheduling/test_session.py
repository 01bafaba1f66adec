"""Session affinity: token encoding and the scorer."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from epp.scheduling.loadguard import LoadGuard
from epp.scheduling.registry import BuildContext
from epp.scheduling.saturation import SaturationDetector
from epp.scheduling.session import (
    SESSION_TOKEN_HEADER,
    SessionAffinityScorer,
    decode_session_token,
    encode_session_token,
)
from tests.scheduling.util import cycle, ep, req

CTX = BuildContext(rng=random.Random(0), detector=SaturationDetector(), guard=LoadGuard())


@given(st.ip_addresses(), st.integers(1, 65535))
def test_token_round_trip(ip, port):
    address = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    token = encode_session_token(address)
    assert "=" not in token and token.isascii()
    assert decode_session_token(token) == address


def test_bad_tokens_decode_to_none():
    for bad in (None, "", "!!!", encode_session_token("no-port"), "a" * 500, encode_session_token("1.2.3.4:x"),
                "\xff\xfe"):
        assert decode_session_token(bad) is None


def test_scorer_prefers_the_named_endpoint():
    eps = [ep(1), ep(2), ep(3)]
    s = SessionAffinityScorer("s", (SESSION_TOKEN_HEADER, True), CTX)
    h = {SESSION_TOKEN_HEADER: encode_session_token(eps[2].address)}
    assert s.score(cycle(req(headers=h)), eps) == [0.0, 0.0, 1.0]
    assert s.score(cycle(req()), eps) == [0.0, 0.0, 0.0]
    gone = {SESSION_TOKEN_HEADER: encode_session_token("10.1.1.1:9")}
    assert s.score(cycle(req(headers=gone)), eps) == [0.0, 0.0, 0.0]


def test_scorer_load_guard():
    eps = [ep(1), ep(2, waiting=20)]
    h = {SESSION_TOKEN_HEADER: encode_session_token(eps[1].address)}
    guarded = SessionAffinityScorer("s", (SESSION_TOKEN_HEADER, True), CTX)
    assert guarded.score(cycle(req(headers=h)), eps) == [0.0, 0.0]
    unguarded = SessionAffinityScorer("s", (SESSION_TOKEN_HEADER, False), CTX)
    assert unguarded.score(cycle(req(headers=h)), eps) == [0.0, 1.0]

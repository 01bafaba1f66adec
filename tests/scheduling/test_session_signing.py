"""Signed session tokens (epp/scheduling/session.py): forged, altered and foreign tokens are ignored,
keys come from a file (several lines: rotation), and decoding stays cheap."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from epp.scheduling import session
from epp.scheduling.session import configure_session_keys, decode_session_token, encode_session_token

KEY_A = b"a" * 32
KEY_B = b"b" * 32


@pytest.fixture(autouse=True)
def fresh_keys() -> Iterator[None]:
    yield
    configure_session_keys()  # other tests get a random process key again


def _plain(address: str) -> str:
    return base64.urlsafe_b64encode(address.encode()).rstrip(b"=").decode()


def test_forged_and_old_style_tokens_are_ignored() -> None:
    configure_session_keys(keys=[KEY_A])
    good = encode_session_token("10.0.0.7:8000")
    assert decode_session_token(good) == "10.0.0.7:8000"
    body, _, mac = good.partition(".")
    forged = f"{_plain('10.0.0.8:8000')}.{mac}"  # another pod, the MAC of the first
    flipped = body + "." + ("A" if mac[0] != "A" else "B") + mac[1:]
    for bad in (_plain("10.0.0.7:8000"), forged, flipped, body + ".", "." + mac, good + "x", good + ".x"):
        assert decode_session_token(bad) is None, bad


def test_tokens_of_another_key_are_ignored() -> None:
    configure_session_keys(keys=[KEY_B])
    theirs = encode_session_token("10.0.0.7:8000")
    configure_session_keys(keys=[KEY_A])
    assert decode_session_token(theirs) is None
    assert decode_session_token(encode_session_token("10.0.0.7:8000")) == "10.0.0.7:8000"


def test_key_file_signs_with_the_first_and_accepts_the_others(tmp_path: Path) -> None:
    configure_session_keys(keys=[KEY_B])
    old = encode_session_token("10.0.0.9:8000")
    path = tmp_path / "keys"
    path.write_bytes(KEY_A + b"\n\n  " + KEY_B + b"  \n")
    configure_session_keys(str(path))
    assert decode_session_token(old) == "10.0.0.9:8000"  # rotation: the old key still verifies
    new = encode_session_token("10.0.0.9:8000")
    configure_session_keys(keys=[KEY_A])
    assert decode_session_token(new) == "10.0.0.9:8000"  # signed with the first line


@pytest.mark.parametrize("content", [b"", b"\n \n", b"short\n", KEY_A + b"\nshort"])
def test_bad_key_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "keys"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="session key file"):
        configure_session_keys(str(path))


def test_key_file_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys"
    path.write_bytes(KEY_A)
    monkeypatch.setattr(session, "_keys", ())
    monkeypatch.setenv(session.SESSION_KEY_ENV, str(path))
    token = encode_session_token("10.0.0.1:1")
    configure_session_keys(keys=[KEY_A])
    assert decode_session_token(token) == "10.0.0.1:1"


def test_without_a_file_each_process_key_is_random() -> None:
    configure_session_keys()
    mine = encode_session_token("10.0.0.1:1")
    configure_session_keys()  # another process (or a restart)
    assert decode_session_token(mine) is None


def test_decode_cost() -> None:
    """Prints the cost (no timed assertion): one HMAC-SHA256 over ~20 bytes per token."""
    configure_session_keys(keys=[KEY_A])
    token = encode_session_token("10.200.13.7:8000")
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        decode_session_token(token)
    print(f"\ndecode_session_token: {(time.perf_counter() - t0) / n * 1e6:.2f} µs per token")
    assert decode_session_token(token) == "10.200.13.7:8000"

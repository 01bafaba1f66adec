"""`--session-key-file` on a real `python -m epp` process: a bad file stops the start with exit
status 2 and a clear message; a good one signs the session tokens the picker hands out, and a token
signed with an older key of the file (rotation) still routes, while one signed elsewhere does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from epp.scheduling import session
from tests.extproc_client import body_chunks, chat, exchange, request_headers, response_headers, set_headers
from tests.procs import free_port, free_ports, wait_serving

EPS = ["127.0.0.1:9", "127.0.0.1:10", "127.0.0.1:11"]
CURRENT, OLDER = b"k" * 32, b"an-older-key-still-accepted-0001"
START_BOUND = 60  # seconds a process may take to exit on a bad flag

CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: session-affinity-scorer
  parameters: {loadGuard: false}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: session-affinity-scorer
  - pluginRef: max-score-picker
"""


def _argv(*extra: str, port: int = 0, hport: int = 0) -> list[str]:
    return [sys.executable, "-m", "epp", "--pool-name", "p", "--endpoints", ",".join(EPS), "--secure-serving=false",
            "--grpc-port", str(port or free_port()), "--grpc-health-port", str(hport or free_port()),
            "--metrics-port", "0", "--bind-address", "127.0.0.1", "--log-format", "text", "--drain-timeout", "0",
            *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != session.SESSION_KEY_ENV}
    env.update(extra)
    return env


@pytest.fixture
def signing_keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This test process's own key table, restored afterwards (tokens are made and read here too)."""
    monkeypatch.setattr(session, "_keys", ())
    yield


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("case", ["missing", "empty", "short-key", "short-older-key", "directory"])
@pytest.mark.parametrize("via", ["flag", "env"])
def test_bad_key_file_exits_2_with_a_clear_message(tmp_path: Path, case: str, via: str) -> None:
    contents = {"empty": b"\n  \n", "short-key": b"tooshort\n", "short-older-key": CURRENT + b"\nshort\n"}
    if case in contents:
        path = _write(tmp_path / "keys", contents[case])
    else:
        path = str(tmp_path / "nope") if case == "missing" else str(tmp_path)
    args, env = (_argv("--session-key-file", path), _env()) if via == "flag" else (
        _argv(), _env(**{session.SESSION_KEY_ENV: path}))
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=START_BOUND, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()[-1]
    assert "--session-key-file" in err and path in err
    want = {"missing": "No such file", "empty": "no key", "short-key": "at least 16 bytes",
            "short-older-key": "at least 16 bytes", "directory": "directory"}[case]
    assert want in err


@pytest.fixture
def running_picker(tmp_path: Path) -> Iterator[Any]:
    """Start `python -m epp` with the given extra flags/env; every process is killed afterwards."""
    procs: list[subprocess.Popen[str]] = []

    def start(*extra: str, env: dict[str, str] | None = None) -> tuple[int, int]:
        port, hport = free_ports(2)
        p = subprocess.Popen(_argv("--config-text", CONFIG, *extra, port=port, hport=hport), env=env or _env(),
                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
        procs.append(p)
        return port, hport

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)


async def _route(port: int, token: str | None) -> tuple[str, str]:
    """(destination, x-session-token of the response) for one chat request."""
    extra = {session.SESSION_TOKEN_HEADER: token} if token else None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        replies = await asyncio.wait_for(exchange(ch, [
            request_headers(extra=extra), *body_chunks(chat()), response_headers(eos=True)]), 20)
    dest = set_headers(replies[0])["x-gateway-destination-endpoint"]
    resp = next(r for r in replies if r.WhichOneof("response") == "response_headers")
    return dest, set_headers(resp)[session.SESSION_TOKEN_HEADER]


def _signed(key: bytes, address: str) -> str:
    session.configure_session_keys(keys=[key])
    return session.encode_session_token(address)


@pytest.mark.parametrize("via", ["flag", "env"])
async def test_key_file_signs_and_rotates(tmp_path: Path, running_picker: Any, signing_keys: None, via: str) -> None:
    path = _write(tmp_path / "keys", CURRENT + b"\n" + OLDER + b"\n")
    if via == "flag":
        port, hport = running_picker("--session-key-file", path)
    else:
        port, hport = running_picker(env=_env(**{session.SESSION_KEY_ENV: path}))
    await wait_serving(hport)
    dest, token = await _route(port, None)
    # the picker signed with the file's first key: this process, holding only that key, reads it
    session.configure_session_keys(keys=[CURRENT])
    assert session.decode_session_token(token) == dest
    session.configure_session_keys(keys=[OLDER])
    assert session.decode_session_token(token) is None  # never signed with an older key
    for target in EPS:
        # a token of the current key and one of the older key both stick to their endpoint; the
        # answer carries a fresh token signed with the current key
        for key in (CURRENT, OLDER):
            for _ in range(3):
                got, fresh = await _route(port, _signed(key, target))
                assert got == target
                session.configure_session_keys(keys=[CURRENT])
                assert session.decode_session_token(fresh) == target


async def test_token_of_another_key_is_ignored(tmp_path: Path, running_picker: Any, signing_keys: None) -> None:
    """A token forged with a key the picker does not hold names no endpoint: with session affinity
    the only scorer, picks spread over the pool instead of sticking (15 picks on one of three
    endpoints by chance: 3 * (1/3)^15, about 2e-7)."""
    path = _write(tmp_path / "keys", CURRENT + b"\n")
    port, hport = running_picker("--session-key-file", path)
    await wait_serving(hport)
    forged = _signed(b"f" * 32, EPS[0])
    seen = {(await _route(port, forged))[0] for _ in range(15)}
    assert len(seen) > 1

"""`--client-ca-file`: mutual TLS on the picker's ext_proc port, checked with real grpc.aio TLS
clients (Envoy's side is tests/e2e/test_security.py::test_mutual_tls_to_the_picker).

Proves: only a client presenting a certificate signed by the CA gets a stream (none, one from
another CA, or a self-signed one fails the handshake); gRPC health on the ext_proc port is behind
the same check while the separate health port stays plaintext for probes; with
--enable-cert-reload a rotated CA bundle and serving pair apply to new connections, and a bad CA
file never replaces a good one; bad flags exit 2 with a clear message (a real process).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.certs import CA, Issued
from tests.extproc_client import body_chunks, chat, exchange, request_headers

EP = "127.0.0.1:9"
BOUND = 10.0  # seconds a refused or accepted exchange may take, at most


def _bump(path: Path, ns: int = 10**9) -> None:
    """Move a file's mtime on, so a rewrite within the same clock tick is still seen as a change."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + ns))


def _creds(root: bytes, client: Issued | None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=client.key.read_bytes(),
                                        certificate_chain=client.cert.read_bytes())


async def routed(port: int, root: bytes, client: Issued | None) -> bool:
    """One request on a fresh TLS connection: True when the picker answered with a pick."""
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", _creds(root, client)) as ch:
        try:
            replies = await asyncio.wait_for(exchange(ch, [request_headers(), *body_chunks(chat())]), BOUND)
        except (TimeoutError, grpc.aio.AioRpcError):
            return False
        return bool(replies) and replies[0].WhichOneof("response") == "request_headers"


def _pem(ca: CA) -> bytes:
    return ca.cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, object]:
    ca, other = CA("clients-ca"), CA("other-ca")
    return {
        "ca": ca,
        "other": other,
        "ca_file": ca.write(tmp_path / "client-ca.pem"),
        "server": ca.issue(tmp_path / "server", ["127.0.0.1", "localhost"]),
        "client": ca.issue(tmp_path / "client", ["envoy"], client=True),
        "stranger": other.issue(tmp_path / "stranger", ["envoy"], client=True),
    }


@pytest.mark.parametrize("reload", [False, True], ids=["static", "reload"])
async def test_only_clients_of_the_ca_get_a_stream(start_picker, pki, reload: bool) -> None:
    server, ca = pki["server"], pki["ca"]
    assert isinstance(server, Issued) and isinstance(ca, CA)
    app, _ = await start_picker(endpoints=[EP], secure_serving=True, cert_path=str(server.folder),
                                client_ca_file=str(pki["ca_file"]), enable_cert_reload=reload)
    root = _pem(ca)
    assert await routed(app.grpc_port, root, pki["client"])  # type: ignore[arg-type]
    assert not await routed(app.grpc_port, root, None)
    assert not await routed(app.grpc_port, root, pki["stranger"])  # type: ignore[arg-type]
    assert app.servicer.open_streams == 0


async def test_self_signed_client_certificate_is_refused(start_picker, pki, tmp_path: Path) -> None:
    server = pki["server"]
    assert isinstance(server, Issued)
    app, _ = await start_picker(endpoints=[EP], secure_serving=True, cert_path=str(server.folder),
                                client_ca_file=str(pki["ca_file"]))
    own = CA("envoy")  # a self-signed certificate used as the client's own
    folder = tmp_path / "self"
    folder.mkdir()
    (folder / "tls.crt").write_bytes(_pem(own))
    (folder / "tls.key").write_bytes(own.key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    assert not await routed(app.grpc_port, _pem(pki["ca"]), Issued(folder))  # type: ignore[arg-type]


async def _health(channel: grpc.aio.Channel) -> int:
    r = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="readiness"),
                                                        timeout=BOUND)
    return int(r.status)


async def test_health_on_the_extproc_port_needs_the_certificate_the_health_port_not(start_picker, pki) -> None:
    server, client = pki["server"], pki["client"]
    assert isinstance(server, Issued) and isinstance(client, Issued)
    app, _ = await start_picker(endpoints=[EP], secure_serving=True, cert_path=str(server.folder),
                                client_ca_file=str(pki["ca_file"]))
    root = _pem(pki["ca"])  # type: ignore[arg-type]
    serving = health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.secure_channel(f"127.0.0.1:{app.grpc_port}", _creds(root, client)) as ch:
        assert await _health(ch) == serving
    async with grpc.aio.secure_channel(f"127.0.0.1:{app.grpc_port}", _creds(root, None)) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _health(ch)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_health_port}") as ch:
        assert await _health(ch) == serving  # the kubelet's probes need no client certificate


async def test_reload_rotates_the_client_ca_and_keeps_a_good_one(start_picker, pki, tmp_path: Path) -> None:
    server, client, stranger = pki["server"], pki["client"], pki["stranger"]
    ca, other = pki["ca"], pki["other"]
    assert isinstance(server, Issued) and isinstance(ca, CA) and isinstance(other, CA)
    ca_file = Path(str(pki["ca_file"]))
    app, _ = await start_picker(endpoints=[EP], secure_serving=True, cert_path=str(server.folder),
                                client_ca_file=str(ca_file), enable_cert_reload=True)
    root = _pem(ca)
    assert await routed(app.grpc_port, root, client)  # type: ignore[arg-type]
    assert not await routed(app.grpc_port, root, stranger)  # type: ignore[arg-type]
    # a half-written (not PEM) bundle is not taken: the current CA still applies
    ca_file.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n")
    _bump(ca_file)
    assert await routed(app.grpc_port, root, client)  # type: ignore[arg-type]
    # the bundle now names the other CA only: its clients get in, the first CA's no longer
    ca_file.write_bytes(_pem(other))
    _bump(ca_file, 2 * 10**9)
    assert await routed(app.grpc_port, root, stranger)  # type: ignore[arg-type]
    assert not await routed(app.grpc_port, root, client)  # type: ignore[arg-type]
    # both CAs (rotation overlap): both kinds of client
    ca_file.write_bytes(_pem(other) + _pem(ca))
    _bump(ca_file, 3 * 10**9)
    assert await routed(app.grpc_port, root, stranger)  # type: ignore[arg-type]
    assert await routed(app.grpc_port, root, client)  # type: ignore[arg-type]
    # the serving pair rotates with the CA in place: a new server certificate from the other CA
    nxt = other.issue(tmp_path / "next", ["127.0.0.1", "localhost"])
    for name in ("tls.crt", "tls.key"):
        (server.folder / name).write_bytes((nxt.folder / name).read_bytes())
        _bump(server.folder / name, 4 * 10**9)
    assert await routed(app.grpc_port, _pem(other), client)  # type: ignore[arg-type]
    assert not await routed(app.grpc_port, root, client)  # type: ignore[arg-type]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "epp", "--pool-name", "p", "--endpoints", EP, "--grpc-port", "0",
                           "--grpc-health-port", "0", "--metrics-port", "0", "--bind-address", "127.0.0.1", *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("case", ["missing", "not-pem", "key-not-cert", "plaintext"])
def test_bad_client_ca_flag_exits_2(pki, tmp_path: Path, case: str) -> None:
    client = pki["client"]
    assert isinstance(client, Issued)
    path = {"missing": str(tmp_path / "nope.pem"), "not-pem": str(tmp_path / "junk.pem"),
            "key-not-cert": str(client.key), "plaintext": str(pki["ca_file"])}[case]
    (tmp_path / "junk.pem").write_text("hello\n")
    extra = ["--secure-serving=false"] if case == "plaintext" else []
    p = _run("--client-ca-file", path, *extra)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()[-1]
    assert "--client-ca-file" in err
    want = {"missing": "No such file", "not-pem": "no valid PEM certificate", "key-not-cert": "no valid PEM",
            "plaintext": "needs --secure-serving"}[case]
    assert want in err

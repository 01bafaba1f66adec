"""Serving certificates: a mounted pair is used, and with reload a rotated pair is served to new clients."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from epp import tls
from tests.extproc_client import body_chunks, chat, exchange, request_headers


def write_pair(path, pair: tls.KeyPair, bump: int = 0) -> None:
    for name, data in (("tls.crt", pair.cert), ("tls.key", pair.key)):
        f = path / name
        f.write_bytes(data)
        st = os.stat(f)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + bump))


async def routed_with(port: int, root: bytes) -> bool:
    creds = grpc.ssl_channel_credentials(root_certificates=root)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds,
                                       options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        try:
            replies = await asyncio.wait_for(exchange(ch, [request_headers(), *body_chunks(chat())]), 5)
        except (TimeoutError, grpc.aio.AioRpcError):
            return False
        return replies[0].WhichOneof("response") == "request_headers"


async def test_mounted_pair_and_reload(start_picker, tmp_path):
    first, second = tls.self_signed(["localhost"]), tls.self_signed(["localhost"])
    write_pair(tmp_path, first)
    app, _ = await start_picker(endpoints=["127.0.0.1:9"], secure_serving=True, cert_path=str(tmp_path),
                                enable_cert_reload=True)
    assert await routed_with(app.grpc_port, first.cert)
    assert not await routed_with(app.grpc_port, second.cert)  # a client trusting only the next cert
    write_pair(tmp_path, second, bump=2_000_000_000)
    assert await routed_with(app.grpc_port, second.cert)
    assert app.cert == second


def test_reload_needs_a_pair(tmp_path):
    with pytest.raises(FileNotFoundError):
        tls.ReloadingCert(str(tmp_path))

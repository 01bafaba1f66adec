"""epp.metrics.http against raw asyncio servers on 127.0.0.1 that frame their replies each way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from epp.metrics.http import HTTPGetError, PageConnection, PageTooLargeError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[int, list[int]]]]]:
    """`port, accepted = await serve(handler)`: a server calling `handler` per request on each
    connection until it returns; `accepted` grows by one per connection."""
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> tuple[int, list[int]]:
        accepted: list[int] = []

        async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(1)
            try:
                await handler(reader, writer)
            finally:
                writer.close()

        server = await asyncio.start_server(conn, "127.0.0.1", 0)
        servers.append(server)
        return server.sockets[0].getsockname()[1], accepted

    yield start
    for s in servers:
        s.close()
        await s.wait_closed()


async def _request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def keep_alive(reply: bytes, count: int = 100) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(count):
            try:
                await _request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(reply)
            await writer.drain()
    return handler


async def test_content_length_kept_alive(serve: Any) -> None:
    port, accepted = await serve(keep_alive(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"))
    conn = PageConnection("http", "127.0.0.1", port)
    assert [await conn.get("/metrics", 100) for _ in range(3)] == [b"hello"] * 3
    assert len(accepted) == 1  # one connection for every poll
    conn.close()


async def test_chunked_with_extensions_and_trailers(serve: Any) -> None:
    body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n"
    port, accepted = await serve(keep_alive(body))
    conn = PageConnection("http", "127.0.0.1", port)
    assert await conn.get("/m", 100) == b"abcde"
    assert await conn.get("/m", 100) == b"abcde"
    assert len(accepted) == 1
    with pytest.raises(PageTooLargeError):
        await conn.get("/m", 4)  # over the cap while reading the chunks
    conn.close()


async def test_close_delimited_and_connection_close(serve: Any) -> None:
    port, accepted = await serve(keep_alive(b"HTTP/1.0 200 OK\r\n\r\nall of it", count=1))
    conn = PageConnection("http", "127.0.0.1", port)
    assert await conn.get("/m", 100) == b"all of it"
    assert await conn.get("/m", 100) == b"all of it"  # a new connection each time
    assert len(accepted) == 2
    with pytest.raises(PageTooLargeError):
        await conn.get("/m", 5)
    conn.close()


async def test_errors_are_clear(serve: Any) -> None:
    port, _ = await serve(keep_alive(b"HTTP/1.1 302 Found\r\nLocation: http://x/\r\nContent-Length: 0\r\n\r\n"))
    conn = PageConnection("http", "127.0.0.1", port)
    with pytest.raises(HTTPGetError, match="HTTP 302"):  # redirects are not followed
        await conn.get("/m", 100)
    port, _ = await serve(keep_alive(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"))
    with pytest.raises(PageTooLargeError, match="99 bytes"):
        await PageConnection("http", "127.0.0.1", port).get("/m", 10)
    port, _ = await serve(keep_alive(b"SSH-2.0-OpenSSH\r\n\r\n"))
    with pytest.raises(HTTPGetError, match="not an HTTP"):
        await PageConnection("http", "127.0.0.1", port).get("/m", 10)
    port, _ = await serve(keep_alive(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n"))
    with pytest.raises(HTTPGetError, match="headers too large"):
        await PageConnection("http", "127.0.0.1", port).get("/m", 10)
    with pytest.raises(ValueError):
        PageConnection("ftp", "127.0.0.1", port)


async def test_an_idle_connection_the_server_closed_is_replaced_once(serve: Any) -> None:
    # the server answers one request per connection but claims keep-alive: the next get finds the
    # kept connection closed before any reply byte and retries on a fresh one
    port, accepted = await serve(keep_alive(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", count=1))
    conn = PageConnection("http", "127.0.0.1", port)
    assert await conn.get("/m", 100) == b"ok"
    await asyncio.sleep(0.05)  # let the server's close arrive
    assert await conn.get("/m", 100) == b"ok"
    assert len(accepted) == 2
    conn.close()


async def test_a_reply_cut_short_is_an_error_not_a_retry(serve: Any) -> None:
    port, accepted = await serve(keep_alive(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort", count=1))
    conn = PageConnection("http", "127.0.0.1", port)
    with pytest.raises(asyncio.IncompleteReadError):
        await conn.get("/m", 100)
    assert len(accepted) == 1

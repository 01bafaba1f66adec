"""A minimal keep-alive HTTP/1.1 GET for metrics pages, on raw asyncio streams.

The poller reads one small page per endpoint every 50 ms; aiohttp's request machinery (the
request/response objects, its header multidicts, its connector's bookkeeping) cost ~4x the
page's own parse at that rate. `PageConnection` keeps one connection per endpoint and does only
what a GET of a metrics page needs: one pre-built request, the status line, the two framing
headers (Content-Length, Transfer-Encoding: chunked; otherwise read to the close), and the size
cap enforced while reading (nothing past `limit` is ever buffered).

What a server can make it do is bounded: the status line and headers must fit in `HEAD_LIMIT`
bytes, the body in `limit`, chunk-size lines in one stream-reader line; anything else is a
`HTTPGetError` and the connection is dropped. The caller bounds the time (asyncio.timeout); a
cancelled or failed exchange closes the connection, since its state is then unknown.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_lib

HEAD_LIMIT = 64 * 1024  # status line + headers


class HTTPGetError(Exception):
    """The exchange failed; the message says why (a non-200 status reads `HTTP <code>`)."""


class PageTooLargeError(HTTPGetError):
    """The body passed the cap; the rest was not read."""


def _ssl_context(ssl: ssl_lib.SSLContext | bool) -> ssl_lib.SSLContext:
    if isinstance(ssl, ssl_lib.SSLContext):
        return ssl
    ctx = ssl_lib.create_default_context()
    if not ssl:  # aiohttp's ssl=False: encrypt, do not verify
        ctx.check_hostname = False
        ctx.verify_mode = ssl_lib.CERT_NONE
    return ctx


class PageConnection:
    """GETs of one URL (`scheme`, `host`, `port`; any path) over one kept-alive connection."""

    def __init__(self, scheme: str, host: str, port: int, ssl: ssl_lib.SSLContext | bool = True,
                 headers: dict[str, str] | None = None) -> None:
        """`host` as in the URL (an IPv6 address with or without brackets); `ssl` for https: a
        context, True (verify), or False (do not verify); `headers` sent with every request."""
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r}")
        self.host = host.strip("[]")
        self.port = port
        self._ssl = _ssl_context(ssl) if scheme == "https" else None
        host_header = f"[{self.host}]" if ":" in self.host else self.host
        if port != (443 if scheme == "https" else 80):
            host_header += f":{port}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._prefix = f"Host: {host_header}\r\n{extra}\r\n".encode("latin-1")
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        """Drop the connection (the next get opens a new one)."""
        writer = self._writer
        self._reader = self._writer = None
        if writer is not None:
            writer.close()

    async def get(self, target: str, limit: int) -> bytes:
        """The body of `GET target` (path and query, already encoded) if the status is 200."""
        reused = self._writer is not None
        try:
            return await self._exchange(target, limit)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            self.close()
            if reused and (not isinstance(e, asyncio.IncompleteReadError) or not e.partial):
                # the server closed the idle kept-alive connection before our request: once more, fresh
                try:
                    return await self._exchange(target, limit)
                except BaseException:
                    self.close()
                    raise
            raise
        except BaseException:
            self.close()
            raise

    async def _exchange(self, target: str, limit: int) -> bytes:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, ssl=self._ssl, limit=HEAD_LIMIT,
                server_hostname=self.host if self._ssl is not None else None)
        reader, writer = self._reader, self._writer
        assert reader is not None
        writer.write(b"GET " + target.encode("latin-1") + b" HTTP/1.1\r\n" + self._prefix)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as e:
            raise HTTPGetError("response headers too large") from e
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise HTTPGetError("not an HTTP/1.x response")
        status = parts[1]
        length: int | None = None
        chunked = False
        keep = parts[0] != "HTTP/1.0"
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                continue
            name = name.strip().lower()
            if name == "content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    raise HTTPGetError("bad Content-Length") from None
                if length < 0:
                    raise HTTPGetError("bad Content-Length")
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection":
                v = value.strip().lower()
                keep = v == "keep-alive" if not keep else v != "close"
        if status != "200":
            self.close()  # an error page is not worth reading; the connection goes with it
            raise HTTPGetError(f"HTTP {status}")
        if chunked:
            body = await self._chunked(reader, limit)
        elif length is not None:
            if length > limit:
                raise PageTooLargeError(f"page of {length} bytes is over the {limit}-byte cap")
            body = await reader.readexactly(length)
        else:  # delimited by the close
            body = await reader.read(limit + 1)
            while len(body) <= limit:
                more = await reader.read(limit + 1 - len(body))
                if not more:
                    break
                body += more
            if len(body) > limit:
                raise PageTooLargeError(f"page passed the {limit}-byte cap")
            keep = False
        if not keep:
            self.close()
        return body

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as e:
                raise HTTPGetError("chunk size line too long") from e
            try:
                n = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HTTPGetError("bad chunk size") from None
            if n == 0:
                # trailers, if any, end with an empty line
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return b"".join(parts)
            size += n
            if size > limit:
                raise PageTooLargeError(f"page passed the {limit}-byte cap")
            data = await reader.readexactly(n + 2)
            parts.append(data[:-2])

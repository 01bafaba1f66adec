"""A hostile HTTP/2 client for the security tests: one POST whose body goes out as many tiny DATA
frames (the `h2` package over a plain asyncio socket, prior knowledge h2c, no TLS).

Every step is bounded: the whole exchange has a deadline, and a peer that resets the stream or the
connection ends it with what was seen so far.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions


@dataclass
class H2Reply:
    """What the hostile client saw: the response status (0 when none came), its body, and how it ended."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    reset: bool = False  # the stream or the connection was reset before the response ended
    frames_sent: int = 0


async def tiny_frames_post(
    host: str,
    port: int,
    path: str,
    body: bytes,
    frame_size: int = 10,
    headers: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> H2Reply:
    """POST `body` to `host:port` as DATA frames of `frame_size` bytes each (one h2c stream) and
    return the reply. The frames go out in one burst when the peer's flow-control windows allow
    (Envoy's do for a few hundred KB); otherwise as the windows open."""
    return await asyncio.wait_for(_post(host, port, path, body, frame_size, headers or {}), timeout)


async def _post(host: str, port: int, path: str, body: bytes, frame_size: int, headers: Mapping[str, str]) -> H2Reply:
    reader, writer = await asyncio.open_connection(host, port)
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    reply = H2Reply()
    done = False

    def handle(data: bytes) -> None:
        nonlocal done
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                hdrs = dict(event.headers)  # type: ignore[arg-type]
                reply.status = int(hdrs.get(":status", "0"))
                reply.headers = {str(k): str(v) for k, v in hdrs.items()}
            elif isinstance(event, h2.events.DataReceived):
                reply.body += event.data or b""
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                done = True
            elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                reply.reset = True
                done = True

    async def pump(wait: float) -> None:
        """Flush what h2 queued, then read once (at most `wait` seconds) and handle it."""
        writer.write(conn.data_to_send())
        await writer.drain()
        try:
            data = await asyncio.wait_for(reader.read(65536), wait)
        except TimeoutError:
            return
        if not data:
            raise ConnectionError("peer closed the connection")
        handle(data)
        writer.write(conn.data_to_send())

    try:
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        req = [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", f"{host}:{port}"),
               ("content-type", "application/json"), *headers.items()]
        conn.send_headers(sid, req)
        for _ in range(5):  # Envoy's SETTINGS and WINDOW_UPDATE: usually the whole body fits at once
            if conn.local_flow_control_window(sid) >= len(body):
                break
            await pump(0.2)
        pos = 0
        while pos < len(body) and not done:
            size = min(frame_size, conn.max_outbound_frame_size)  # at most what the peer accepts
            if conn.local_flow_control_window(sid) < min(size, len(body) - pos):
                await pump(1.0)
                continue
            chunk = body[pos : pos + size]
            conn.send_data(sid, chunk)
            pos += len(chunk)
            reply.frames_sent += 1
        # written in one burst (when the windows allow): Envoy decodes the frames as fast as it can
        if not done:
            conn.end_stream(sid)
        while not done:
            await pump(5.0)
    except (ConnectionError, h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
        reply.reset = True
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return reply

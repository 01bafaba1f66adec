"""A small gRPC server over HTTP/2 on the serving loop itself, for the picker's few methods.

Why not grpc.aio: its C core runs the sockets on its own threads and hands every message to the
asyncio loop across a thread hop and a loop wake-up; at the rates a picker sees (messages arriving
one by one) that hop, not the decision, was most of the picker's CPU per request
(docs/benchmarks.md, "Picker cost"). Here a connection is an asyncio protocol: Envoy's frames are
read, parsed and answered in the same loop iteration, with one write a batch.

What it speaks: HTTP/2 (RFC 9113) as a server: prior knowledge over plaintext, or TLS with ALPN
`h2` (optionally requiring a client certificate); HPACK (RFC 7541) decoding by `hpack`, answers
encoded without the dynamic table; flow control both ways (a stream's unread messages stop its
window, so a client cannot queue more than the window ahead of a busy handler); gRPC's
length-prefixed messages, uncompressed; status in trailers. What it leaves out on purpose:
compression (`grpc-encoding`: refused as UNIMPLEMENTED, Envoy never compresses ext_proc), server
push, priorities (parsed, ignored), `grpc-timeout` (Envoy bounds each ext_proc message itself).

Handlers keep grpc.aio's shapes, so the servicers run on either server: a stream-stream handler is
`await handler(None, context)` using `context.read()` / `context.write()`; unary-unary returns its
response; unary-stream writes with `context.write()`. The ext_proc stream is the exception that
pays: a `StreamSteps` handler is called message by message from the read callback itself, with no
task a stream (a task only while a step waits: flow control's queue, or a full client window).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import tempfile
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import grpc
import hpack

from epp import handoff

log = logging.getLogger("epp.h2server")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# flags
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x6, 0x7, 0x8, 0x9, 0xB
STREAM_CLOSED = 0x5
# settings
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65535
DEFAULT_FRAME = 16384

# what this server offers its clients
STREAM_WINDOW = 4 << 20  # bytes a client may send a stream ahead of its handler
CONN_WINDOW = 64 << 20
RECV_FRAME = 1 << 20  # large frames: a 200 KB body is one frame, not thirteen
MAX_STREAMS = 10_000
MAX_HEADER_BLOCK = 64 << 10  # encoded header block (HEADERS + CONTINUATION), then the connection goes
MAX_HEADER_FRAMES = 64  # frames of one header block (a 64 KiB block needs 4 at the smallest frame size)
MAX_RAISE_WORK = 100_000  # waiting streams a connection's larger initial windows may make us look at
MAX_HEADER_LIST = 64 << 10
PARTIAL_CAP = 128 << 20  # bytes of unfinished messages a connection may hold before its window stops
PREFACE_TIMEOUT = 10.0  # seconds a connection may stay silent before its HTTP/2 preface
HANDSHAKE_TIMEOUT = 10.0  # seconds a TLS handshake may take

_FRAME = struct.Struct(">IBI")  # (24-bit length << 8 | type), flags, stream id: 9 bytes
_HDR = struct.Struct(">HBBBI")  # writing: length hi 16 bits, lo 8 bits, type, flags, stream id
_U32 = struct.Struct(">I")

# answers, HPACK-encoded without the dynamic table (so no encoder state): ':status: 200'
# (static index 8) and 'content-type: application/grpc' (literal, name at static index 31)
_RESPONSE_HEADERS = b"\x88\x0f\x10\x10application/grpc"


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header field 'literal without indexing, new name' (RFC 7541 §6.2.2), no Huffman."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _status_block(code: int, details: str) -> bytes:
    block = _literal(b"grpc-status", str(code).encode())
    if details:
        # grpc-message is percent-encoded UTF-8 (the gRPC HTTP/2 spec)
        block += _literal(b"grpc-message", quote(details, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode())
    return block


_OK_TRAILERS = _status_block(0, "")


def _grpc_message(payload: bytes) -> bytes:
    """gRPC's length-prefixed message, uncompressed."""
    return b"\x00" + _U32.pack(len(payload)) + payload


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HDR.pack(n >> 8, n & 0xFF, ftype, flags, stream_id) + payload


class RpcError(Exception):
    """Raised by `context.abort()`: ends the call with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC: its kind ('unary_unary', 'unary_stream', 'stream_stream' with grpc.aio's
    servicer method shapes, or 'stream_steps' with a StreamSteps handler), how to read its
    request, and the handler."""

    kind: str
    deserialize: Callable[[Any], Any]  # bytes or a memoryview of them
    handler: Any


class StreamSteps(Protocol):
    """A bidirectional stream driven message by message on the connection's own callbacks: no
    task a stream unless a step must wait (the ext_proc servicer: flow control's queue)."""

    def stream_open(self) -> Any: ...
    def stream_message(self, state: Any, msg: Any) -> list[Any] | None: ...  # None: await stream_wait
    async def stream_wait(self, state: Any) -> list[Any]: ...
    def stream_written(self, state: Any) -> None: ...
    def stream_close(self, state: Any) -> None: ...


def servicer_methods(service: str, servicer: Any, methods: dict[str, tuple[str, Any]]) -> dict[str, Method]:
    """Methods of a servicer by path: `methods` maps a method name to (kind, request type)."""
    return {f"/{service}/{name}": Method(kind, rtype.FromString, getattr(servicer, name))
            for name, (kind, rtype) in methods.items()}


_CODE_NUMBER = {c: c.value[0] for c in grpc.StatusCode}


class Context:
    """What a handler sees of its call: grpc.aio's `ServicerContext` subset the picker uses."""

    __slots__ = ("_code", "_details", "_stream")

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream
        self._code: grpc.StatusCode | None = None
        self._details = ""

    async def read(self) -> Any:
        """The next request message, or `grpc.aio.EOF` once the client has finished sending."""
        st = self._stream
        while not st.inbox:
            if st.remote_closed:
                return grpc.aio.EOF
            st.waiter = st.conn.loop.create_future()
            try:
                await st.waiter
            finally:
                st.waiter = None
        msg = st.inbox.popleft()
        if not st.inbox:
            st.conn.credit(st)  # caught up: the bytes held back may come now
        return msg

    async def write(self, message: Any) -> None:
        """Send one response message (waits while the client's flow-control window is full)."""
        await self._stream.conn.send_message(self._stream, message.SerializeToString())

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise RpcError(code, details)

    def cancelled(self) -> bool:
        return self._stream.reset

    def done(self) -> bool:
        return self._stream.local_closed



class _Stream:
    __slots__ = (
        "blocked",
        "buf",
        "conn",
        "credit",
        "headers_sent",
        "held",
        "id",
        "inbox",
        "local_closed",
        "method",
        "remote_closed",
        "reset",
        "send_adjust",
        "state",
        "task",
        "waiter",
        "want",
    )

    def __init__(self, sid: int, conn: _Conn, method: Method | None) -> None:
        self.id = sid
        self.conn = conn
        self.method = method
        self.inbox: deque[Any] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.buf = bytearray()  # a message still arriving
        self.remote_closed = False
        self.local_closed = False
        # its window toward the client less the client's SETTINGS_INITIAL_WINDOW_SIZE: a change of
        # that setting then moves every stream's window at once, at no cost per stream
        self.send_adjust = 0
        self.headers_sent = False
        self.task: asyncio.Task[None] | None = None
        self.reset = False
        self.held = 0  # bytes received while messages sat unread: credited when the handler catches up
        self.credit = 0  # bytes read but not yet handed back in a WINDOW_UPDATE
        self.blocked: asyncio.Future[None] | None = None  # a write waiting for window
        self.want = 0  # bytes that write still has to send (how much window waking it may use)
        self.state: Any = None  # a StreamSteps handler's state while open, else None


class _ProtocolError(Exception):
    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


class _Conn(asyncio.Protocol):
    """One client connection: frames in, handler tasks per stream, frames out."""

    def __init__(self, server: GrpcServer, on_lost: Callable[[], None] | None = None) -> None:
        self.server = server
        self.on_lost = on_lost  # a connection handed over by a --workers supervisor: tell it it is gone
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = 0  # bytes `buf` must hold before the frame in it can be read
        self.preface = False
        self.streams: dict[int, _Stream] = {}
        self.last_id = 0
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        # Envoy sends the same header block for every ext_proc stream once its table is warm: a
        # block seen before that changed nothing in the table is answered from this cache
        self.table_gen = 0  # bumped by every insertion into the decoder's dynamic table
        self.block_cache: dict[bytes, tuple[tuple[int, int], Any]] = {}
        table = self.decoder.header_table
        insert = table.add

        def counted_add(name: bytes, value: bytes) -> None:
            self.table_gen += 1
            insert(name, value)

        table.add = counted_add  # type: ignore[method-assign]
        self.peer_window = DEFAULT_WINDOW  # the client's SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_frame = DEFAULT_FRAME
        self.send_window = DEFAULT_WINDOW  # connection-level, toward the client
        self.recv_credit = 0  # connection-level bytes to hand back in one WINDOW_UPDATE
        self.headers_for = 0  # a header block continuing in CONTINUATION frames
        self.header_parts: list[bytes] = []
        self.header_bytes = 0  # the block so far, frame heads included (MAX_HEADER_BLOCK)
        self.header_flags = 0
        self.out: list[bytes] = []
        # stream id -> the slice of `out` holding its last frames, until written: Envoy ends each
        # ext_proc stream with END_STREAM and RST_STREAM together, and nothing may be sent on a
        # stream the client has reset (RFC 9113 §5.1), so the trailers of such a stream are dropped
        self.unsent_ends: dict[int, tuple[int, int]] = {}
        self.flush_scheduled = False
        self.closing = False
        self.goaway_sent = False
        # writes waiting for window, oldest first: for the connection's (their own window is open),
        # and for their own (woken by its WINDOW_UPDATE or a larger initial window, never by the
        # connection's: a one-byte update for the connection must not wake every waiting stream)
        # (OrderedDict: taking the oldest is O(1) however many were taken before, unlike a dict's)
        self.blocked: OrderedDict[_Stream, None] = OrderedDict()
        self.blocked_own: dict[_Stream, None] = {}
        self.wakeups = 0  # writes woken for window (tests: each wake-up could send)
        self.raise_work = 0  # streams looked at for larger initial windows (MAX_RAISE_WORK)
        self.idle: asyncio.Future[None] | None = None  # set on shutdown: resolved when no stream is left
        self.partial = 0  # bytes of messages still arriving, all streams
        self.conn_held = 0  # connection window held back while `partial` is over PARTIAL_CAP
        self.writable: asyncio.Future[None] | None = None  # set while the transport's buffer is full

    # ---- transport ----------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio's classes
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.conns.add(self)
        self.transport = transport
        settings = b"".join(struct.pack(">HI", k, v) for k, v in (
            (S_MAX_CONCURRENT_STREAMS, MAX_STREAMS), (S_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (S_MAX_FRAME_SIZE, RECV_FRAME), (S_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST), (S_ENABLE_PUSH, 0)))
        self._send(_frame(SETTINGS, 0, 0, settings))
        self._send(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONN_WINDOW - DEFAULT_WINDOW)))
        if self.server.shutting_down:
            self.goaway(NO_ERROR)
        self.loop.call_later(PREFACE_TIMEOUT, self._preface_check)

    def _preface_check(self) -> None:
        if not self.preface and not self.closing and self.transport is not None:
            self.closing = True  # a silent connection holds a socket and nothing else: it goes
            self.transport.close()

    def pause_writing(self) -> None:
        """The client reads slower than we write: stop reading its frames (a PING flood then
        waits on its own unread answers) and hold the writers."""
        if self.writable is None:
            self.writable = self.loop.create_future()
        if self.transport is not None and not self.closing:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        w, self.writable = self.writable, None
        if w is not None and not w.done():
            w.set_result(None)
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.conns.discard(self)
        for st in list(self.streams.values()):
            self._abandon(st)
        self.streams.clear()
        for st in [*self.blocked, *self.blocked_own]:
            if st.blocked is not None and not st.blocked.done():
                st.blocked.set_result(None)
        self.blocked.clear()
        self.blocked_own.clear()
        self.resume_writing()
        self._check_idle()
        if self.on_lost is not None:
            self.on_lost()

    def _send(self, data: bytes) -> None:
        """Queue bytes for the client; everything queued in one loop iteration is one write."""
        self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        tr = self.transport
        out, self.out = self.out, []
        if self.unsent_ends:
            self.unsent_ends.clear()
        if tr is not None and not tr.is_closing() and out:
            data = b"".join(out) if len(out) > 1 else out[0]
            if data:
                tr.write(data)

    def close(self, code: int, why: str) -> None:
        """End the connection: GOAWAY with `code`, then close once the bytes are out."""
        if self.closing:
            return
        log.info("HTTP/2 connection closed by the server: %s", why, extra={"code": code, "why": why})
        self._send(_frame(GOAWAY, 0, 0, _U32.pack(self.last_id) + _U32.pack(code) + why.encode()[:256]))
        self._flush()
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def goaway(self, code: int) -> None:
        """Graceful: no new streams past the last one seen; open ones carry on."""
        if self.goaway_sent or self.closing:
            return
        self.goaway_sent = True
        self._send(_frame(GOAWAY, 0, 0, _U32.pack(self.last_id) + _U32.pack(code)))

    # ---- frames in ----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.buf:  # the tail of a frame from the last read
            self.buf += data
            if len(self.buf) < self.need:
                return  # a large frame still arriving: copied once, when whole
            data = bytes(self.buf)
            self.buf.clear()
        try:
            if not self.preface:
                if len(data) < len(PREFACE):
                    if not PREFACE.startswith(data):
                        raise _ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                    self.buf += data
                    return
                if not data.startswith(PREFACE):
                    raise _ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                data = data[len(PREFACE):]
                self.preface = True
            # frames are read from the (immutable) bytes of this read: a payload view a handler
            # keeps, or a traceback, never pins a buffer that must change
            view = memoryview(data)
            pos, n = 0, len(data)
            while n - pos >= 9:
                word, flags, sid = _FRAME.unpack_from(data, pos)
                length, ftype = word >> 8, word & 0xFF
                if length > RECV_FRAME:
                    raise _ProtocolError(FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
                end = pos + 9 + length
                if end > n:
                    self.need = end - pos
                    break
                self._frame_in(ftype, flags, sid & 0x7FFFFFFF, view[pos + 9:end])
                pos = end
                if self.closing:
                    return
            if pos < n:
                if n - pos < 9:
                    self.need = 9
                self.buf += view[pos:]
        except _ProtocolError as e:
            self.close(e.code, str(e))
        except hpack.HPACKError as e:
            self.close(COMPRESSION_ERROR, f"header block: {e}")

    def _frame_in(self, ftype: int, flags: int, sid: int, payload: memoryview) -> None:
        if self.headers_for and ftype != CONTINUATION:
            raise _ProtocolError(PROTOCOL_ERROR, "header block interrupted")
        if ftype == DATA:
            self._data(flags, sid, payload)
        elif ftype == HEADERS:
            self._headers(flags, sid, payload)
        elif ftype == CONTINUATION:
            if sid != self.headers_for or not sid:
                raise _ProtocolError(PROTOCOL_ERROR, "unexpected CONTINUATION")
            self._header_fragment(bytes(payload), flags)
        elif ftype == SETTINGS:
            self._settings(flags, sid, payload)
        elif ftype == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif ftype == PING:
            if sid or len(payload) != 8:
                raise _ProtocolError(PROTOCOL_ERROR if sid else FRAME_SIZE_ERROR, "bad PING")
            if not flags & ACK:
                self._send(_frame(PING, ACK, 0, bytes(payload)))
        elif ftype == RST_STREAM:
            if not sid or len(payload) != 4:
                raise _ProtocolError(PROTOCOL_ERROR, "bad RST_STREAM")
            st = self.streams.pop(sid, None)
            if st is not None:
                self._abandon(st)
                self._check_idle()
            end = self.unsent_ends.pop(sid, None)
            if end is not None:  # reset before its trailers went out: they are not sent (saves a write)
                for i in range(*end):
                    self.out[i] = b""
        elif ftype == GOAWAY:
            self.goaway(NO_ERROR)  # the client stops; we answer what is open and end with it
            self._check_idle()
        elif ftype == PUSH_PROMISE:
            raise _ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        elif ftype == PRIORITY:
            if not sid or len(payload) != 5:
                raise _ProtocolError(PROTOCOL_ERROR, "bad PRIORITY")
        # unknown frame types are ignored (RFC 9113 §4.1)

    @staticmethod
    def _unpad(flags: int, payload: memoryview) -> memoryview:
        if flags & PADDED:
            if not payload:
                raise _ProtocolError(PROTOCOL_ERROR, "padded frame without a pad length")
            pad = payload[0]
            if pad >= len(payload):
                raise _ProtocolError(PROTOCOL_ERROR, "padding longer than the frame")
            return payload[1:len(payload) - pad]
        return payload

    def _headers(self, flags: int, sid: int, payload: memoryview) -> None:
        if not sid:
            raise _ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        body = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(body) < 5:
                raise _ProtocolError(PROTOCOL_ERROR, "short HEADERS priority")
            body = body[5:]
        self.headers_for = sid
        self.header_flags = flags
        self.header_parts = []
        self.header_bytes = 0
        self._header_fragment(bytes(body), flags)

    def _header_fragment(self, part: bytes, flags: int) -> None:
        # O(1) a frame, and each frame counts with its 9-byte head: a block that never ends in
        # empty CONTINUATION frames (the "CONTINUATION flood") hits the caps like a large one
        self.header_parts.append(part)
        self.header_bytes += 9 + len(part)
        if self.header_bytes > MAX_HEADER_BLOCK or len(self.header_parts) > MAX_HEADER_FRAMES:
            raise _ProtocolError(ENHANCE_YOUR_CALM, "header block too large")
        if not flags & END_HEADERS:
            return
        sid, self.headers_for = self.headers_for, 0
        block = self.header_parts[0] if len(self.header_parts) == 1 else b"".join(self.header_parts)
        self.header_parts = []
        self.header_bytes = 0
        # decoded even for streams we refuse: the HPACK table must stay in step with the client's
        table = self.decoder.header_table
        state = (self.table_gen, table.maxsize)
        hit = self.block_cache.get(block)
        if hit is not None and hit[0] == state:
            fields = hit[1]
        else:
            fields = self.decoder.decode(block, raw=True)
            if (self.table_gen, table.maxsize) == state and len(block) <= 1024:  # it only read the table
                if len(self.block_cache) >= 64:
                    self.block_cache.clear()
                self.block_cache[block] = (state, fields)
        self._header_block(sid, self.header_flags, fields)

    def _header_block(self, sid: int, flags: int, fields: Any) -> None:
        st = self.streams.get(sid)
        if st is not None:  # trailers from the client: only END_STREAM matters
            if not flags & END_STREAM:
                raise _ProtocolError(PROTOCOL_ERROR, "headers in the middle of a stream")
            self._remote_end(st)
            return
        if sid % 2 == 0 or sid <= self.last_id:
            if sid % 2 == 0:
                raise _ProtocolError(PROTOCOL_ERROR, "even stream id from a client")
            self._send(_frame(RST_STREAM, 0, sid, _U32.pack(STREAM_CLOSED)))  # an old stream's late headers
            return
        self.last_id = sid
        if self.goaway_sent:
            self._send(_frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
            return
        if len(self.streams) >= MAX_STREAMS:
            self._send(_frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
            return
        path = b""
        encoding = b""
        for name, value in fields:
            if name == b":path":
                path = value
            elif name == b"grpc-encoding":
                encoding = value
        method = self.server.methods.get(path.decode("latin-1"))
        st = _Stream(sid, self, method)
        self.streams[sid] = st
        if flags & END_STREAM:
            st.remote_closed = True
        if method is None:
            self._finish(st, grpc.StatusCode.UNIMPLEMENTED, f"unknown method {path.decode('latin-1')!r}")
            return
        if encoding not in (b"", b"identity"):
            self._finish(st, grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not supported")
            return
        if method.kind == "stream_steps":
            st.state = method.handler.stream_open()
            if st.remote_closed:
                self._steps_end(st, grpc.StatusCode.OK)
            return
        st.task = self.loop.create_task(self._run(st, method))

    def _data(self, flags: int, sid: int, payload: memoryview) -> None:
        if not sid:
            raise _ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        st = self.streams.get(sid)
        if st is None or st.remote_closed:
            # a stream we ended or reset: its bytes still count against the connection window
            self._credit_conn(size)
            if sid > self.last_id:
                raise _ProtocolError(PROTOCOL_ERROR, "DATA on an idle stream")
            return
        body = self._unpad(flags, payload)
        if body:
            if not st.buf and self._whole(st, body):
                pass  # the usual frame: whole messages, read in place
            else:
                st.buf += body
                self.partial += len(body)
                self._messages(st)
        if st.inbox:
            st.held += size  # unread messages: this stream's window waits for its handler
        else:
            self._credit_conn(size)
            self._credit_stream(st, size)
        if flags & END_STREAM:
            self._remote_end(st)

    def _whole(self, st: _Stream, body: memoryview) -> bool:
        """Read body in place when it is exactly one message (no copy); False: use the buffer."""
        if len(body) < 5 or body[0]:
            return False
        (length,) = _U32.unpack_from(body, 1)
        if len(body) != 5 + length or length > self.server.max_receive:
            return False
        self._parse(st, body[5:])
        return True

    def _parse(self, st: _Stream, raw: Any) -> bool:
        """One request message to its handler; False (the stream failed) when it does not parse."""
        assert st.method is not None
        try:
            msg = st.method.deserialize(raw)
        except Exception:
            self._fail(st, grpc.StatusCode.INTERNAL, "could not parse the request message")
            return False
        self._deliver(st, msg)
        return True

    def _deliver(self, st: _Stream, msg: Any) -> None:
        if st.state is not None and st.task is None and not st.inbox:
            self._step(st, msg)
            return
        st.inbox.append(msg)
        if st.waiter is not None and not st.waiter.done():
            st.waiter.set_result(None)

    def _messages(self, st: _Stream) -> None:
        buf = st.buf
        limit = self.server.max_receive
        while len(buf) >= 5:
            flag = buf[0]
            (length,) = _U32.unpack_from(buf, 1)
            if flag:
                self._fail(st, grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not supported")
                return
            if length > limit:
                self._fail(st, grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"Received message larger than max ({length} vs. {limit})")
                return
            if len(buf) < 5 + length or st.local_closed:
                return
            raw = bytes(buf[5:5 + length])
            del buf[:5 + length]
            self._partial(-5 - length)
            if not self._parse(st, raw):
                return

    def _remote_end(self, st: _Stream) -> None:
        st.remote_closed = True
        if st.buf:
            self._fail(st, grpc.StatusCode.INTERNAL, "the request ended inside a message")
            return
        if st.waiter is not None and not st.waiter.done():
            st.waiter.set_result(None)
        if st.state is not None and st.task is None and not st.inbox:
            self._steps_end(st, grpc.StatusCode.OK)
            return
        self._maybe_done(st)

    # ---- StreamSteps: a stream with no task of its own ---------------------------------------
    def _step(self, st: _Stream, msg: Any) -> None:
        steps = st.method.handler  # type: ignore[union-attr]
        try:
            replies = steps.stream_message(st.state, msg)
        except Exception:
            log.exception("stream step failed")
            self._steps_end(st, grpc.StatusCode.UNKNOWN, "Unexpected error")
            return
        if replies is None:
            st.task = self.loop.create_task(self._steps_task(st, None))
            return
        payloads = [r.SerializeToString() for r in replies]
        del replies
        if not self._send_now(st, payloads):
            st.task = self.loop.create_task(self._steps_task(st, payloads))
            return
        steps.stream_written(st.state)

    def _send_now(self, st: _Stream, payloads: list[bytes]) -> bool:
        """Every reply out at once when the windows allow (the usual case); False (nothing sent)
        otherwise, and a task sends them as the client's windows open."""
        total = sum(len(p) + 5 for p in payloads)
        limit = self.server.max_send
        if (self.writable is not None or total > self.send_window or total > self.peer_window + st.send_adjust
                or any(len(p) > self.peer_frame - 5 for p in payloads)
                or (limit is not None and any(len(p) > limit for p in payloads))):
            return False
        self._headers_out(st)
        for p in payloads:
            self._send(_frame(DATA, 0, st.id, _grpc_message(p)))
        self.send_window -= total
        st.send_adjust -= total
        return True

    async def _steps_task(self, st: _Stream, payloads: list[bytes] | None) -> None:
        """A step that must wait (queued, or windows full), then the messages that came meanwhile."""
        steps = st.method.handler  # type: ignore[union-attr]
        code, details = grpc.StatusCode.OK, ""
        try:
            while True:
                if payloads is None:
                    payloads = [r.SerializeToString() for r in await steps.stream_wait(st.state)]
                for p in payloads:
                    await self.send_message(st, p)
                payloads = None
                steps.stream_written(st.state)
                if not st.inbox:
                    break
                msg = st.inbox.popleft()
                if not st.inbox:
                    self.credit(st)
                replies = steps.stream_message(st.state, msg)
                if replies is not None:
                    payloads = [r.SerializeToString() for r in replies]
                    del replies
        except asyncio.CancelledError:
            # closed only now: a decision that completed as the reset came is finished with it
            self._steps_close(st)
            if not st.reset and not self.closing:
                raise
            return
        except RpcError as e:
            code, details = e.code, e.details
        except Exception:
            log.exception("stream step failed")
            code, details = grpc.StatusCode.UNKNOWN, "Unexpected error"
        finally:
            st.task = None
        if code != grpc.StatusCode.OK or st.remote_closed:
            self._steps_end(st, code, details)

    def _steps_end(self, st: _Stream, code: grpc.StatusCode, details: str = "") -> None:
        self._steps_close(st)
        self._finish(st, code, details)

    def _steps_close(self, st: _Stream) -> None:
        state, st.state = st.state, None
        if state is not None:
            try:
                st.method.handler.stream_close(state)  # type: ignore[union-attr]
            except Exception:
                log.exception("stream close failed")

    def _settings(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid:
            raise _ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise _ProtocolError(FRAME_SIZE_ERROR, "SETTINGS length")
        before = self.peer_window
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ProtocolError(FLOW_CONTROL_ERROR, "initial window too large")
                self.peer_window = value  # every stream's window moves with it (_Stream.send_adjust)
            elif key == S_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= (1 << 24) - 1:
                    raise _ProtocolError(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self.peer_frame = value
            # the table size the client's decoder allows needs nothing: answers never index
        if self.peer_window > before and self.blocked_own:
            # a larger initial window may open streams waiting for their own: each raise looks at
            # all of them, so a client that keeps lowering and raising it is stopped
            self.raise_work += len(self.blocked_own)
            if self.raise_work > MAX_RAISE_WORK:
                raise _ProtocolError(ENHANCE_YOUR_CALM, "too many initial window changes")
            for st in [st for st in self.blocked_own if self.peer_window + st.send_adjust > 0]:
                del self.blocked_own[st]
                self.blocked[st] = None
        self._send(_frame(SETTINGS, ACK, 0))
        self._unblock()

    def _window_update(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise _ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        (inc,) = _U32.unpack_from(payload, 0)
        inc &= 0x7FFFFFFF
        if sid == 0:
            if not inc:
                raise _ProtocolError(PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                raise _ProtocolError(FLOW_CONTROL_ERROR, "connection window overflow")
        else:
            st = self.streams.get(sid)
            if st is None:
                return
            if not inc:
                self._fail(st, grpc.StatusCode.INTERNAL, "zero WINDOW_UPDATE", rst=PROTOCOL_ERROR)
                return
            st.send_adjust += inc
            if self.peer_window + st.send_adjust > MAX_WINDOW:
                self._fail(st, grpc.StatusCode.INTERNAL, "stream window overflow", rst=FLOW_CONTROL_ERROR)
                return
            if st in self.blocked_own and self.peer_window + st.send_adjust > 0:
                del self.blocked_own[st]
                self.blocked[st] = None
        self._unblock()

    # ---- flow control toward us ---------------------------------------------------------------
    def _partial(self, delta: int) -> None:
        self.partial += delta
        if delta < 0 and self.conn_held and self.partial <= PARTIAL_CAP:
            n, self.conn_held = self.conn_held, 0
            self._credit_conn(n)

    def _credit_conn(self, n: int) -> None:
        if self.partial > PARTIAL_CAP:
            self.conn_held += n  # many unfinished messages: the client waits until some complete
            return
        self.recv_credit += n
        if self.recv_credit >= CONN_WINDOW // 2:
            self._send(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.recv_credit)))
            self.recv_credit = 0

    def _credit_stream(self, st: _Stream, n: int) -> None:
        # a stream's bytes go back once they add up to half its window: few WINDOW_UPDATEs
        st.credit += n
        if st.credit >= STREAM_WINDOW // 2 and not st.remote_closed:
            self._send(_frame(WINDOW_UPDATE, 0, st.id, _U32.pack(st.credit)))
            st.credit = 0

    def credit(self, st: _Stream) -> None:
        """The handler read every queued message: hand back the bytes that arrived meanwhile."""
        if st.held:
            n, st.held = st.held, 0
            self._credit_conn(n)
            self._credit_stream(st, n)

    # ---- frames out ---------------------------------------------------------------------------
    def _headers_out(self, st: _Stream) -> None:
        if not st.headers_sent:
            st.headers_sent = True
            self._send(_frame(HEADERS, END_HEADERS, st.id, _RESPONSE_HEADERS))

    async def send_message(self, st: _Stream, payload: bytes) -> None:
        """One gRPC message on st, cut to the client's frame size and windows."""
        if st.reset or st.local_closed or self.closing:
            raise asyncio.CancelledError  # the client went away: grpc.aio cancels the handler too
        limit = self.server.max_send
        if limit is not None and len(payload) > limit:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"Sent message larger than max ({len(payload)} vs. {limit})")
        self._headers_out(st)
        data = _grpc_message(payload)
        pos = 0
        while pos < len(data):
            if self.writable is not None:  # the transport's buffer is full: wait for the client to read
                await self.writable
                if st.reset or self.closing:
                    raise asyncio.CancelledError
                continue
            room = min(self.send_window, self.peer_window + st.send_adjust, self.peer_frame)
            if room <= 0:
                st.want = len(data) - pos
                st.blocked = self.loop.create_future()
                if self.peer_window + st.send_adjust <= 0:
                    self.blocked_own[st] = None
                else:
                    self.blocked[st] = None
                try:
                    await st.blocked
                finally:
                    st.blocked = None
                    self.blocked.pop(st, None)
                    self.blocked_own.pop(st, None)
                if st.reset or self.closing:
                    self._unblock()  # the window it was woken for goes to the next one
                    raise asyncio.CancelledError
                continue
            chunk = data[pos:pos + room] if pos or room < len(data) else data
            self._send(_frame(DATA, 0, st.id, chunk))
            self.send_window -= len(chunk)
            st.send_adjust -= len(chunk)
            pos += len(chunk)

    def _unblock(self) -> None:
        """Wake writes waiting for the connection's window, oldest first, only as many as it can
        feed (each takes at most its own window or what it has left to send)."""
        budget = self.send_window
        while self.blocked and budget > 0:
            st, _ = self.blocked.popitem(last=False)
            fut = st.blocked
            if fut is None or fut.done():
                continue
            own = self.peer_window + st.send_adjust
            if own <= 0:  # its own window closed meanwhile (a smaller initial window)
                self.blocked_own[st] = None
                continue
            fut.set_result(None)
            self.wakeups += 1
            budget -= min(own, st.want)

    def _finish(self, st: _Stream, code: grpc.StatusCode, details: str = "") -> None:
        """Trailers (or a trailers-only answer) with the call's status; the stream ends here."""
        if st.local_closed or st.reset:
            return
        st.local_closed = True
        number = _CODE_NUMBER[code]
        block = _OK_TRAILERS if number == 0 and not details else _status_block(number, details)
        if not st.headers_sent:
            st.headers_sent = True
            block = _RESPONSE_HEADERS + block
        start = len(self.out)
        self._send(_frame(HEADERS, END_HEADERS | END_STREAM, st.id, block))
        if not st.remote_closed:
            # the client may stop sending (RFC 9113 §8.1); its late frames are then ignored
            self._send(_frame(RST_STREAM, 0, st.id, _U32.pack(NO_ERROR)))
            st.remote_closed = True
        self.unsent_ends[st.id] = (start, len(self.out))
        self._maybe_done(st)

    def _fail(self, st: _Stream, code: grpc.StatusCode, details: str, rst: int | None = None) -> None:
        """End a stream on an error of the client's: status to it, the handler cancelled."""
        st.inbox.clear()
        if rst is not None:
            self._send(_frame(RST_STREAM, 0, st.id, _U32.pack(rst)))
            st.local_closed = st.remote_closed = True
        else:
            self._finish(st, code, details)
        self._abandon(st)
        self.streams.pop(st.id, None)
        self._check_idle()

    def _abandon(self, st: _Stream) -> None:
        """The client reset the stream or the connection went: the handler is cancelled."""
        st.reset = True
        if st.task is not None and not st.task.done():
            st.task.cancel()  # a waiting step closes its state when it has stopped (_steps_task)
        elif st.state is not None:
            self._steps_close(st)
        if st.buf:
            n = len(st.buf)
            st.buf.clear()
            self._partial(-n)
        if st.waiter is not None and not st.waiter.done():
            st.waiter.set_result(None)
        if st.blocked is not None and not st.blocked.done():
            st.blocked.set_result(None)

    def _maybe_done(self, st: _Stream) -> None:
        if st.local_closed and st.remote_closed and (st.task is None or st.task.done()):
            self.streams.pop(st.id, None)
            self._check_idle()

    def _check_idle(self) -> None:
        if self.idle is not None and not self.idle.done() and not self.streams:
            self.idle.set_result(None)
        if self.goaway_sent and not self.streams and not self.closing and self.transport is not None:
            self._flush()
            self.closing = True
            self.transport.close()

    # ---- handlers -----------------------------------------------------------------------------
    async def _run(self, st: _Stream, method: Method) -> None:
        ctx = Context(st)
        code, details = grpc.StatusCode.OK, ""
        try:
            if method.kind == "stream_stream":
                await method.handler(None, ctx)
            else:
                req = await ctx.read()
                if req is grpc.aio.EOF:
                    code, details = grpc.StatusCode.INTERNAL, "no request message"
                else:
                    result = await method.handler(req, ctx)
                    if method.kind == "unary_unary" and not st.reset:
                        await self.send_message(st, result.SerializeToString())
            if ctx._code is not None:
                code, details = ctx._code, ctx._details
        except RpcError as e:
            code, details = e.code, e.details
        except asyncio.CancelledError:
            if not st.reset and not self.closing:
                raise  # the server is stopping: the task's own cancellation
            return
        except Exception:
            log.exception("handler failed", extra={"method": method.handler.__name__})
            code, details = grpc.StatusCode.UNKNOWN, "Unexpected error"
        finally:
            st.task = None
        if not st.reset and not self.closing:
            self._finish(st, code, details)


class GrpcServer:
    """Serves `methods` (path -> Method) on one or more listeners; see the module doc."""

    def __init__(self, methods: dict[str, Method], *, max_receive: int = 4 << 20,
                 max_send: int | None = None) -> None:
        self.methods = methods
        self.max_receive = max_receive
        self.max_send = max_send
        self.conns: set[_Conn] = set()
        self.shutting_down = False
        self._servers: list[asyncio.AbstractServer] = []
        self._receivers: list[handoff.Receiver] = []  # --workers: connections the supervisor hands over
        self._stopped: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]

    async def listen(self, host: str, port: int, *, reuse_port: bool = False,
                     ssl_context: Callable[[], ssl.SSLContext] | None = None) -> int:
        """Start serving on host:port (0 = one from the OS); the bound port. `ssl_context` is
        asked for the context at every new TLS handshake (certificate reload): the handshake
        switches to what it returns once the client's hello is in."""
        self.loop = asyncio.get_running_loop()
        self._stopped = self._stopped or asyncio.Event()
        tls_ctx = _reloading_context(ssl_context)
        sock = handoff.bind_listener(host, port, reuse_port=reuse_port)
        try:
            srv = await self.loop.create_server(lambda: _Conn(self), sock=sock, ssl=tls_ctx,
                                                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if tls_ctx else None)
        except BaseException:
            sock.close()
            raise
        self._servers.append(srv)
        return int(sock.getsockname()[1])

    def adopt_from(self, fd: int, *, ssl_context: Callable[[], ssl.SSLContext] | None = None) -> None:
        """Serve the connections a `--workers` supervisor hands over on the control stream `fd`
        (epp.handoff), as `listen` serves the ones it accepts."""
        self.loop = asyncio.get_running_loop()
        self._stopped = self._stopped or asyncio.Event()
        tls_ctx = _reloading_context(ssl_context)
        tasks: set[asyncio.Task[None]] = set()

        async def serve(sock: socket.socket, closed: Callable[[], None]) -> None:
            try:
                await self.loop.connect_accepted_socket(
                    lambda: _Conn(self, on_lost=closed), sock, ssl=tls_ctx,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT if tls_ctx else None)
            except Exception as e:  # a failed or timed-out handshake, a connection already gone
                log.debug("handed connection not served", extra={"error": str(e)})
                sock.close()
                closed()

        def adopt(sock: socket.socket, closed: Callable[[], None]) -> None:
            if self.shutting_down:
                sock.close()
                closed()
                return
            sock.setblocking(False)
            t = self.loop.create_task(serve(sock, closed))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

        rx = handoff.Receiver(fd, self.loop, adopt)
        rx.start()
        self._receivers.append(rx)

    async def stop(self, grace: float | None) -> None:
        """No new connections or streams; open streams finish within `grace` seconds, then are
        cancelled and the connections closed."""
        self.shutting_down = True
        for rx in self._receivers:
            rx.stop()
        for srv in self._servers:
            srv.close()
        conns = list(self.conns)
        waits = []
        for c in conns:
            c.goaway(NO_ERROR)
            if c.streams:
                c.idle = self.loop.create_future()
                waits.append(c.idle)
            else:
                c._check_idle()
        if waits and grace:
            await asyncio.wait(waits, timeout=grace)
        for c in list(self.conns):
            for st in list(c.streams.values()):
                c._abandon(st)
            c.streams.clear()
            if c.transport is not None:
                c._flush()
                c.transport.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        if self._stopped is not None:
            self._stopped.set()

    async def wait_for_termination(self) -> None:
        """Returns once stop() has run."""
        if self._stopped is None:
            self._stopped = asyncio.Event()
        await self._stopped.wait()


def _reloading_context(factory: Callable[[], ssl.SSLContext] | None) -> ssl.SSLContext | None:
    """The context to serve TLS with (None: plaintext): `factory()` now, switched at each handshake
    to what `factory()` returns then, so a reloaded certificate serves new connections."""
    if factory is None:
        return None
    first = factory()

    def switch(obj: Any, _name: str | None, _ctx: ssl.SSLContext) -> None:
        # called for every handshake, with or without SNI, before the certificate is chosen
        current = factory()
        if current is not first:
            obj.context = current

    first.sni_callback = switch
    return first


def server_context(cert: bytes, key: bytes, client_ca: bytes | None = None) -> ssl.SSLContext:
    """A TLS server context from PEM bytes (never written to disk: a memfd where Linux has it),
    ALPN h2, TLS 1.2 or newer; with `client_ca` a client certificate from it is required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    with _pem_file(cert) as cert_path, _pem_file(key) as key_path:
        ctx.load_cert_chain(cert_path, key_path)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
    return ctx


@contextlib.contextmanager
def _pem_file(data: bytes) -> Any:
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        fd = memfd("epp-tls", 0)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(prefix="epp-tls-") as f:  # pragma: no cover - no memfd
        f.write(data)
        f.flush()
        yield f.name

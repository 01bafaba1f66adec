"""epp.h2server against real clients over loopback: grpc's own C-core client (plaintext, TLS,
mutual TLS) for the calls, and raw HTTP/2 frames (the `h2` library, sockets) for what a
well-behaved client never sends."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from grpc_health.v1 import health_pb2

from epp import h2server, tls
from epp.h2server import GrpcServer, Method

Req, Resp = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse


class Echo:
    """Test handlers: a unary echo, a bidi echo, a failing call, a call that waits forever."""

    def __init__(self) -> None:
        self.finished: list[str] = []
        self.release = asyncio.Event()
        self.received = 0

    async def Unary(self, req: Req, ctx: h2server.Context) -> Resp:
        if req.service == "abort":
            await ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "no: ünïcode % ok")
        if req.service == "boom":
            raise RuntimeError("handler bug")
        return Resp(status=len(req.service) % 3)

    async def Chat(self, _: None, ctx: h2server.Context) -> None:
        try:
            while True:
                req = await ctx.read()
                if req is grpc.aio.EOF:
                    return
                self.received += 1
                if req.service == "hold":
                    await self.release.wait()
                await ctx.write(Resp(status=1) if len(req.service) < 100 else _big(len(req.service)))
        finally:
            self.finished.append("chat")

    async def Stuck(self, _: None, ctx: h2server.Context) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            self.finished.append("stuck")


def _big(n: int) -> Req:
    # a reply about n bytes long (HealthCheckResponse has only an enum; Chat answers Req-shaped messages)
    return Req(service="y" * n)


def _methods(e: Echo) -> dict[str, Method]:
    return {
        "/t.E/Unary": Method("unary_unary", Req.FromString, e.Unary),
        "/t.E/Chat": Method("stream_stream", Req.FromString, e.Chat),
        "/t.E/Stuck": Method("stream_stream", Req.FromString, e.Stuck),
    }


@pytest.fixture
async def served():
    e = Echo()
    srv = GrpcServer(_methods(e), max_receive=2 << 20)
    port = await srv.listen("127.0.0.1", 0)
    try:
        yield e, srv, port
    finally:
        await srv.stop(0)


def _calls(ch: grpc.aio.Channel):
    unary = ch.unary_unary("/t.E/Unary", request_serializer=Req.SerializeToString,
                           response_deserializer=Resp.FromString)
    chat = ch.stream_stream("/t.E/Chat", request_serializer=Req.SerializeToString,
                            response_deserializer=Req.FromString)
    return unary, chat


async def test_unary_and_status_codes(served) -> None:
    _, _, port = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        unary, _ = _calls(ch)
        assert (await unary(Req(service="abcd"), timeout=5)).status == 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unary(Req(service="abort"), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == "no: ünïcode % ok"  # percent-encoded on the wire, decoded by grpc
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unary(Req(service="boom"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNKNOWN
        missing = ch.unary_unary("/t.E/Nope", request_serializer=Req.SerializeToString,
                                 response_deserializer=Resp.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await missing(Req(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # the connection survived all of that
        assert (await unary(Req(service="ab"), timeout=5)).status == 2


async def test_bidi_many_streams_and_large_messages_both_ways(served) -> None:
    e, _, port = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        _, chat = _calls(ch)

        async def one(i: int) -> int:
            call = chat()
            n = 0
            for j in range(5):
                await call.write(Req(service=f"s{i}-{j}"))
                r = await call.read()
                assert r.service == "" or r is not None
                n += 1
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            return n

        assert sum(await asyncio.gather(*(one(i) for i in range(50)))) == 250
        # 1.5 MiB each way: past the client's 64 KiB initial window, so the server's sends wait for
        # WINDOW_UPDATEs, and past 16 KiB frames
        call = chat()
        await call.write(Req(service="x" * (3 << 19)))
        r = await call.read()
        assert len(r.service) >= (3 << 19)
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
    assert e.finished.count("chat") == 51


async def test_oversized_message_is_refused_by_its_length(served) -> None:
    e, _, port = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                         options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        unary, chat = _calls(ch)
        call = chat()
        await call.write(Req(service="z" * (3 << 20)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await unary(Req(service="a"), timeout=5)).status == 1  # the connection carries on


async def test_client_cancel_cancels_the_handler(served) -> None:
    e, _, port = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stuck = ch.stream_stream("/t.E/Stuck", request_serializer=Req.SerializeToString,
                                 response_deserializer=Resp.FromString)
        call = stuck()
        await call.write(Req(service="x"))
        await asyncio.sleep(0.1)
        call.cancel()
        for _ in range(50):
            if "stuck" in e.finished:
                break
            await asyncio.sleep(0.02)
    assert e.finished == ["stuck"]


async def test_graceful_stop_lets_open_streams_finish_and_refuses_new_ones() -> None:
    e = Echo()
    srv = GrpcServer(_methods(e))
    port = await srv.listen("127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        unary, chat = _calls(ch)
        call = chat()
        await call.write(Req(service="hold"))
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(srv.stop(5))
        await asyncio.sleep(0.1)
        e.release.set()
        assert (await call.read()) is not None
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        await stopping
        with pytest.raises(grpc.aio.AioRpcError):
            await unary(Req(service="late"), timeout=1)


async def test_stop_cancels_what_outlives_the_grace() -> None:
    e = Echo()
    srv = GrpcServer(_methods(e))
    port = await srv.listen("127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stuck = ch.stream_stream("/t.E/Stuck", request_serializer=Req.SerializeToString,
                                 response_deserializer=Resp.FromString)
        call = stuck()
        await call.write(Req())
        await asyncio.sleep(0.1)
        await srv.stop(0.2)
        with pytest.raises(grpc.aio.AioRpcError):
            await call.read()
    await asyncio.sleep(0.05)
    assert e.finished == ["stuck"]


# ---- TLS ----------------------------------------------------------------------------------------
async def test_tls_and_mutual_tls(tmp_path) -> None:
    e = Echo()
    server_pair = tls.self_signed(["localhost"])
    client_pair = tls.self_signed(["client"])
    srv = GrpcServer(_methods(e))
    ctx = h2server.server_context(server_pair.cert, server_pair.key)
    port = await srv.listen("127.0.0.1", 0, ssl_context=lambda: ctx)
    mctx = h2server.server_context(server_pair.cert, server_pair.key, client_ca=client_pair.cert)
    msrv = GrpcServer(_methods(e))
    mport = await msrv.listen("127.0.0.1", 0, ssl_context=lambda: mctx)
    opts = [("grpc.ssl_target_name_override", "localhost")]
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=server_pair.cert)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=opts) as ch:
            unary, _ = _calls(ch)
            assert (await unary(Req(service="abcd"), timeout=5)).status == 1
        async with grpc.aio.secure_channel(f"127.0.0.1:{mport}", creds, options=opts) as ch:
            unary, _ = _calls(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:  # no client certificate
                await unary(Req(service="abcd"), timeout=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        mcreds = grpc.ssl_channel_credentials(root_certificates=server_pair.cert, private_key=client_pair.key,
                                              certificate_chain=client_pair.cert)
        async with grpc.aio.secure_channel(f"127.0.0.1:{mport}", mcreds, options=opts) as ch:
            unary, _ = _calls(ch)
            assert (await unary(Req(service="abcd"), timeout=5)).status == 1
        # a plaintext client on the TLS port is turned away, the server carries on
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            unary, _ = _calls(ch)
            with pytest.raises(grpc.aio.AioRpcError):
                await unary(Req(service="abcd"), timeout=2)
    finally:
        await srv.stop(0)
        await msrv.stop(0)


# ---- raw frames: what a well-behaved client never sends -----------------------------------------
class Raw:
    """A blocking HTTP/2 client (the h2 library) on a real socket, for hostile frames."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def events(self, until: type, limit: float = 5.0) -> list[h2.events.Event]:
        self.sock.settimeout(limit)
        seen: list[h2.events.Event] = []
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                return seen
            if not data:
                seen.append(h2.events.ConnectionTerminated())
                return seen
            evs = self.h2.receive_data(data)
            self.flush()
            seen.extend(evs)
            if any(isinstance(ev, until) for ev in evs):
                return seen

    def headers(self, sid: int, path: str, end: bool = False) -> None:
        self.h2.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                   (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")],
                             end_stream=end)
        self.flush()


def _msg(m: Req) -> bytes:
    b = m.SerializeToString()
    return b"\x00" + len(b).to_bytes(4, "big") + b


async def test_raw_frames_ping_padding_continuation_and_trailers(served) -> None:
    _, _, port = served

    def run() -> None:
        c = Raw(port)
        c.h2.ping(b"12345678")
        c.flush()
        assert any(isinstance(ev, h2.events.PingAckReceived) for ev in c.events(h2.events.PingAckReceived))
        # headers split across HEADERS + CONTINUATION, a padded DATA frame: the call still works
        c.h2.max_outbound_frame_size = 16384
        big_meta = [("x-pad", "p" * 40000)]
        c.h2.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", "/t.E/Unary"),
                              (":authority", "x"), ("content-type", "application/grpc"), *big_meta])
        c.h2.send_data(1, _msg(Req(service="abc")), end_stream=True, pad_length=7)
        c.flush()
        evs = c.events(h2.events.StreamEnded)
        trailers = [dict(ev.headers) for ev in evs if isinstance(ev, h2.events.TrailersReceived)]
        assert trailers and trailers[0]["grpc-status"] == "0"

    await asyncio.to_thread(run)


async def test_raw_garbage_and_oversized_header_blocks_end_the_connection(served) -> None:
    _, _, port = served

    def run() -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        got = b""
        while True:  # the server answers GOAWAY (or nothing) and closes
            part = s.recv(4096)
            if not part:
                break
            got += part
        s.close()
        # a header block over 64 KiB (HEADERS + CONTINUATIONs): GOAWAY, connection closed
        c = Raw(port)
        c.h2.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", "/t.E/Unary"),
                              (":authority", "x"), ("x-huge", "h" * 70000)])
        c.flush()
        evs = c.events(h2.events.ConnectionTerminated)
        ended = [ev for ev in evs if isinstance(ev, h2.events.ConnectionTerminated)]
        assert ended

    await asyncio.to_thread(run)
    # the server itself is fine
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        unary, _ = _calls(ch)
        assert (await unary(Req(service="abcd"), timeout=5)).status == 1


async def test_a_flood_of_empty_continuation_frames_ends_the_connection(served) -> None:
    """A header block that never ends, in CONTINUATION frames carrying nothing (the 2024
    "CONTINUATION flood"): each frame counts against the header-block cap with its 9-byte head, so
    the connection ends with ENHANCE_YOUR_CALM after a bounded number of them, in time linear in
    the bytes sent, while other connections are served."""
    _, _, port = served
    block = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", "/t.E/Unary"),
                                    (":authority", "x")])
    frames = [h2server._frame(h2server.HEADERS, 0, 1, block)]  # no END_HEADERS: the block goes on
    frames += [h2server._frame(h2server.CONTINUATION, 0, 1, b"")] * 30_000

    def run() -> int | None:
        c = Raw(port)
        with contextlib.suppress(OSError):  # the server may close before it has read them all
            c.sock.sendall(b"".join(frames))
        evs = c.events(h2.events.ConnectionTerminated, limit=5.0)
        ended = [ev for ev in evs if isinstance(ev, h2.events.ConnectionTerminated)]
        return ended[0].error_code if ended else None

    flood = asyncio.create_task(asyncio.to_thread(run))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        unary, _ = _calls(ch)
        assert (await unary(Req(service="abcd"), timeout=5)).status == 1
    assert await flood == h2server.ENHANCE_YOUR_CALM


async def test_a_settings_frame_full_of_window_changes_costs_the_same_with_many_streams_open(served) -> None:
    """SETTINGS_INITIAL_WINDOW_SIZE changes every open stream's window. One 1 MB SETTINGS frame
    holds 170,000 such entries: with 2,000 streams open, applied stream by stream that was 3.4e8
    updates on the serving loop. Now a change costs the same whatever the number of streams, and
    another client's call is answered meanwhile."""
    e, _, port = served
    entries = b"".join(struct.pack(">HI", h2server.S_INITIAL_WINDOW_SIZE, 65535 + i % 2) for i in range(170_000))
    c = Raw(port)
    for sid in range(1, 4001, 2):
        c.h2.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", "/t.E/Stuck"),
                                (":authority", "x"), ("content-type", "application/grpc")])
    c.flush()
    await asyncio.sleep(0.5)  # the streams are open
    try:
        await asyncio.to_thread(c.sock.sendall, h2server._frame(h2server.SETTINGS, 0, 0, entries))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            unary, _ = _calls(ch)
            assert (await unary(Req(service="abcd"), timeout=3)).status == 1
    finally:
        c.sock.close()


async def test_window_updates_wake_only_the_streams_they_can_feed(served) -> None:
    """1,000 replies wait on a client that gave each stream a window of 0. Every WINDOW_UPDATE used
    to wake all of them (each to find no room and wait again): one-byte updates for the connection,
    read a few at a time, cost the serving loop seconds of CPU. Now a stream waiting for its own window sleeps
    until that window opens, and the connection's window wakes only as many as it can feed; another
    client's call is answered meanwhile, and the replies still arrive once the windows open."""
    _, srv, port = served
    c = Raw(port)
    c.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    sids = list(range(1, 2001, 2))
    for sid in sids:
        c.h2.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", "/t.E/Chat"),
                                (":authority", "x"), ("content-type", "application/grpc")])
        c.h2.send_data(sid, _msg(Req(service="x")))
    c.flush()
    await asyncio.sleep(1.0)  # every handler has written its reply and waits for window
    one = h2server._frame(h2server.WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big"))

    def flood() -> None:  # a few frames a read, as a client that trickles them sends them
        for _ in range(2_000):
            c.sock.sendall(one * 5)
            time.sleep(0)

    try:
        sent = asyncio.create_task(asyncio.to_thread(flood))
        await asyncio.sleep(0.3)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            unary, _ = _calls(ch)
            assert (await unary(Req(service="abcd"), timeout=3)).status == 1
        await sent
        # the flood's frames were handled as they came: a PING sent after them is answered at once
        c.h2.ping(b"after-it")
        c.flush()
        acks = await asyncio.to_thread(c.events, h2.events.PingAckReceived, 3.0)
        assert any(isinstance(ev, h2.events.PingAckReceived) for ev in acks)
        # the window opens (SETTINGS): every reply arrives
        def replies() -> set[int]:
            c.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
            c.flush()
            got: set[int] = set()
            c.sock.settimeout(10)
            while len(got) < len(sids):
                try:
                    data = c.sock.recv(1 << 20)
                except TimeoutError:
                    raise AssertionError(f"{len(got)} of {len(sids)} replies") from None
                assert data, "connection closed"
                got.update(ev.stream_id for ev in c.h2.receive_data(data) if isinstance(ev, h2.events.DataReceived))
            return got

        got = await asyncio.to_thread(replies)
        # one wake-up a stream, when its window opened; the connection's updates woke none
        conn = max(srv.conns, key=lambda k: len(k.streams))
        assert len(conn.streams) == len(sids) and conn.wakeups == len(sids)
        assert got == set(sids)
    finally:
        c.sock.close()


async def test_writes_waiting_for_the_connection_window_all_finish_as_it_opens(served) -> None:
    """100 replies of 10 KB against the client's 64 KiB connection window, which it reopens only
    as it reads (in small steps): the window wakes only as many writes as it can feed, and still
    every reply arrives whole."""
    _, srv, port = served
    c = Raw(port)
    c.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    c.flush()
    await asyncio.to_thread(c.events, h2.events.WindowUpdated, 2.0)  # the server's 64 MiB window for us
    sids = list(range(1, 201, 2))
    for sid in sids:
        c.h2.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", "/t.E/Chat"),
                                (":authority", "x"), ("content-type", "application/grpc")])
        c.h2.send_data(sid, _msg(Req(service="y" * 10_000)))
    c.flush()

    def replies() -> dict[int, int]:
        got: dict[int, int] = {}
        c.sock.settimeout(10)
        while sum(got.values()) < len(sids) * 10_000:
            try:
                data = c.sock.recv(4096)  # small reads: the window comes back a little at a time
            except TimeoutError:
                raise AssertionError(f"{sum(got.values())} bytes of {len(sids) * 10_000}") from None
            assert data, "connection closed"
            for ev in c.h2.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):
                    got[ev.stream_id] = got.get(ev.stream_id, 0) + len(ev.data)
                    c.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            c.flush()
        return got

    try:
        got = await asyncio.to_thread(replies)
        assert sorted(got) == sids and all(n >= 10_000 for n in got.values())
        conn = max(srv.conns, key=lambda k: len(k.streams))
        assert conn.wakeups > 0 and not conn.blocked and not conn.blocked_own  # they did wait, and none is left
    finally:
        c.sock.close()


async def test_a_busy_handler_holds_back_the_clients_window(served) -> None:
    """Messages the handler has not read stop the stream's window: a client cannot queue more
    than the window (4 MiB) ahead of it, however much it has to send."""
    e, srv, port = served

    def run() -> int:
        c = Raw(port)
        c.headers(1, "/t.E/Chat")
        c.h2.send_data(1, _msg(Req(service="hold")))
        c.flush()
        sent = 0
        chunk = _msg(Req(service="q" * 16000))
        c.sock.settimeout(0.5)
        for _ in range(800):  # up to 12 MB on offer
            window = c.h2.local_flow_control_window(1)
            if window < len(chunk):
                try:  # let WINDOW_UPDATEs in, if the server sends any
                    data = c.sock.recv(1 << 20)
                    if data:
                        c.h2.receive_data(data)
                        continue
                except TimeoutError:
                    break
                break
            c.h2.send_data(1, chunk)
            c.flush()
            sent += len(chunk)
        c.sock.close()
        return sent

    sent = await asyncio.to_thread(run)
    assert sent <= h2server.STREAM_WINDOW + 2 * 65536
    assert e.received == 1  # the held message; nothing else was read
    e.release.set()


async def test_unknown_compression_is_refused(served) -> None:
    _, _, port = served

    def run() -> dict[str, str]:
        c = Raw(port)
        c.h2.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", "/t.E/Unary"),
                              (":authority", "x"), ("content-type", "application/grpc"),
                              ("grpc-encoding", "gzip")], end_stream=False)
        c.h2.send_data(1, b"\x01\x00\x00\x00\x01x", end_stream=True)
        c.flush()
        for ev in c.events(h2.events.StreamEnded):
            if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                d = dict(ev.headers)
                if "grpc-status" in d:
                    return d
        return {}

    got = await asyncio.to_thread(run)
    assert got.get("grpc-status") == str(grpc.StatusCode.UNIMPLEMENTED.value[0])


def test_server_context_alpn_and_verify_modes() -> None:
    pair = tls.self_signed(["localhost"])
    ctx = h2server.server_context(pair.cert, pair.key)
    assert ctx.verify_mode == ssl.CERT_NONE
    assert h2server.server_context(pair.cert, pair.key, client_ca=pair.cert).verify_mode == ssl.CERT_REQUIRED


async def test_a_silent_connection_is_closed(monkeypatch) -> None:
    monkeypatch.setattr(h2server, "PREFACE_TIMEOUT", 0.2)
    srv = GrpcServer(_methods(Echo()))
    port = await srv.listen("127.0.0.1", 0)
    try:
        def run() -> bytes:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            got = b""
            while part := s.recv(4096):  # the server's SETTINGS, then the close
                got += part
            s.close()
            return got

        got = await asyncio.to_thread(run)
        assert got[3] == h2server.SETTINGS  # it spoke first, then hung up on the silent client
    finally:
        await srv.stop(0)


async def test_a_client_that_never_reads_is_no_longer_read(served) -> None:
    """A PING flood from a client that reads nothing: the answers pile up only to the transport's
    high-water mark, then the server stops reading that client (other clients are unaffected)."""
    _, srv, port = served
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    s.connect(("127.0.0.1", port))
    s.sendall(h2server.PREFACE + h2server._frame(h2server.SETTINGS, 0, 0))
    ping = h2server._frame(h2server.PING, 0, 0, b"p" * 8)
    s.setblocking(False)
    flood = ping * 2_000_000  # 34 MB of PINGs, whole frames
    sent = 0
    for _ in range(1000):
        try:
            sent += s.send(flood[sent:sent + (1 << 16)])
        except BlockingIOError:
            await asyncio.sleep(0.01)
        else:
            await asyncio.sleep(0)
        if sent >= len(flood) or any(c.writable is not None for c in srv.conns):
            break
    await asyncio.sleep(0.3)
    [conn] = list(srv.conns)
    assert conn.transport is not None
    assert conn.transport.get_write_buffer_size() < 2 << 20
    assert conn.writable is not None  # paused: it no longer reads this client
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        unary, _ = _calls(ch)
        assert (await unary(Req(service="abcd"), timeout=5)).status == 1
    s.close()


async def test_unfinished_messages_stop_the_connection_window(monkeypatch, served) -> None:
    """Streams that each start a message and never finish it: past PARTIAL_CAP bytes the
    connection's window is no longer handed back, so the client must stop."""
    monkeypatch.setattr(h2server, "PARTIAL_CAP", 200_000)
    monkeypatch.setattr(h2server, "CONN_WINDOW", 2 << 20)
    _, srv, port = served

    def run() -> int:
        c = Raw(port)
        c.events(h2.events.RemoteSettingsChanged, 1)
        sent, sid = 0, 1
        part = b"\x00" + (1 << 20).to_bytes(4, "big") + b"u" * 16000  # announces 1 MiB, sends 16 KB
        c.sock.settimeout(0.3)
        for _ in range(400):
            if c.h2.local_flow_control_window(sid) < len(part) if sid in c.h2.streams else False:
                break
            if c.h2.outbound_flow_control_window < len(part):
                try:
                    data = c.sock.recv(1 << 20)
                    if data:
                        c.h2.receive_data(data)
                        c.flush()
                        continue
                except TimeoutError:
                    break
                break
            c.headers(sid, "/t.E/Chat")
            c.h2.send_data(sid, part)
            c.flush()
            sent += len(part)
            sid += 2
        c.sock.close()
        return sent

    sent = await asyncio.to_thread(run)
    # 64 KiB initial + what the server credited before the cap: far below the 6.4 MB on offer
    assert sent <= 200_000 + (2 << 20) + 65536


class Steps:
    """A StreamSteps handler: echoes, waits on "queue" (as flow control does), answers "big"
    past the client's window, fails on "boom"; records opens and closes."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed: list[list[str]] = []
        self.gate = asyncio.Event()
        self.waiting: set[int] = set()

    def stream_open(self) -> list[str]:
        self.opened += 1
        return []

    def stream_message(self, state: list[str], msg: Req) -> list[Req] | None:
        state.append(msg.service)
        if msg.service == "boom":
            raise RuntimeError("step bug")
        if msg.service == "queue":
            return None
        if msg.service == "big":
            return [Req(service="b" * 300_000)]
        return [Req(service=f"re:{msg.service}")]

    async def stream_wait(self, state: list[str]) -> list[Req]:
        self.waiting.add(id(state))
        try:
            await self.gate.wait()
        finally:
            self.waiting.discard(id(state))
        return [Req(service="released")]

    def stream_written(self, state: list[str]) -> None:
        pass

    def stream_close(self, state: list[str]) -> None:
        # a waiting step is stopped before its state closes (what it decided is then finished too)
        self.closed.append(list(state) + (["CLOSED WHILE WAITING"] if id(state) in self.waiting else []))


async def _wait_closed(steps: Steps, n: int) -> None:
    """Until `n` streams' states have closed (at most a second)."""
    for _ in range(50):
        if len(steps.closed) == n:
            return
        await asyncio.sleep(0.02)


async def test_stream_steps_without_a_task_a_stream() -> None:
    steps = Steps()
    srv = GrpcServer({"/t.S/Chat": Method("stream_steps", Req.FromString, steps)})
    port = await srv.listen("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            chat = ch.stream_stream("/t.S/Chat", request_serializer=Req.SerializeToString,
                                    response_deserializer=Req.FromString)
            call = chat()
            for word in ("a", "b"):
                await call.write(Req(service=word))
                assert (await call.read()).service == f"re:{word}"
            # a reply past the client's 64 KiB window goes out from a task as the window opens;
            # messages sent meanwhile are answered after it, in order
            await call.write(Req(service="big"))
            await call.write(Req(service="c"))
            assert len((await call.read()).service) == 300_000
            assert (await call.read()).service == "re:c"
            # queued: the stream waits, others go on
            await call.write(Req(service="queue"))
            await call.write(Req(service="d"))
            other = chat()
            await other.write(Req(service="x"))
            assert (await other.read()).service == "re:x"
            await other.done_writing()
            assert await other.code() == grpc.StatusCode.OK
            steps.gate.set()
            assert (await call.read()).service == "released"
            assert (await call.read()).service == "re:d"
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
            # a failing step ends its stream with UNKNOWN
            bad = chat()
            await bad.write(Req(service="boom"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bad.read()
            assert err.value.code() == grpc.StatusCode.UNKNOWN
            # a client that resets while its step waits: closed once, nothing left over
            steps.gate.clear()
            gone = chat()
            await gone.write(Req(service="queue"))
            await asyncio.sleep(0.1)
            gone.cancel()
            await _wait_closed(steps, 4)
    finally:
        await srv.stop(0)
    assert steps.opened == 4
    assert sorted(map(tuple, steps.closed)) == sorted([("a", "b", "big", "c", "queue", "d"), ("x",), ("boom",),
                                                      ("queue",)])
    assert not any(c.streams for c in srv.conns)


async def test_random_frames_never_break_the_server(served) -> None:
    """Seeded random frame sequences (every type, flag and small stream id, short payloads) on
    fresh connections: each is answered or closed by the protocol's rules; nothing escapes as an
    exception on the event loop, and the server still serves afterwards."""
    import random

    _, srv, port = served
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    rng = random.Random(7)
    try:
        for _ in range(150):
            frames = b"".join(
                h2server._frame(rng.randrange(12), rng.randrange(256), rng.randrange(6),
                                bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 4, 5, 8, 9, 13)))))
                for _ in range(rng.randrange(1, 12)))
            if rng.random() < 0.6:  # most runs open real streams first, so the random frames hit them
                opened = b"".join(
                    h2server._frame(h2server.HEADERS, h2server.END_HEADERS, sid, hpack.Encoder().encode(
                        [(":method", "POST"), (":scheme", "http"), (":authority", "x"),
                         (":path", rng.choice(["/t.E/Chat", "/t.E/Unary", "/t.E/Stuck"])),
                         ("content-type", "application/grpc")]))
                    + h2server._frame(h2server.DATA, 0, sid, _msg(Req(service="hold" if rng.random() < 0.2 else "q")))
                    for sid in (1, 3))
                frames = opened + frames
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(h2server.PREFACE + h2server._frame(h2server.SETTINGS, 0, 0) + frames)
            await w.drain()
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(r.read(1 << 16), 0.05)
            w.close()
        await asyncio.sleep(0.1)
    finally:
        loop.set_exception_handler(old)
    assert errors == []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        unary, _ = _calls(ch)
        assert (await unary(Req(service="abcd"), timeout=5)).status == 1


def _frames_until_ping_ack(sock: socket.socket) -> list[tuple[int, int, int]]:
    """(type, flags, stream id) of every frame the server sends until its PING ACK."""
    buf, out = b"", []
    sock.settimeout(5)
    while True:
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            ftype, flags, sid = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            out.append((ftype, flags, sid))
            buf = buf[9 + length:]
            if ftype == 0x6 and flags & 0x1:
                return out
        data = sock.recv(1 << 16)
        assert data, "connection closed"
        buf += data


async def test_a_stream_reset_with_its_end_gets_no_trailers() -> None:
    """Envoy ends an ext_proc stream with END_STREAM and RST_STREAM in one write: the handler's
    state still closes, and the trailers it would have answered are not sent (nothing may go out
    on a stream the client reset, and it saves a write a request). END_STREAM alone gets them."""
    steps = Steps()
    srv = GrpcServer({"/t.S/Chat": Method("stream_steps", Req.FromString, steps)})
    port = await srv.listen("127.0.0.1", 0)

    def run() -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        c = Raw(port)
        seen = []
        for sid, reset in ((1, True), (3, False)):
            c.headers(sid, "/t.S/Chat")
            c.h2.send_data(sid, _msg(Req(service=f"m{sid}")))
            c.flush()
            c.events(h2.events.DataReceived)
            c.h2.end_stream(sid)
            if reset:
                c.h2.reset_stream(sid)
            c.h2.ping(b"marker00")
            c.flush()  # END_STREAM (+ RST_STREAM) and the PING in one write
            seen.append(_frames_until_ping_ack(c.sock))
        return seen[0], seen[1]

    try:
        reset, ended = await asyncio.to_thread(run)
        await _wait_closed(steps, 2)
    finally:
        await srv.stop(0)
    HEADERS = 0x1
    assert not [f for f in reset if f[2] == 1], f"frames sent on the reset stream: {reset}"
    assert [f for f in ended if f[0] == HEADERS and f[2] == 3], f"no trailers for the ended stream: {ended}"
    assert sorted(steps.closed) == [["m1"], ["m3"]]

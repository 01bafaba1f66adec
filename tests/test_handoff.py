"""epp.handoff: the supervisor's dispatcher and the workers' receivers over real sockets (a TCP
listener on loopback, Unix socket pairs carrying the descriptors), and epp.h2server serving the
connections it is handed, TLS included, to grpc's own client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2

from epp import h2server, handoff, tls
from epp.h2server import GrpcServer, Method

Req, Resp = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse


class Worker:
    """A receiver on this test's loop that keeps what it is handed."""

    def __init__(self, end: socket.socket) -> None:
        self.held: list[tuple[socket.socket, Callable[[], None]]] = []
        self.rx = handoff.Receiver(end.detach(), asyncio.get_running_loop(),
                                   lambda s, closed: self.held.append((s, closed)))

    def close_one(self) -> None:
        sock, closed = self.held.pop(0)
        sock.close()
        closed()
        closed()  # twice: counted once


@contextlib.contextmanager
def dispatcher(n: int):  # type: ignore[no-untyped-def]
    pairs = [handoff.control_pair() for _ in range(n)]
    d = handoff.Dispatcher(handoff.bind_listener("127.0.0.1", 0), [mine for mine, _ in pairs])
    try:
        yield d, [theirs for _, theirs in pairs]
    finally:
        d.close()


async def settle(d: handoff.Dispatcher, until: Callable[[], bool], limit: float = 5.0) -> None:
    """Let the dispatcher (polled here, as the supervisor does) and the receivers run until `until()`."""
    for _ in range(int(limit / 0.01)):
        d.poll(0)
        await asyncio.sleep(0.01)
        if until():
            return
    raise AssertionError("not settled")


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


async def test_each_connection_goes_to_the_worker_holding_the_fewest() -> None:
    with dispatcher(2) as (d, ends):
        a, b = Worker(ends[0]), Worker(ends[1])
        a.rx.start()
        b.rx.start()
        await settle(d, lambda: all(w.ready for w in d.workers))
        clients = [connect(d.port) for _ in range(2)]
        await settle(d, lambda: len(a.held) + len(b.held) == 2)
        assert (len(a.held), len(b.held)) == (1, 1)  # two connections, one each: never both on one
        assert d.open_counts() == [1, 1]
        clients += [connect(d.port) for _ in range(4)]
        await settle(d, lambda: len(a.held) + len(b.held) == 6)
        assert (len(a.held), len(b.held)) == (3, 3)
        # a's connections end: the next ones go to a until it holds as many as b
        a.close_one()
        a.close_one()
        await settle(d, lambda: d.open_counts() == [1, 3])
        clients += [connect(d.port) for _ in range(2)]
        await settle(d, lambda: len(a.held) + len(b.held) == 6)
        assert (len(a.held), len(b.held)) == (3, 3)
        for c in clients:
            c.close()


async def test_short_connections_one_after_another_take_turns() -> None:
    with dispatcher(3) as (d, ends):
        workers = [Worker(e) for e in ends]
        for w in workers:
            w.rx.start()
        await settle(d, lambda: all(w.ready for w in d.workers))
        for i in range(6):  # each closed before the next opens: every worker is always at 0
            c = connect(d.port)
            await settle(d, lambda: sum(len(w.held) for w in workers) == 1)
            owner = next(w for w in workers if w.held)
            assert owner is workers[i % 3]
            c.close()
            owner.close_one()
            await settle(d, lambda: d.open_counts() == [0, 0, 0])


async def test_connections_wait_for_a_ready_worker_and_skip_stopped_and_dead_ones() -> None:
    with dispatcher(3) as (d, ends):
        a, b, c = Worker(ends[0]), Worker(ends[1]), Worker(ends[2])
        early = connect(d.port)  # no worker ready: it waits in the listen backlog
        for _ in range(20):
            d.poll(0)
            await asyncio.sleep(0.005)
        assert not a.held and not b.held and not c.held
        b.rx.start()
        await settle(d, lambda: len(b.held) == 1)  # handed once a worker says it is ready
        a.rx.start()
        c.rx.start()
        await settle(d, lambda: all(w.ready for w in d.workers))
        a.rx.stop()  # shutting down: hand it nothing more
        c.rx.loop.remove_reader(c.rx.ctrl.fileno())  # dead: its end of the stream is closed
        c.rx.ctrl.close()
        await settle(d, lambda: d.workers[0].stopped and d.workers[2].stopped)
        later = [connect(d.port) for _ in range(3)]
        await settle(d, lambda: len(b.held) == 4)
        assert not a.held and not c.held
        for s in [early, *later]:
            s.close()


async def test_with_every_worker_stopped_the_port_refuses_connections() -> None:
    """Shutting down: once the last worker says it stopped, the listener closes (a client goes to
    another replica at once, as when a single process closes its own); until then it listens."""
    with dispatcher(2) as (d, ends):
        a, b = Worker(ends[0]), Worker(ends[1])
        a.rx.start()
        b.rx.start()
        port = d.port
        await settle(d, lambda: all(w.ready for w in d.workers))
        a.rx.stop()
        await settle(d, lambda: d.workers[0].stopped)
        s = connect(port)  # one worker still serves
        await settle(d, lambda: len(b.held) == 1)
        s.close()
        b.rx.stop()
        await settle(d, lambda: d.workers[1].stopped and d.listener.fileno() < 0)
        with pytest.raises(ConnectionRefusedError):
            connect(port)
        assert not a.held and d.workers[0].handed == 0


async def test_a_connection_handed_as_the_worker_stops_is_closed_not_left_unanswered() -> None:
    """The supervisor may hand one more connection before it reads STOPPED: the stopping worker
    closes it (the client reconnects elsewhere) and reports it closed."""
    with dispatcher(1) as (d, ends):
        w = Worker(ends[0])
        w.rx.start()
        await settle(d, lambda: d.workers[0].ready)
        w.rx.stop()  # STOPPED is on its way; the dispatcher has not read it yet
        s = connect(d.port)
        conn, _ = d.listener.accept()
        with conn:
            d._hand(conn)  # as a poll that found the connection before the report would
        assert d.open_counts() == [1]
        await settle(d, lambda: w.rx.refused == 1 and d.open_counts() == [0] and d.workers[0].stopped)
        assert not w.held
        s.settimeout(5)
        assert s.recv(1) == b""  # closed, not hanging until the worker exits
        s.close()


def test_a_busy_port_is_an_error() -> None:
    first = handoff.bind_listener("127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            handoff.bind_listener("127.0.0.1", first.getsockname()[1])
    finally:
        first.close()


# ---- the gRPC server on handed connections -------------------------------------------------------
async def _unary(req: Req, _ctx: h2server.Context) -> Resp:
    return Resp(status=len(req.service) % 3)


async def test_a_grpc_server_serves_handed_tls_connections_and_reports_their_end() -> None:
    pair = tls.self_signed(["localhost"])
    ctx = h2server.server_context(pair.cert, pair.key)
    srv = GrpcServer({"/t.E/Unary": Method("unary_unary", Req.FromString, _unary)})
    with dispatcher(1) as (d, ends):
        srv.adopt_from(ends[0].detach(), ssl_context=lambda: ctx)
        await settle(d, lambda: d.workers[0].ready)
        poller = asyncio.get_running_loop().run_in_executor(None, lambda: [d.poll(0.02) for _ in range(150)])
        try:
            creds = grpc.ssl_channel_credentials(root_certificates=pair.cert)
            opts = [("grpc.ssl_target_name_override", "localhost"), ("grpc.use_local_subchannel_pool", 1)]
            for _ in range(2):  # one connection each, the handed socket served and then closed
                async with grpc.aio.secure_channel(f"127.0.0.1:{d.port}", creds, options=opts) as ch:
                    call = ch.unary_unary("/t.E/Unary", request_serializer=Req.SerializeToString,
                                          response_deserializer=Resp.FromString)
                    assert (await call(Req(service="abcd"), timeout=5)).status == 1
            # a client that fails the handshake (plaintext on the TLS port) ends as well
            async with grpc.aio.insecure_channel(f"127.0.0.1:{d.port}") as ch:
                call = ch.unary_unary("/t.E/Unary", request_serializer=Req.SerializeToString,
                                      response_deserializer=Resp.FromString)
                with pytest.raises(grpc.aio.AioRpcError):
                    await call(Req(service="abcd"), timeout=2)
            for _ in range(200):
                if d.workers[0].handed >= 3 and d.open_counts() == [0]:
                    break
                await asyncio.sleep(0.02)
            assert d.workers[0].handed >= 3 and d.open_counts() == [0], (d.workers[0], d.open_counts())
        finally:
            await srv.stop(0)
            await poller
        d.poll(0.5)
        assert d.workers[0].stopped  # stop() told the supervisor

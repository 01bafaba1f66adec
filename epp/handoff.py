"""`--workers`: one listening socket in the supervisor, each accepted connection handed to the
worker with the fewest open ones.

SO_REUSEPORT lets the kernel pick a worker per connection by a hash of its addresses. Envoy opens
one HTTP/2 connection to the picker per Envoy worker thread, so a gateway with two threads in front
of two picker workers puts both connections on one worker half the time, and that worker serves
everything while the other idles. Here the supervisor accepts instead and sends each connection's
file descriptor (SCM_RIGHTS) over a Unix socket pair to the worker with the fewest connections it
still holds; the worker adopts it on its event loop (TLS handshake included) and says when it is
gone. Connections are long-lived, so the supervisor wakes only when one opens or closes.

The control stream of each worker carries, from the supervisor, one byte per connection with its
descriptor attached, and from the worker one byte per event: READY (taking connections), CLOSED (a
handed connection ended) and STOPPED (shutting down: hand it nothing more).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("epp.handoff")

CONN, READY, CLOSED, STOPPED = b"c", b"R", b"C", b"S"
SEND_TIMEOUT = 2.0  # a worker whose control stream stays full this long gets no more connections
ACCEPTS_PER_WAKE = 64  # bounded work per wake-up, so the children are still watched under a storm


def bind_listener(host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024) -> socket.socket:
    """A non-blocking TCP listener on host:port ("" = every address, IPv6 dual-stack where the
    system allows it; 0 = a port from the OS)."""
    host = host.strip("[]")
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and not host:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def control_pair() -> tuple[socket.socket, socket.socket]:
    """(the supervisor's end, the worker's end) of one worker's control stream; the worker's end
    is inheritable so it survives the exec."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.set_inheritable(True)
    mine.settimeout(SEND_TIMEOUT)
    return mine, theirs


@dataclass
class _Worker:
    index: int
    ctrl: socket.socket
    open: int = 0  # connections handed and not yet reported closed
    ready: bool = False
    stopped: bool = False
    handed: int = 0  # in all (logs, tests)


class Dispatcher:
    """The supervisor's side: accepts on `listener` and hands each connection to the ready worker
    with the fewest open ones (ties in turn, so a client opening one short connection after another
    still reaches every worker). With no worker ready, connections wait in the listen backlog."""

    def __init__(self, listener: socket.socket, ctrls: list[socket.socket]) -> None:
        self.listener = listener
        self.workers = [_Worker(i, c) for i, c in enumerate(ctrls)]
        self.sel = selectors.DefaultSelector()
        for w in self.workers:
            self.sel.register(w.ctrl, selectors.EVENT_READ, w)
        self._listening = False
        self._turn = 0  # the worker first in line among equals

    @property
    def port(self) -> int:
        """The port the listener is bound to."""
        return int(self.listener.getsockname()[1])

    def poll(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for connections and workers' reports, and act on them."""
        for key, _ in self.sel.select(timeout):
            if key.data is None:
                self._accept()
            else:
                self._read(key.data)
        self._update_listening()

    def open_counts(self) -> list[int]:
        """Each worker's open connections, as the supervisor counts them."""
        return [w.open for w in self.workers]

    def close(self) -> None:
        """Stop accepting; the workers' ends stay theirs."""
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(self.listener)
        self.sel.close()
        self.listener.close()
        for w in self.workers:
            w.ctrl.close()

    def _candidates(self) -> list[_Worker]:
        return [w for w in self.workers if w.ready and not w.stopped]

    def _update_listening(self) -> None:
        if self.listener.fileno() < 0:
            return
        if all(w.stopped for w in self.workers):
            # shutting down (or every worker gone): refuse from now on, as a single process closes
            # its listener, so a client tries another replica at once instead of waiting in the
            # backlog for a worker that will never take it
            if self._listening:
                self.sel.unregister(self.listener)
                self._listening = False
            self.listener.close()
            log.info("ext_proc listener closed: every worker stopped")
            return
        want = bool(self._candidates())
        if want and not self._listening:
            self.sel.register(self.listener, selectors.EVENT_READ, None)
        elif not want and self._listening:
            self.sel.unregister(self.listener)
        self._listening = want

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                conn, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. EMFILE: leave the rest in the backlog until the next wake
                log.warning("accept failed", extra={"error": str(e)})
                return
            with conn:
                self._hand(conn)

    def _hand(self, conn: socket.socket) -> None:
        while True:
            ready = self._candidates()
            if not ready:  # every worker stopping or stuck: the client sees the connection close
                return
            n = len(self.workers)
            w = min(ready, key=lambda x: (x.open, (x.index - self._turn) % n))
            try:
                socket.send_fds(w.ctrl, [CONN], [conn.fileno()])
            except OSError as e:  # gone, or its stream full for SEND_TIMEOUT: try the next one
                log.warning("worker takes no connections", extra={"worker": w.index, "error": str(e)})
                w.stopped = True
                continue
            w.open += 1
            w.handed += 1
            self._turn = w.index + 1
            return

    def _read(self, w: _Worker) -> None:
        try:
            data = w.ctrl.recv(4096, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the worker is gone (the supervisor's loop sees its exit code)
            self.sel.unregister(w.ctrl)
            w.stopped = True
            return
        w.ready = w.ready or READY in data
        w.stopped = w.stopped or STOPPED in data
        w.open = max(0, w.open - data.count(CLOSED))


class Receiver:
    """A worker's side: takes each connection the supervisor hands over on the control stream
    `fd` and gives it to `adopt(sock, closed)`, which must call `closed()` once the connection is
    gone (once; later calls are ignored)."""

    def __init__(self, fd: int, loop: Any, adopt: Callable[[socket.socket, Callable[[], None]], None]) -> None:
        self.ctrl = socket.socket(fileno=fd)
        self.ctrl.setblocking(False)
        self.loop = loop
        self.adopt = adopt
        self._pending = bytearray()  # reports the control stream had no room for yet
        self._reading = False
        self._taking = False
        self.adopted = 0
        self.refused = 0  # handed after stop() and closed (tests)

    def start(self) -> None:
        """Take connections from now on."""
        if not self._reading:
            self.loop.add_reader(self.ctrl.fileno(), self._readable)
            self._reading = True
        self._taking = True
        self._say(READY)

    def stop(self) -> None:
        """Take no more; connections already adopted are the server's to close. The control stream
        is still read: a connection the supervisor sent before it read STOPPED is closed at once
        (the client reconnects, to another worker), not left unanswered in the stream until exit."""
        if self._taking:
            self._taking = False
            self._say(STOPPED)

    def _readable(self) -> None:
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.ctrl, 1, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg, fds = b"", []
            if not msg:  # the supervisor is gone; this process is told to stop (PR_SET_PDEATHSIG)
                self.loop.remove_reader(self.ctrl.fileno())
                self._reading = False
                return
            for fd in fds:
                sock = socket.socket(fileno=fd)
                if not self._taking:
                    sock.close()
                    self.refused += 1
                    self._say(CLOSED)
                    continue
                self.adopted += 1
                self.adopt(sock, self._closer())

    def _closer(self) -> Callable[[], None]:
        done = False

        def closed() -> None:
            nonlocal done
            if not done:
                done = True
                self._say(CLOSED)

        return closed

    def _say(self, what: bytes) -> None:
        self._pending += what
        try:
            sent = self.ctrl.send(self._pending)
        except (BlockingIOError, InterruptedError):
            return  # sent with the next report
        except OSError:
            self._pending.clear()  # the supervisor is gone
            return
        del self._pending[:sent]

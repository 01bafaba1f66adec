"""Active-active replicas that tell each other what they route (`--ha-peers`, ours).

Each replica publishes, on a ZMQ PUB socket (`--ha-peer-port`), one message per request it routes
(the endpoint, +1 and the prompt's estimated tokens, and what its stateful plugins want the others
to learn: the precise producer's block keys as speculative entries, the approximate prefix index's
block hashes) and one per request that ends there (−1); every second a snapshot of its own
in-flight counts repairs anything lost. Every replica subscribes to every peer (`--ha-peers`:
host:port, or a DNS name resolving to every replica, e.g. a headless Service, re-resolved every
10 s) and folds the peers' counts into its endpoints' in-flight figures before each decision, so N
replicas count the pool's requests as one would, and learn each other's placements within a
message's delay instead of an engine event's (which comes only after the prefill).

No shared store: a peer that goes silent for 3 s is forgotten (its counts with it). Messages are
signed with HMAC-SHA256 under the first key of `--session-key-file` (the replicas' shared secret);
unsigned, mis-signed, oversized or malformed ones are dropped and counted.

Wire: three frames [b"epp-peers/1", msgpack payload, 16-byte MAC]; the payload is
[kind, replica id, seq, address, tokens, notes] for kind "r" (routed) and "f" (finished),
[kind, replica id, seq, {address: [requests, tokens]}] for "s" (snapshot), and
[kind, replica id, seq, [[address, notes], ...]] for "n" (notes only, between `--workers` siblings:
batched every 2 ms, a repeated note at most once a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from epp.datastore import Endpoint, tally

log = logging.getLogger("epp.peers")

TOPIC = b"epp-peers/1"
MAC_BYTES = 16
MAX_MESSAGE_BYTES = 1 << 20
MAX_PEERS = 64
MAX_ADDRESSES = 8192  # endpoints in one snapshot
HEARTBEAT = 1.0
EXPIRE_AFTER = 3.0
RESOLVE_EVERY = 10.0
DEFAULT_PORT = 9005
# notes-only siblings (--workers): notes go out in one message per BATCH_S, and the same note for the
# same endpoint at most once per RESEND_S (a repeated prompt refreshes the siblings' index that often)
BATCH_S = 0.002
RESEND_S = 1.0
MAX_RECENT = 8192
MAX_BATCH = 4096

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


@dataclass(slots=True)
class PeerStats:
    """Counters for tests and telemetry."""

    sent: int = 0
    received: int = 0
    dropped: int = 0  # bad MAC, malformed, too large, too many peers
    notes_applied: int = 0
    peers_expired: int = 0


@dataclass(slots=True)
class _Peer:
    seen: float
    counts: dict[str, list[int]] = field(default_factory=dict)


def parse_peers(text: str) -> list[tuple[str, int]]:
    """`host:port,host:port` (a host may be a DNS name of several replicas); ValueError when malformed."""
    out: list[tuple[str, int]] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item!r}: want host:port")
        out.append((host.strip("[]"), int(port)))
    return out


_AMOUNTS = (float, int)  # a note of this type is an amount to add (bool is neither: `type` is compared)


def _note_key(address: str, notes: Mapping[str, Any]) -> int | None:
    """What the resend guard remembers of the notes to `address` that can repeat, or None when all
    are amounts. The plugins' notes are chains of block hashes (each hash covers the blocks before
    it), so a list's length and last hash name the whole list; a number is an amount to add (the
    prefill-backlog scorer's seconds), left out of the key: notes-only siblings drop amounts (their
    shared memory carries the clocks), active-active peers get every routed request's notes anyway;
    anything else is hashed from its encoding. A collision only keeps one note from the siblings for
    RESEND_S."""
    if len(notes) == 1:  # the usual case: the prefix index's note alone
        ((name, note),) = notes.items()
        if type(note) is list and note and type(note[-1]) is int:
            return hash((address, name, len(note), note[-1]))
    parts: list[Any] = [address]
    for name, note in notes.items():
        if type(note) is list and note and type(note[-1]) is int:
            parts += (name, len(note), note[-1])
        elif type(note) not in _AMOUNTS:
            return hash((address, _encode({k: v for k, v in notes.items() if type(v) not in _AMOUNTS})))
    return hash(tuple(parts)) if len(parts) > 1 else None


def sign(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()[:MAC_BYTES]


class PeerSync:
    """One replica's side: publish its routes, hear its peers', fold their counts in.

    Loop side (the serving loop): `routed`, `refresh`, `start`, `stop`. The receiving thread keeps
    the peers' counts (dict updates the loop reads whole) and hands plugin notes to the loop in
    batches (the approximate index is not thread-safe)."""

    def __init__(self, *, key: bytes, port: int, peers: Sequence[tuple[str, int]], bind_address: str = "0.0.0.0",
                 scheduler: Any = None, endpoints: Callable[[str], Endpoint | None] | None = None,
                 replica_id: bytes | None = None,
                 resolve: Callable[[str, int], list[str]] | None = None,
                 bind_url: str = "", peer_urls: Sequence[str] = (), notes_only: bool = False) -> None:
        if len(key) < 16:
            raise ValueError("the peers' key needs at least 16 bytes")
        self.key = key
        self.port = port
        self.peers = list(peers)
        # --workers siblings (epp.server): fixed ZMQ endpoints (ipc://) instead of host:port, and only
        # the plugins' notes (the workers' in-flight counts already go through shared memory)
        self.bind_url = bind_url
        self.peer_urls = list(peer_urls)
        self.notes_only = notes_only
        self._batch: list[list[Any]] = []  # notes-only: what the next batch message carries
        self._recent: dict[int, float] = {}  # notes-only: hash of (address, note) -> when last sent
        self.bind_address = bind_address
        self.scheduler = scheduler
        # the scheduler's note gatherer, looked up once (routed runs for every request)
        self._gather: Callable[[Any, Endpoint], Mapping[str, Any]] | None = (
            getattr(scheduler, "peer_notes", None) if scheduler is not None else None)
        self.endpoint_of = endpoints or (lambda _address: None)  # the datastore's endpoint for an address
        self.replica_id = replica_id or os.urandom(8)
        self.stats = PeerStats()
        self._resolve = resolve or _resolve
        self._own: dict[str, list[int]] = {}
        self._totals: dict[str, list[int]] = {}  # address -> peers' [requests, tokens] (the thread writes)
        self._peers: dict[bytes, _Peer] = {}
        self._seq = 0
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._pub: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._heartbeat: asyncio.TimerHandle | None = None
        self._bad_logged = False

    # ---- lifecycle (loop) -----------------------------------------------------------------
    def start(self) -> int:
        """Bind the PUB socket, start hearing the peers; returns the bound port. Call on the loop."""
        self._loop = asyncio.get_running_loop()
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, 10000)
        pub.setsockopt(zmq.LINGER, 0)
        host = self.bind_address if self.bind_address not in ("", "0.0.0.0", "::") else "*"
        if self.bind_url:
            pub.bind(self.bind_url)
        elif self.port:
            pub.bind(f"tcp://{host}:{self.port}")
        else:
            self.port = pub.bind_to_random_port(f"tcp://{host}")
        self._pub = pub
        self._thread = threading.Thread(target=self._run, name="peers", daemon=True)
        self._thread.start()
        if not self.notes_only:
            self._heartbeat = self._loop.call_later(HEARTBEAT, self._beat)
            log.info("active-active peers on", extra={"port": self.port, "peers": [f"{h}:{p}" for h, p in self.peers]})
        return self.port

    async def stop(self) -> None:
        """Stop hearing and publishing."""
        self._flush()
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
            self._thread = None
        if self._pub is not None:
            self._pub.close(0)
            self._pub = None
        if self.bind_url.startswith("ipc://"):  # libzmq leaves the socket file when the process ends first
            with contextlib.suppress(OSError):
                os.unlink(self.bind_url[len("ipc://"):])

    # ---- the serving loop ---------------------------------------------------------------
    def routed(self, ep: Endpoint, requests: int, tokens: int, request: Any = None) -> None:
        """This replica sent (+1, with `request` for the plugins' notes) or finished (−1) one on `ep`."""
        gather = self._gather
        if self.notes_only:  # the siblings' hot path: no counts, and most notes are repeats
            if request is not None and gather is not None:
                found = gather(request, ep)
                if found:
                    self._queue_note(ep.address, found)
            return
        tally(self._own, ep.address, requests, tokens)
        notes: Mapping[str, Any] = {}
        if request is not None and gather is not None:
            notes = gather(request, ep)
        self._send(["r" if requests > 0 else "f", self.replica_id, self._next_seq(), ep.address, tokens,
                    dict(notes)])

    def refresh(self, endpoints: Sequence[Endpoint]) -> None:
        """Before a decision: each endpoint's in-flight figures become this replica's own plus its peers'
        (notes-only siblings count nothing: their shared memory has the counts)."""
        if self.notes_only:
            return
        own, totals = self._own, self._totals
        for ep in endpoints:
            mine = own.get(ep.address)
            theirs = totals.get(ep.address)
            if mine is None and theirs is None:
                ep.inflight = ep.inflight_tokens = 0
                continue
            ep.inflight = (mine[0] if mine else 0) + (max(0, theirs[0]) if theirs else 0)
            ep.inflight_tokens = (mine[1] if mine else 0) + (max(0, theirs[1]) if theirs else 0)

    def _queue_note(self, address: str, notes: Mapping[str, Any]) -> None:
        key = _note_key(address, notes)
        if key is None:  # amounts only: the workers' shared memory carries those (epp.workershare)
            return
        if len(notes) > 1:
            notes = {k: v for k, v in notes.items() if type(v) not in _AMOUNTS}
        now = time.monotonic()
        last = self._recent.get(key)
        if last is not None and now - last < RESEND_S:
            return  # the siblings heard this one a moment ago
        if len(self._recent) >= MAX_RECENT:
            self._recent.clear()
        self._recent[key] = now
        self._batch.append([address, dict(notes)])
        if len(self._batch) >= MAX_BATCH:
            self._flush()
        elif len(self._batch) == 1 and self._loop is not None:
            self._loop.call_later(BATCH_S, self._flush)

    def _flush(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            self._send(["n", self.replica_id, self._next_seq(), batch])

    def peer_count(self) -> int:
        """Peers heard from within the last EXPIRE_AFTER seconds."""
        return len(self._peers)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send(self, message: list[Any]) -> None:
        if self._pub is None:
            return
        payload = _encode(message)
        try:
            self._pub.send_multipart([TOPIC, payload, sign(self.key, payload)], zmq.NOBLOCK)
            self.stats.sent += 1
        except zmq.ZMQError:  # no subscriber room (HWM): the next snapshot repairs the counts
            pass

    def _beat(self) -> None:
        if self._loop is None or self._stop.is_set():
            return
        snapshot = {a: list(c) for a, c in list(self._own.items())[:MAX_ADDRESSES]}
        self._send(["s", self.replica_id, self._next_seq(), snapshot])
        self._heartbeat = self._loop.call_later(HEARTBEAT, self._beat)

    def _apply_notes(self, batch: list[tuple[str, Mapping[str, Any]]]) -> None:
        apply = getattr(self.scheduler, "apply_peer_notes", None) if self.scheduler is not None else None
        if apply is None:
            return
        for address, notes in batch:
            ep = self.endpoint_of(address)
            if ep is None:
                continue  # not in this replica's pool (yet)
            try:
                apply(ep, notes)
                self.stats.notes_applied += 1
            except Exception as e:  # a peer's odd note never breaks this replica
                self.stats.dropped += 1
                log.debug("a peer's note was not applied", extra={"error": str(e)})

    # ---- the receiving thread -----------------------------------------------------------
    def _run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 100000)
        sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sub.setsockopt(zmq.LINGER, 0)
        # a peer that starts later (or restarts) is reached within a second: what it publishes before
        # that is lost to this replica (PUB/SUB), and its snapshots repair only the counts
        sub.setsockopt(zmq.RECONNECT_IVL, 100)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
        connected: set[str] = set()
        next_resolve = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_resolve:
                    connected = self._connect(sub, connected)
                    next_resolve = now + RESOLVE_EVERY
                if sub.poll(100):
                    notes = self._drain(sub)
                    if notes and self._loop is not None and not self._loop.is_closed():
                        self._loop.call_soon_threadsafe(self._apply_notes, notes)
                self._expire(time.monotonic())
        except Exception:
            log.exception("the peers' receiving thread stopped")
        finally:
            sub.close(0)

    def _connect(self, sub: Any, connected: set[str]) -> set[str]:
        want: set[str] = set(self.peer_urls)
        for host, port in self.peers:
            for ip in self._resolve(host, port):
                want.add(f"tcp://{ip}:{port}" if ":" not in ip else f"tcp://[{ip}]:{port}")
        for url in want - connected:
            try:
                sub.connect(url)
            except zmq.ZMQError as e:
                log.warning("a peer could not be connected", extra={"peer": url, "error": str(e)})
        for url in connected - want:
            try:
                sub.disconnect(url)
            except zmq.ZMQError:
                pass
        return want

    def _drain(self, sub: Any) -> list[tuple[str, Mapping[str, Any]]]:
        notes: list[tuple[str, Mapping[str, Any]]] = []
        for _ in range(10000):  # bounded: the loop gets its batch even under a flood
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            got = self._accept(frames)
            if isinstance(got, list):
                notes.extend(got)
            elif got is not None:
                notes.append(got)
        return notes

    def _accept(self, frames: list[bytes]) -> tuple[str, Mapping[str, Any]] | list[tuple[str, Any]] | None:
        """Apply one message's counts; its notes (address, {plugin: note}) when it has any (a list of
        them for a sibling's batch)."""
        if (len(frames) != 3 or frames[0] != TOPIC or len(frames[2]) != MAC_BYTES
                or not hmac.compare_digest(frames[2], sign(self.key, frames[1]))):
            self._bad("unsigned or mis-signed")
            return None
        try:
            msg = _decode(frames[1])
            kind, rid = msg[0], msg[1]
            if not isinstance(rid, bytes) or kind not in ("r", "f", "s", "n"):
                raise ValueError("kind")
        except (msgspec.DecodeError, ValueError, TypeError, IndexError):
            self._bad("malformed")
            return None
        if rid == self.replica_id:
            return None  # our own, heard back through a DNS name that includes us
        peer = self._peers.get(rid)
        if peer is None:
            if len(self._peers) >= MAX_PEERS:
                self._bad("too many peers")
                return None
            peer = self._peers[rid] = _Peer(seen=time.monotonic())
        peer.seen = time.monotonic()
        self.stats.received += 1
        try:
            if kind == "s":
                self._snapshot(peer, msg[3])
                return None
            if kind == "n":  # a sibling's batch of notes
                return [(str(a), n) for a, n in msg[3][:MAX_BATCH] if isinstance(n, dict) and n]
            address, tokens, notes = str(msg[3]), int(msg[4]), msg[5]
        except (ValueError, TypeError, IndexError, AttributeError):
            self._bad("malformed")
            return None
        step = 1 if kind == "r" else -1
        self._add(peer, address, step, abs(tokens) * step)
        if kind == "r" and isinstance(notes, dict) and notes:
            return address, notes
        return None

    def _add(self, peer: _Peer, address: str, requests: int, tokens: int) -> None:
        c = peer.counts.get(address)
        if c is None:
            if requests < 0 or len(peer.counts) >= MAX_ADDRESSES:
                return
            c = peer.counts[address] = [0, 0]
        dn = max(-c[0], requests)
        dt = max(-c[1], tokens)
        c[0] += dn
        c[1] += dt
        t = self._totals.get(address)
        if t is None:
            t = self._totals[address] = [0, 0]
        t[0] += dn
        t[1] += dt
        if not c[0]:
            t[1] -= c[1]
            del peer.counts[address]

    def _snapshot(self, peer: _Peer, counts: Any) -> None:
        if not isinstance(counts, dict) or len(counts) > MAX_ADDRESSES:
            raise ValueError("snapshot")
        for address, c in list(peer.counts.items()):
            self._add(peer, address, -c[0], -c[1])
        for address, (n, t) in counts.items():
            if int(n) > 0:
                self._add(peer, str(address), int(n), max(0, int(t)))

    def _expire(self, now: float) -> None:
        for rid, peer in list(self._peers.items()):
            if now - peer.seen > EXPIRE_AFTER:
                for address, c in list(peer.counts.items()):
                    self._add(peer, address, -c[0], -c[1])
                del self._peers[rid]
                self.stats.peers_expired += 1
                log.info("a peer went silent; its in-flight counts are dropped", extra={"peer": rid.hex()})

    def _bad(self, why: str) -> None:
        self.stats.dropped += 1
        if not self._bad_logged:
            self._bad_logged = True
            log.warning("a peer message was dropped (logged once)", extra={"why": why})


def _resolve(host: str, port: int) -> list[str]:
    """Every address `host` names (a headless Service: one per replica); [] when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


class PeerCollector:
    """`inference_extension_peers_*` (ours): the peers heard and the messages, read at scrape time."""

    def __init__(self, peers: PeerSync) -> None:
        self.peers = peers

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.peers.stats
        g = GaugeMetricFamily("inference_extension_peers_known",
                              "Active-active peers heard from within the expiry window.")
        g.add_metric([], self.peers.peer_count())
        yield g
        c = CounterMetricFamily("inference_extension_peer_messages",
                                "Peer messages: sent, received, dropped (unsigned, malformed, over a bound).",
                                labels=["outcome"])
        for outcome, v in (("sent", st.sent), ("received", st.received), ("dropped", st.dropped)):
            c.add_metric([outcome], v)
        yield c
        yield CounterMetricFamily("inference_extension_peers_expired", "Peers forgotten after going silent.",
                                  value=st.peers_expired)

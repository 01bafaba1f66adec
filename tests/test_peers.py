"""Active-active peers (epp.peers) over real ZMQ sockets on loopback: a replica's routes reach the
others as in-flight counts and plugin notes, finishes and snapshots keep them right, a silent peer
is forgotten, and nothing unsigned, malformed or flooding gets in."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
import zmq

from epp import peers as peers_mod
from epp.datastore import Endpoint
from epp.peers import PeerSync, _note_key, parse_peers, sign
from tests.procs import free_port

KEY = b"k" * 32
X, Y = "10.0.0.1:8000", "10.0.0.2:8000"


def ep(address: str) -> Endpoint:
    ip, _, port = address.rpartition(":")
    return Endpoint(address=address, ip=ip, port=int(port), pod=address)


class Notes:
    """A scheduler's peer hooks: notes the prompt it routed, records what peers noted."""

    def __init__(self) -> None:
        self.applied: list[tuple[str, dict[str, Any]]] = []

    def peer_notes(self, request: Any, endpoint: Endpoint) -> dict[str, Any]:
        return {"prefix": [1, 2, 3]} if request is not None else {}

    def apply_peer_notes(self, endpoint: Endpoint, notes: dict[str, Any]) -> None:
        self.applied.append((endpoint.address, dict(notes)))


def siblings(tmp_path: Any, sender: Any) -> tuple[PeerSync, PeerSync, Notes, dict[str, Endpoint], dict[str, Endpoint]]:
    """Two notes-only siblings over ipc:// (as --workers run them), started: a (with `sender`'s
    notes) publishes to b, whose scheduler records what it hears."""
    urls = [f"ipc://{tmp_path}/s.peer{i}" for i in range(2)]
    notes = Notes()
    a_eps, b_eps = {X: ep(X)}, {X: ep(X)}
    a = PeerSync(key=KEY, port=0, peers=[], scheduler=sender, endpoints=a_eps.get, bind_url=urls[0],
                 peer_urls=[urls[1]], notes_only=True)
    b = PeerSync(key=KEY, port=0, peers=[], scheduler=notes, endpoints=b_eps.get, bind_url=urls[1],
                 peer_urls=[urls[0]], notes_only=True)
    a.start()
    b.start()
    return a, b, notes, a_eps, b_eps


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[PeerSync, PeerSync, Notes, dict[str, Endpoint]]]:
    pa, pb = free_port(), free_port()
    b_eps = {X: ep(X), Y: ep(Y)}
    notes = Notes()
    a = PeerSync(key=KEY, port=pa, peers=[("127.0.0.1", pb)], bind_address="127.0.0.1", scheduler=Notes())
    b = PeerSync(key=KEY, port=pb, peers=[("127.0.0.1", pa), ("127.0.0.1", pb)],  # b hears itself too
                 bind_address="127.0.0.1", scheduler=notes, endpoints=b_eps.get)
    a.start()
    b.start()
    try:
        yield a, b, notes, b_eps
    finally:
        await a.stop()
        await b.stop()


async def connected(a: PeerSync, b: PeerSync, b_eps: dict[str, Endpoint]) -> None:
    """PUB/SUB drops what is sent before the subscription: route and finish until one arrives."""
    probe = ep(Y)
    for _ in range(200):
        a.routed(probe, 1, 1)
        a.routed(probe, -1, -1)
        await asyncio.sleep(0.02)
        if b.stats.received:
            return
    raise AssertionError("the peers never connected")


def test_peer_lists_parse_and_refuse() -> None:
    assert parse_peers("a.svc:9005, 10.0.0.2:9005,[::1]:9005") == [("a.svc", 9005), ("10.0.0.2", 9005),
                                                                   ("::1", 9005)]
    for bad in ("a.svc", "a.svc:x", ":9005", "h:70000"):
        with pytest.raises(ValueError):
            parse_peers(bad)
    with pytest.raises(ValueError, match="16 bytes"):
        PeerSync(key=b"short", port=0, peers=[])


async def test_a_peers_routes_are_counted_and_its_notes_applied(pair: Any) -> None:
    a, b, notes, b_eps = pair
    await connected(a, b, b_eps)
    for _ in range(3):
        a.routed(ep(X), 1, 100, request=object())
    await until(lambda: (b.refresh(list(b_eps.values())), b_eps[X].inflight)[1] == 3)
    assert b_eps[X].inflight_tokens == 300 and b_eps[Y].inflight == 0
    await until(lambda: len([n for n in notes.applied if n[0] == X]) == 3)
    assert (X, {"prefix": [1, 2, 3]}) in notes.applied
    b.routed(b_eps[X], 1, 10)  # b's own request there: its count plus a's
    b.refresh([b_eps[X]])
    assert b_eps[X].inflight == 4
    a.routed(ep(X), -1, -100)
    await until(lambda: (b.refresh([b_eps[X]]), b_eps[X].inflight)[1] == 3)
    assert b.peer_count() == 1  # its own messages, heard back, are not a peer


async def test_a_snapshot_repairs_what_was_lost_and_a_silent_peer_is_forgotten(
        pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, _notes, b_eps = pair
    await connected(a, b, b_eps)
    # counts changed while nobody heard them (as if the messages were dropped): the snapshot tells
    a._own[X] = [5, 50]
    a._beat()
    await until(lambda: (b.refresh([b_eps[X]]), b_eps[X].inflight)[1] == 5)
    monkeypatch.setattr(peers_mod, "EXPIRE_AFTER", 0.3)
    await a.stop()
    await until(lambda: b.peer_count() == 0)
    b.refresh([b_eps[X]])
    assert b_eps[X].inflight == 0 and b.stats.peers_expired == 1


async def test_unsigned_malformed_and_flooding_messages_are_dropped() -> None:
    ctx = zmq.Context.instance()
    rogue = ctx.socket(zmq.PUB)
    rogue.setsockopt(zmq.LINGER, 0)
    port = rogue.bind_to_random_port("tcp://127.0.0.1")
    b_eps = {X: ep(X), Y: ep(Y)}
    b = PeerSync(key=KEY, port=free_port(), peers=[("127.0.0.1", port)], bind_address="127.0.0.1",
                 endpoints=b_eps.get)
    b.start()
    try:
        forged = msgspec.msgpack.encode(["r", b"r" * 8, 1, X, 100, {}])
        good = msgspec.msgpack.encode(["r", b"g" * 8, 1, Y, 100, {}])
        deadline = time.monotonic() + 10
        while b.stats.received == 0 and time.monotonic() < deadline:
            rogue.send_multipart([peers_mod.TOPIC, forged, b"\0" * 16])  # wrong MAC
            rogue.send_multipart([peers_mod.TOPIC, b"\xc1garbage", sign(KEY, b"\xc1garbage")])  # signed garbage
            rogue.send_multipart([peers_mod.TOPIC, good, sign(KEY, good)])
            await asyncio.sleep(0.05)
        assert b.stats.received >= 1 and b.stats.dropped >= 2
        b.refresh(list(b_eps.values()))
        assert b_eps[X].inflight == 0  # the forged one counted nothing
        # a flood of signed messages from ever new replica ids: at most MAX_PEERS are kept
        dropped = b.stats.dropped
        for i in range(peers_mod.MAX_PEERS * 3):
            m = msgspec.msgpack.encode(["r", i.to_bytes(8, "big"), 1, f"10.9.{i // 250}.{i % 250}:8000", 1, {}])
            rogue.send_multipart([peers_mod.TOPIC, m, sign(KEY, m)])
        await until(lambda: b.stats.dropped >= dropped + peers_mod.MAX_PEERS, timeout=10)
        assert b.peer_count() <= peers_mod.MAX_PEERS
    finally:
        await b.stop()
        rogue.close(0)


async def test_the_peer_counters_are_exported(pair: Any) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from epp.peers import PeerCollector

    a, b, _notes, b_eps = pair
    await connected(a, b, b_eps)
    r = CollectorRegistry()
    r.register(PeerCollector(b))  # type: ignore[arg-type]
    text = generate_latest(r).decode()
    assert "inference_extension_peers_known 1.0" in text
    assert 'inference_extension_peer_messages_total{outcome="received"}' in text
    assert "inference_extension_peers_expired_total 0.0" in text


async def test_notes_only_siblings_over_ipc_send_notes_and_nothing_else(tmp_path: Any) -> None:
    """--workers siblings: fixed ipc:// endpoints; only routed requests' plugin notes are sent, in
    batches, a repeated note at most once a second (no finishes, no snapshots, no counts: shared
    memory has those)."""

    class Counting(Notes):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def peer_notes(self, request: Any, endpoint: Endpoint) -> dict[str, Any]:
            self.n += 1
            return {"prefix": [self.n]} if request == "new" else {"prefix": [0]}

    a, b, notes, a_eps, b_eps = siblings(tmp_path, Counting())
    try:
        for _ in range(200):  # PUB/SUB: sends before the subscription are lost
            a.routed(a_eps[X], 1, 100, request="new")
            await asyncio.sleep(0.02)
            if notes.applied:
                break
        assert notes.applied and notes.applied[0][0] == X
        await asyncio.sleep(0.05)
        sent, applied = a.stats.sent, len(notes.applied)
        for _ in range(50):  # one batch for 50 new notes
            a.routed(a_eps[X], 1, 100, request="new")
        await until(lambda: len(notes.applied) == applied + 50)
        assert a.stats.sent == sent + 1
        for _ in range(20):  # the same note again and again: sent once
            a.routed(a_eps[X], 1, 100, request="same")
        await asyncio.sleep(0.05)
        assert a.stats.sent == sent + 2 and len(notes.applied) == applied + 51
        a.routed(a_eps[X], -1, -100)  # a finish: nothing to tell
        a.routed(a_eps[X], 1, 100)  # a count without a request: no notes, nothing sent
        await asyncio.sleep(1.2)  # past a heartbeat: no snapshot either
        assert a.stats.sent == sent + 2
        b.refresh(list(b_eps.values()))
        assert b_eps[X].inflight == 0  # counts are not folded in from notes
    finally:
        await a.stop()
        await b.stop()
    assert not list(tmp_path.iterdir())  # the socket files are removed


def test_the_resend_guard_tells_chains_apart_by_length_and_last_hash() -> None:
    """A note that is a chain of block hashes is remembered by its length and last hash (cheap for
    every routed request); any other note by its encoding. Different notes never share a key here."""
    chain = [11, 22, 33]
    key = _note_key(X, {"prefix": chain})
    assert key == _note_key(X, {"prefix": list(chain)})
    assert len({key, _note_key(Y, {"prefix": chain}), _note_key(X, {"prefix": chain[:2]}),
                _note_key(X, {"prefix": [11, 22, 34]}), _note_key(X, {"other": chain}),
                _note_key(X, {"prefix": chain, "precise": [5]})}) == 6
    odd = {"prefix": {"not": "a chain"}}
    assert _note_key(X, odd) == _note_key(X, {"prefix": {"not": "a chain"}}) != _note_key(X, {"prefix": {"x": 1}})
    assert _note_key(X, {"prefix": ["a", "b"]}) != _note_key(X, {"prefix": ["a", "c"]})


def test_the_resend_guard_never_holds_back_an_amount() -> None:
    """A number in a note is an amount the siblings add (the prefill-backlog scorer's seconds): two
    equal ones are two requests, so it is left out of the key (only amounts: no key at all)."""
    assert _note_key(X, {"prefill-backlog-scorer": 0.05}) is None
    assert _note_key(X, {"prefill-backlog-scorer": 0.05, "n": 3}) is None
    chain = {"prefix-cache-scorer": [1, 2]}
    assert _note_key(X, {**chain, "prefill-backlog-scorer": 0.05}) == _note_key(X, chain) is not None
    assert _note_key(X, {**chain, "prefill-backlog-scorer": 0.07}) == _note_key(X, chain)
    odd = {"o": {"x": 1}}
    assert _note_key(X, {**odd, "prefill-backlog-scorer": 0.05}) == _note_key(X, {**odd, "prefill-backlog-scorer": 9})
    assert _note_key(X, {**chain, "flag": True}) != _note_key(X, chain)  # a bool is no amount


async def test_notes_only_siblings_drop_amounts(tmp_path: Any) -> None:
    """--workers siblings: the backlog amount is left out of the notes (the workers' shared memory
    carries the prefill clocks) and the prefix chain goes once, as without it (over ipc)."""

    class Amount(Notes):
        def peer_notes(self, request: Any, endpoint: Endpoint) -> dict[str, Any]:
            if request == "amount":
                return {"prefill-backlog-scorer": 0.05}
            return {"prefix": [7], "prefill-backlog-scorer": 0.05} if request is not None else {}

    a, b, notes, a_eps, b_eps = siblings(tmp_path, Amount())
    try:
        sent = a.stats.sent
        for _ in range(20):
            a.routed(a_eps[X], 1, 100, request="amount")
        await asyncio.sleep(0.05)
        assert a.stats.sent == sent  # amounts alone: nothing to send
        for _ in range(200):  # PUB/SUB: sends before the subscription are lost
            a._recent.clear()
            a.routed(a_eps[X], 1, 100, request="r")
            await asyncio.sleep(0.02)
            if notes.applied:
                break
        assert notes.applied and all(n == {"prefix": [7]} for _, n in notes.applied)
    finally:
        await a.stop()
        await b.stop()

"""ZMQ subscribers that feed the precise index, on one thread of their own (never the serving loop).

Two modes, as llm-d runs them:
- centralized: the picker binds `zmqEndpoint` (e.g. `tcp://*:5557`) and every engine connects to
  it; the topic `kv@<ip:port>@<model>` names the endpoint and the model;
- per pod: the picker dials each endpoint's publisher (`tcp://<podIP>:<socketPort + rank>`) as
  endpoints come and go (`add_source` / `remove_source`); the socket a message came from names the
  endpoint, the topic (when it has llm-d's shape) the model.

Per source, messages are applied in arrival order. Sequence numbers are tracked per source: a gap
is counted and, when the source has a replay endpoint (vLLM's ROUTER socket), the missed messages
are fetched from it before going on; a stream that starts again from a lower number (the engine
restarted) clears that endpoint's blocks first. A replay that fails leaves the stream as it is (the
live messages still apply) and is not retried for `REPLAY_COOLDOWN` seconds.

Bounded under any stream: each socket queues at most `RCV_HWM` messages (ZMQ drops beyond, which
shows up as a gap) and refuses frames over `MAX_MESSAGE_BYTES`; the index has its own bounds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from epp.kvevents.index import PreciseIndex
from epp.kvevents.wire import TOPIC_PREFIX, VLLM, WireError, decode_payload, parse_frames, parse_topic

log = logging.getLogger("epp.kvevents")

RCV_HWM = 10_000
MAX_MESSAGE_BYTES = 16 << 20
POLL_MS = 20
MAX_BATCH = 256  # messages taken from one socket before looking at the others
REPLAY_IDLE = 2.0  # s without a replay frame: give up that attempt
REPLAY_TOTAL = 10.0  # s for one whole replay
REPLAY_COOLDOWN = 30.0
END_SEQ = b"\xff" * 8  # vLLM ends a replay with seq -1 (signed, big-endian) and an empty payload


@dataclass(slots=True)
class SubscriberStats:
    messages: int = 0
    malformed: int = 0  # frames or payloads that do not decode
    foreign_topics: int = 0  # centralized mode: topics that do not name an endpoint
    duplicates: int = 0  # sequence numbers already applied
    gaps: int = 0
    missed: int = 0  # messages the gaps skipped (before any replay)
    replays: int = 0
    replayed: int = 0  # messages recovered by replays
    replay_failures: int = 0
    resets: int = 0  # a stream restarted from a lower sequence number
    apply_seconds: float = 0.0  # time spent decoding and indexing


@dataclass(slots=True, eq=False)
class Source:
    """One socket's stream. `address` is the endpoint for per-pod sources ("" when centralized)."""

    address: str
    endpoint: str
    replay: str = ""
    bind: bool = False
    sock: Any = None
    last_seq: int | None = None
    replay_failed_at: float = -1e18
    models: dict[str, str] = field(default_factory=dict)  # centralized: endpoint -> last sequence seen


class KVEventSubscriber:
    """Runs the sources on one thread and applies their events to `index`.

    `engine` is the wire variant (`vllm` | `sglang`); `model` the model name used when a per-pod
    topic does not carry one. `on_batch(address)` (optional) is called after each applied message.
    """

    def __init__(self, index: PreciseIndex, *, engine: str = VLLM, topic_filter: str = TOPIC_PREFIX,
                 model: str = "", on_batch: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.index = index
        self.engine = engine
        self.topic_filter = topic_filter
        self.model = model
        self.on_batch = on_batch
        self.clock = clock
        self.stats = SubscriberStats()
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._sources: dict[str, Source] = {}  # key: address (per pod) or the bind endpoint
        self._central_seq: dict[str, int] = {}  # centralized: per topic, last sequence applied
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.bound: dict[str, str] = {}  # bind endpoint -> the address actually bound (port 0 resolved)
        self._bound_ev = threading.Event()

    # ---- control (any thread) ------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def bind(self, endpoint: str, wait: float = 5.0) -> str:
        """Centralized mode: bind `endpoint` (engines connect); returns the bound address."""
        self._bound_ev.clear()
        self._commands.put(("bind", endpoint))
        self.start()
        self._bound_ev.wait(wait)
        return self.bound.get(endpoint, "")

    def add_source(self, address: str, endpoint: str, replay: str = "") -> None:
        """Per-pod mode: dial `endpoint` for endpoint `address` (idempotent; a changed endpoint redials)."""
        self._commands.put(("add", Source(address, endpoint, replay)))
        self.start()

    def remove_source(self, address: str) -> None:
        """Stop listening to `address` and forget its blocks."""
        self._commands.put(("remove", address))
        self.start()

    def sources(self) -> list[str]:
        return list(self._sources)

    # ---- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        by_sock: dict[Any, Source] = {}
        try:
            while not self._stop.is_set():
                self._control(poller, by_sock)
                if not by_sock:
                    time.sleep(POLL_MS / 1000)
                    continue
                try:
                    ready = poller.poll(POLL_MS)
                except zmq.ZMQError:
                    continue
                for sock, _ in ready:
                    src = by_sock.get(sock)
                    if src is None:
                        continue
                    for _ in range(MAX_BATCH):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        except zmq.ZMQError:
                            break
                        self._handle(src, frames)
        finally:
            for sock in by_sock:
                sock.close(linger=0)

    def _open(self, src: Source) -> Any:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, RCV_HWM)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 200)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        sock.setsockopt_string(zmq.SUBSCRIBE, self.topic_filter)
        if src.bind:
            sock.bind(src.endpoint)
        else:
            sock.connect(src.endpoint)
        return sock

    def _control(self, poller: zmq.Poller, by_sock: dict[Any, Source]) -> None:
        while True:
            try:
                cmd, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd == "bind":
                src = Source("", arg, bind=True)
                try:
                    src.sock = self._open(src)
                except zmq.ZMQError as e:
                    log.error("kv events: cannot bind %s: %s", arg, e)
                    self._bound_ev.set()
                    continue
                self.bound[arg] = src.sock.getsockopt_string(zmq.LAST_ENDPOINT)
                self._sources[arg] = src
                by_sock[src.sock] = src
                poller.register(src.sock, zmq.POLLIN)
                self._bound_ev.set()
            elif cmd == "add":
                src = arg
                old = self._sources.get(src.address)
                if old is not None and old.endpoint == src.endpoint and old.replay == src.replay:
                    continue
                if old is not None:
                    self._close(old, poller, by_sock)
                try:
                    src.sock = self._open(src)
                except zmq.ZMQError as e:
                    log.error("kv events: cannot dial %s for %s: %s", src.endpoint, src.address, e)
                    continue
                self._sources[src.address] = src
                by_sock[src.sock] = src
                poller.register(src.sock, zmq.POLLIN)
            elif cmd == "remove":
                old = self._sources.pop(arg, None)
                if old is not None:
                    self._close(old, poller, by_sock)
                self.index.forget(arg)

    @staticmethod
    def _close(src: Source, poller: zmq.Poller, by_sock: dict[Any, Source]) -> None:
        poller.unregister(src.sock)
        by_sock.pop(src.sock, None)
        src.sock.close(linger=0)

    # ---- one message ---------------------------------------------------------------------
    def _handle(self, src: Source, frames: list[bytes]) -> None:
        st = self.stats
        st.messages += 1
        try:
            topic, seq, payload = parse_frames(frames)
        except WireError:
            st.malformed += 1
            return
        ep, model = parse_topic(topic)
        if src.bind:
            if not ep:
                st.foreign_topics += 1
                return
            address = ep
        else:
            address = src.address
        model = model or self.model
        if src.bind:
            last = self._central_seq.get(topic)
            if last is not None and seq <= last and seq + 1000 > last:
                st.duplicates += 1
                return
            if last is not None and seq < last:  # the engine restarted: its cache is new
                st.resets += 1
                self.index.clear(address)
            elif last is not None and seq > last + 1:
                st.gaps += 1
                st.missed += seq - last - 1
            if len(self._central_seq) > 4 * self.index.max_pods:
                self._central_seq.clear()
            self._central_seq[topic] = seq
            self._apply(address, model, payload)
            return
        last = src.last_seq
        if last is not None and seq <= last:
            if seq + 1000 > last and seq != 0:
                st.duplicates += 1
                return
            st.resets += 1  # a restarted engine counts from 0 again
            self.index.clear(address)
            src.last_seq = None
            last = None
        if last is None and seq > 0 and src.replay and self._may_replay(src):
            self._replay(src, 0, address, model)  # joined mid-stream: fetch what the engine still buffers
            last = src.last_seq
        elif last is not None and seq > last + 1:
            st.gaps += 1
            st.missed += seq - last - 1
            if src.replay and self._may_replay(src):
                self._replay(src, last + 1, address, model)
                last = src.last_seq
        if last is not None and seq <= last:
            st.duplicates += 1  # the replay already brought it
            return
        src.last_seq = seq
        self._apply(address, model, payload)

    def _apply(self, address: str, model: str, payload: bytes) -> None:
        t0 = time.perf_counter()
        try:
            batch = decode_payload(payload, self.engine)
        except WireError as e:
            self.stats.malformed += 1
            log.debug("kv events from %s: %s", address, e)
            return
        self.index.apply(address, model, batch)
        self.stats.apply_seconds += time.perf_counter() - t0
        if self.on_batch is not None:
            self.on_batch(address)

    def _may_replay(self, src: Source) -> bool:
        return self.clock() - src.replay_failed_at >= REPLAY_COOLDOWN

    def _replay(self, src: Source, start: int, address: str, model: str) -> None:
        """Fetch messages from `start` on from the source's replay socket and apply them in order."""
        st = self.stats
        st.replays += 1
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RCVTIMEO, int(REPLAY_IDLE * 1000))
        deadline = time.monotonic() + REPLAY_TOTAL
        expected = start
        ok = False
        try:
            sock.connect(src.replay)
            sock.send_multipart([b"", start.to_bytes(8, "big")])
            while time.monotonic() < deadline:
                frames = sock.recv_multipart()
                if frames and not frames[0]:
                    frames = frames[1:]
                if len(frames) == 3:  # [topic, seq, payload] (some publishers repeat the topic)
                    frames = frames[1:]
                if len(frames) != 2 or len(frames[0]) != 8:
                    break
                seq_b, payload = frames
                if seq_b == END_SEQ or not payload:
                    ok = expected > start or start == 0
                    break
                seq = int.from_bytes(seq_b, "big")
                if seq < expected:
                    continue
                if seq > expected and expected > start:
                    break  # a hole inside the replay: the buffer no longer has it
                expected = seq + 1
                src.last_seq = seq
                st.replayed += 1
                self._apply(address, model, payload)
        except zmq.ZMQError as e:
            log.info("kv events: replay from %s failed: %s", src.replay, e)
        finally:
            sock.close(linger=0)
        if not ok:
            st.replay_failures += 1
            src.replay_failed_at = self.clock()

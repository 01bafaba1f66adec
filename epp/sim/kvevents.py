"""KV events from the simulator's real cache model, in vLLM's exact wire format (protocol.md §11).

- `KVEventRecorder` hangs on an Engine (`engine.kv_events`) and its BlockPool (`on_evict`,
  `on_clear`): each block the prefix cache registers becomes part of a `BlockStored` (consecutive
  blocks of one sequence in one event, with their parent hash, token ids, block size and LoRA
  name), each evicted hash part of a `BlockRemoved`, a cache reset an `AllBlocksCleared`. At the end
  of every engine step the step's events go to the recorder's `sink` as one message's events.
- `ZmqPublisher` sends them as vLLM does: a PUB socket (bound when the endpoint has `*` or port 0,
  else connected: the centralized mode), three frames `[topic, seq, payload]`, seq from 0, payload
  msgpack `[ts, events, data_parallel_rank?]`; a ROUTER replay socket answering `start_seq` with the
  buffered `[seq, payload]` messages, then seq −1 and an empty payload.
- `attach_des(cluster, deliver, delay)` wires recorders into a discrete-event cluster: each step's
  payload reaches `deliver(address, model, payload)` `delay` virtual seconds later.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from epp.kvevents.wire import encode_payload, encode_removed, encode_stored
from epp.sim.engine import Engine, Seq

END_SEQ = (-1).to_bytes(8, "big", signed=True)
DEFAULT_BUFFER = 10_000  # messages kept for replay (vLLM's buffer_steps default)


def topic_for(address: str, model: str) -> str:
    """llm-d's topic: `kv@<ip:port>@<model>`."""
    return f"kv@{address}@{model}"


class KVEventRecorder:
    """Collects one engine's KV events per step (see the module doc)."""

    def __init__(self, engine: Engine, sink: Callable[[list[list[Any]], float], None],
                 medium: str | None = None) -> None:
        self.engine = engine
        self.sink = sink
        self.medium = medium
        self.block_size = engine.cfg.block_size
        self._events: list[list[Any]] = []
        self._last_seq: Seq | None = None  # the sequence the last BlockStored belongs to
        self._lora_ids = {name: i + 1 for i, name in enumerate(engine.adapters)}
        self.published_events = 0
        engine.kv_events = self
        engine.kv.on_evict = self.evicted
        engine.kv.on_clear = self.cleared

    def detach(self) -> None:
        if self.engine.kv_events is self:
            self.engine.kv_events = None
            self.engine.kv.on_evict = None
            self.engine.kv.on_clear = None

    def stored(self, seq: Seq, k: int) -> None:
        bs = self.block_size
        h = seq.hashes[k]
        tokens = (seq.token_ids or [])[k * bs:(k + 1) * bs]
        last = self._events[-1] if self._events else None
        if (k > 0 and last is not None and last[0] == "BlockStored" and self._last_seq is seq
                and last[1][-1] == seq.hashes[k - 1]):
            last[1].append(h)
            last[3].extend(tokens)
            return
        parent = seq.hashes[k - 1] if k > 0 else None
        lora = seq.adapter
        self._events.append(encode_stored([h], parent, tokens, bs,
                                          self._lora_ids.get(lora) if lora else None, self.medium, lora))
        self._last_seq = seq

    def evicted(self, h: int) -> None:
        last = self._events[-1] if self._events else None
        if last is not None and last[0] == "BlockRemoved":
            last[1].append(h)
        else:
            self._events.append(encode_removed([h], self.medium))
        self._last_seq = None

    def cleared(self) -> None:
        self._events.append(["AllBlocksCleared"])
        self._last_seq = None

    def flush(self, now: float) -> None:
        if self._events:
            events, self._events = self._events, []
            self._last_seq = None
            self.published_events += len(events)
            self.sink(events, now)


class ZmqPublisher:
    """vLLM's ZMQ publisher: PUB on `endpoint`, optional ROUTER replay on `replay_endpoint`.

    `publish(events)` may be called from any thread (a lock orders sequence numbers); the replay
    socket is served by a thread of its own. Ports given as 0 are chosen by the OS (see `endpoint`).
    """

    def __init__(self, endpoint: str, topic: str, *, replay_endpoint: str = "", data_parallel_rank: int | None = None,
                 buffer: int = DEFAULT_BUFFER, hwm: int = 100_000, bind: bool | None = None) -> None:
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self.topic = topic
        self.rank = data_parallel_rank
        self._lock = threading.Lock()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        if bind is None:  # vLLM's rule: bind when the endpoint has a wildcard (port 0 here too)
            bind = "*" in endpoint or endpoint.endswith(":0")
        if bind:
            self._pub.bind(endpoint.replace("tcp://*:", "tcp://127.0.0.1:") if endpoint.endswith(":0") else endpoint)
            self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self._pub.connect(endpoint)
            self.endpoint = endpoint
        self.seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=max(1, buffer))
        self.replay_endpoint = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.replays_served = 0
        self.drop_next = 0  # tests: publish this many messages to the buffer only (a gap on the wire)
        if replay_endpoint:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.bind(replay_endpoint)
            self.replay_endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._thread = threading.Thread(target=self._serve_replay, name="sim-kv-replay", daemon=True)
            self._thread.start()

    def publish(self, events: list[list[Any]], ts: float | None = None) -> int:
        """Send one message; returns its sequence number."""
        payload = encode_payload(events, time.time() if ts is None else ts, self.rank)
        with self._lock:
            seq = self.seq
            self.seq += 1
            self._buffer.append((seq, payload))
            if self.drop_next > 0:
                self.drop_next -= 1
                return seq
            self._pub.send_multipart([self.topic.encode(), seq.to_bytes(8, "big"), payload])
        return seq

    def sink(self, events: list[list[Any]], now: float) -> None:
        """A KVEventRecorder sink (the engine's simulated time is not a wall time: stamp with wall time)."""
        self.publish(events)

    def restart(self) -> None:
        """Tests: the engine restarted — sequence numbers begin at 0 again, the buffer is empty."""
        with self._lock:
            self.seq = 0
            self._buffer.clear()

    def _serve_replay(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            if len(frames) < 2:
                continue
            client, start_b = frames[0], frames[-1]
            if len(start_b) != 8:
                continue
            start = int.from_bytes(start_b, "big")
            with self._lock:
                msgs = [(s, p) for s, p in self._buffer if s >= start]
            for s, p in msgs:
                self._router.send_multipart([client, b"", s.to_bytes(8, "big"), p])
            self._router.send_multipart([client, b"", END_SEQ, b""])
            self.replays_served += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._router.close(linger=0)
        self._pub.close(linger=0)


def attach_des(cluster: Any, deliver: Callable[[str, str, bytes], None], delay: float = 0.002,
               medium: str | None = None) -> list[KVEventRecorder]:
    """Publish every server's KV events in a discrete-event cluster: each step's message is encoded
    in the wire format and handed to `deliver(endpoint address, model, payload)` `delay` virtual
    seconds after the step ends (the event delivery delay)."""
    recorders = []
    for server in cluster.servers:
        address = server.endpoint.address
        model = server.engine.cfg.model

        def sink(events: list[list[Any]], now: float, _a: str = address, _m: str = model) -> None:
            payload = encode_payload(events, now)
            cluster.call_at(now + delay, deliver, _a, _m, payload)
        recorders.append(KVEventRecorder(server.engine, sink, medium))
    return recorders

"""Real ZMQ over loopback: the simulator's publisher, the picker's subscriber, the index between."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from epp.kvevents.index import PreciseIndex
from epp.kvevents.keys import RequestKeys
from epp.kvevents.subscriber import KVEventSubscriber
from epp.kvevents.wire import encode_removed, encode_stored
from epp.sim.kvevents import ZmqPublisher, topic_for

TOKENS = list(range(2000, 2160))


def wait_for(cond: Callable[[], bool], tries: int = 400) -> bool:
    """Poll a condition (bounded: at most ~4 s), for state another thread changes."""
    for _ in range(tries):
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.fixture
def index() -> PreciseIndex:
    return PreciseIndex()


@pytest.fixture
def sub(index: PreciseIndex) -> Iterator[KVEventSubscriber]:
    s = KVEventSubscriber(index, model="m")
    yield s
    s.stop()


def stored(i: int, parent: int | None) -> list:
    return encode_stored([i], parent, TOKENS[(i - 1) * 16:i * 16], 16)


def matched(index: PreciseIndex, pod: str, tokens: list[int] = TOKENS) -> float:
    return index.match(RequestKeys(tokens, "m"), [pod])[0]


def connected(pub: ZmqPublisher, index: PreciseIndex, pod: str) -> None:
    """Slow-joiner: publish a probe until the subscriber hears it, then clear it again."""
    def probe() -> bool:
        pub.publish([encode_stored([10**6], None, [1] * 16, 16)])
        return index.size_of(pod) > 0
    assert wait_for(probe)
    pub.publish([encode_removed([10**6])])
    assert wait_for(lambda: index.size_of(pod) == 0)


def test_per_pod_mode_in_order_and_removal_on_leave(index: PreciseIndex, sub: KVEventSubscriber) -> None:
    pub = ZmqPublisher("tcp://127.0.0.1:0", topic_for("127.0.0.1:8000", "m"))
    try:
        sub.add_source("127.0.0.1:8000", pub.endpoint)
        connected(pub, index, "127.0.0.1:8000")
        parent = None
        for i in range(1, 11):
            pub.publish([stored(i, parent)])
            parent = i
        assert wait_for(lambda: matched(index, "127.0.0.1:8000") == 10.0)
        pub.publish([encode_removed([4])])
        assert wait_for(lambda: matched(index, "127.0.0.1:8000") == 3.0)
        sub.remove_source("127.0.0.1:8000")
        assert wait_for(lambda: not index.publishes("127.0.0.1:8000"))
        assert sub.stats.gaps == 0 and sub.stats.malformed == 0
    finally:
        pub.close()


def test_centralized_mode_topic_names_endpoint(index: PreciseIndex, sub: KVEventSubscriber) -> None:
    bound = sub.bind("tcp://127.0.0.1:0")
    assert bound.startswith("tcp://127.0.0.1:")
    pubs = [ZmqPublisher(bound, topic_for(f"10.1.0.{i}:8000", "m")) for i in (1, 2)]  # engines connect
    try:
        for i, pub in enumerate(pubs, 1):
            connected(pub, index, f"10.1.0.{i}:8000")
        pubs[0].publish([stored(1, None), stored(2, 1)])
        pubs[1].publish([stored(1, None)])
        assert wait_for(lambda: index.match(RequestKeys(TOKENS, "m"), ["10.1.0.1:8000", "10.1.0.2:8000"])
                        == [2.0, 1.0])
        # a topic that names no endpoint is dropped and counted
        foreign = ZmqPublisher(bound, "kv@nonsense")
        assert wait_for(lambda: (foreign.publish([stored(1, None)]), sub.stats.foreign_topics > 0)[1])
        foreign.close()
    finally:
        for p in pubs:
            p.close()


def test_gap_is_replayed_from_the_engines_buffer(index: PreciseIndex, sub: KVEventSubscriber) -> None:
    pub = ZmqPublisher("tcp://127.0.0.1:0", topic_for("127.0.0.1:9000", "m"), replay_endpoint="tcp://127.0.0.1:0")
    try:
        sub.add_source("127.0.0.1:9000", pub.endpoint, pub.replay_endpoint)
        connected(pub, index, "127.0.0.1:9000")
        pub.publish([stored(1, None)])
        assert wait_for(lambda: matched(index, "127.0.0.1:9000") == 1.0)
        # (joining mid-stream — the probe's first messages lost to the slow joiner — may already
        # have replayed from 0: count from here)
        before = dataclasses.replace(sub.stats)
        served = pub.replays_served
        pub.drop_next = 3  # blocks 2..4 never reach the wire
        for i in range(2, 6):
            pub.publish([stored(i, i - 1)])
        assert wait_for(lambda: matched(index, "127.0.0.1:9000") == 5.0)
        st = sub.stats
        # the replay brings the three lost messages and the live one that showed the gap (then a duplicate)
        assert (st.gaps - before.gaps, st.missed - before.missed, st.replays - before.replays,
                st.replayed - before.replayed, st.duplicates - before.duplicates) == (1, 3, 1, 4, 1)
        assert st.replay_failures == 0 and pub.replays_served == served + 1
    finally:
        pub.close()


def test_gap_without_replay_is_counted_and_stream_goes_on(index: PreciseIndex, sub: KVEventSubscriber) -> None:
    pub = ZmqPublisher("tcp://127.0.0.1:0", topic_for("127.0.0.1:9001", "m"))
    try:
        sub.add_source("127.0.0.1:9001", pub.endpoint)
        connected(pub, index, "127.0.0.1:9001")
        pub.drop_next = 2
        pub.publish([stored(1, None)])
        pub.publish([stored(2, 1)])
        pub.publish([encode_stored([99], None, TOKENS[:16], 16)])
        assert wait_for(lambda: matched(index, "127.0.0.1:9001") == 1.0)
        assert sub.stats.gaps == 1 and sub.stats.missed == 2
    finally:
        pub.close()


def test_engine_restart_clears_its_blocks(index: PreciseIndex, sub: KVEventSubscriber) -> None:
    pub = ZmqPublisher("tcp://127.0.0.1:0", topic_for("127.0.0.1:9002", "m"))
    try:
        sub.add_source("127.0.0.1:9002", pub.endpoint)
        connected(pub, index, "127.0.0.1:9002")
        for _ in range(2000):  # far enough ahead that seq 0 again is a restart, not a late duplicate
            pub.publish([])
        pub.publish([stored(1, None), stored(2, 1)])
        assert wait_for(lambda: matched(index, "127.0.0.1:9002") == 2.0)
        pub.restart()
        pub.publish([encode_stored([50], None, [9] * 16, 16)])
        assert wait_for(lambda: sub.stats.resets == 1)
        assert wait_for(lambda: matched(index, "127.0.0.1:9002") == 0.0)
        assert index.size_of("127.0.0.1:9002") == 1
    finally:
        pub.close()


def test_malformed_messages_are_counted_not_fatal(index: PreciseIndex, sub: KVEventSubscriber) -> None:
    pub = ZmqPublisher("tcp://127.0.0.1:0", topic_for("127.0.0.1:9003", "m"))
    raw = zmq.Context.instance().socket(zmq.PUB)
    port = raw.bind_to_random_port("tcp://127.0.0.1")
    try:
        sub.add_source("127.0.0.1:9003", pub.endpoint)
        sub.add_source("127.0.0.1:9004", f"tcp://127.0.0.1:{port}")
        connected(pub, index, "127.0.0.1:9003")
        def junk() -> bool:
            raw.send_multipart([b"kv@x@m", b"\x00" * 8, b"\xc1\xc1"])
            raw.send_multipart([b"kv@x@m", b"short"])
            return sub.stats.malformed >= 2
        assert wait_for(junk)
        pub.publish([stored(1, None)])
        assert wait_for(lambda: matched(index, "127.0.0.1:9003") == 1.0)
    finally:
        raw.close(linger=0)
        pub.close()


def test_flood_of_events_from_invented_endpoints_stays_bounded() -> None:
    """Centralized mode, one publisher flooding stores for thousands of made-up endpoints as fast as
    it can: the subscriber keeps up or drops (ZMQ's queue bound), the index never passes its bounds."""
    import random as _random

    index = PreciseIndex(max_pods=16, max_entries_per_pod=300, max_entries=2000)
    sub = KVEventSubscriber(index)
    try:
        bound = sub.bind("tcp://127.0.0.1:0")
        pub = ZmqPublisher(bound, "kv@probe:1@m")
        try:
            assert wait_for(lambda: (pub.publish([stored(1, None)]), index.size_of("probe:1") > 0)[1])
            rng = _random.Random(3)
            for i in range(6000):
                pub.topic = f"kv@10.9.{i % 40}.{i % 250}:8000@m"
                hs = [rng.getrandbits(64) for _ in range(8)]
                pub.publish([encode_stored(hs, None, [rng.randrange(1000) for _ in range(128)], 16)])
                if i % 500 == 0:
                    assert index.entries <= 2000 and len(index.addresses()) <= 16
            assert wait_for(lambda: index.stats.refused_pods > 0)
            assert index.entries <= 2000 and len(index.addresses()) <= 16
            assert all(index.size_of(a) <= 300 for a in index.addresses())
        finally:
            pub.close()
    finally:
        sub.stop()

"""The --workers share (epp.workershare) on a real file mapped twice, as two workers map it: worker
0's polls reach the other worker whole, in-flight counts of every worker are summed, slot reuse
and torn or oversized writes are never read as a page."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from epp import workershare
from epp.datastore import Datastore, Endpoint, Metrics
from epp.workershare import SharedMetricsThread, SharePublisher, WorkerShare

A, B = "10.0.0.1:8000", "10.0.0.2:8000"


@pytest.fixture
def path(tmp_path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    p = workershare.create(2, slots=8, directory=str(tmp_path))
    yield p
    os.unlink(p)


@pytest.fixture
def pair(path: str) -> Iterator[tuple[WorkerShare, WorkerShare]]:
    w0, w1 = WorkerShare(path, 0), WorkerShare(path, 1)
    yield w0, w1
    w0.close()
    w1.close()


def ep(address: str) -> Endpoint:
    ip, _, port = address.rpartition(":")
    return Endpoint(address=address, ip=ip, port=int(port), pod=address)


def page(**kw: object) -> Metrics:
    base: dict[str, object] = dict(waiting=3.0, running=5.0, kv_usage=0.25, block_size=16, num_blocks=9632,
                                   lora_max=4, lora_running=frozenset({"sql", "chat"}),
                                   lora_waiting=frozenset({"math"}), models=frozenset({"m"}), updated=123.5,
                                   custom={"queue_ms": 7.0}, steady_until=124.0)
    base.update(kw)
    return Metrics(**base)  # type: ignore[arg-type]


def test_a_file_that_is_not_a_share_or_a_worker_outside_it_is_refused(path: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = tmp_path / "not-a-share"
    other.write_bytes(b"\0" * 200_000)
    with pytest.raises(ValueError, match="not a worker share"):
        WorkerShare(str(other), 0)
    with pytest.raises(ValueError, match="outside"):
        WorkerShare(path, 2)


def test_worker_zeros_polls_reach_the_other_worker_whole(pair: tuple[WorkerShare, WorkerShare]) -> None:
    w0, w1 = pair
    mine, theirs = ep(A), ep(A)
    w0.added(A)
    mine.metrics, mine.scrape_ok = page(), True
    w0.result(mine)
    assert w1.sync_directory()
    assert w1.read(theirs)
    assert theirs.metrics == mine.metrics and theirs.scrape_ok
    assert not w1.read(theirs)  # nothing new: not decoded again
    mine.metrics = page(waiting=9.0, lora_running=frozenset(), custom={})
    w0.result(mine)
    assert w1.read(theirs) and theirs.metrics is not None
    assert theirs.metrics.waiting == 9.0 and theirs.metrics.lora_running == frozenset()


def test_a_failed_poll_keeps_the_last_page_and_marks_the_endpoint(pair: tuple[WorkerShare, WorkerShare]) -> None:
    w0, w1 = pair
    mine, theirs = ep(A), ep(A)
    w0.added(A)
    w1.sync_directory()
    assert w1.read(theirs) and theirs.metrics is None and not theirs.scrape_ok  # no page yet
    mine.metrics, mine.scrape_ok = page(), True
    w0.result(mine)
    w1.read(theirs)
    mine.scrape_ok = False  # the scraper's failure: metrics as they were
    w0.result(mine)
    assert w1.read(theirs)
    assert not theirs.scrape_ok and theirs.metrics == page()


def test_a_freed_slot_given_to_another_endpoint_is_not_read_as_the_old_one(
        pair: tuple[WorkerShare, WorkerShare]) -> None:
    w0, w1 = pair
    w0.added(A)
    w1.sync_directory()
    old = ep(A)
    w0.removed(A)
    for k in range(8):  # round robin: A's slot is the last one handed out again
        w0.added(f"10.0.1.{k}:8000")
    new = ep("10.0.1.7:8000")
    assert w0.slot("10.0.1.7:8000") == w1.slot(A)  # the reader's map is from before the reuse
    new.metrics, new.scrape_ok = page(waiting=42.0), True
    w0.result(new)
    assert not w1.read(old)  # the slot's tag moved: not A's any more
    assert w1.sync_directory()
    assert w1.slot(A) is None
    got = ep("10.0.1.7:8000")
    assert w1.read(got) and got.metrics is not None and got.metrics.waiting == 42.0


def test_a_write_in_progress_or_a_corrupt_payload_is_never_read(pair: tuple[WorkerShare, WorkerShare]) -> None:
    w0, w1 = pair
    mine, theirs = ep(A), ep(A)
    w0.added(A)
    mine.metrics = page()
    w0.result(mine)
    w1.sync_directory()
    i = w0.slot(A)
    assert i is not None
    base = w0._metrics_at + i * workershare.SLOT_BYTES
    seq = struct.unpack_from("<Q", w0._mm, base)[0]
    struct.pack_into("<Q", w0._mm, base, seq + 1)  # odd: the writer is mid-way
    assert not w1.read(theirs) and theirs.metrics is None
    struct.pack_into("<Q", w0._mm, base, seq + 2)
    w0._mm[base + 30] ^= 0xFF  # a flipped payload byte: the crc does not match
    assert not w1.read(theirs) and theirs.metrics is None


def test_a_page_too_large_to_share_reads_as_a_failed_poll(pair: tuple[WorkerShare, WorkerShare]) -> None:
    w0, w1 = pair
    mine, theirs = ep(A), ep(A)
    w0.added(A)
    mine.metrics, mine.scrape_ok = page(lora_running=frozenset(f"adapter-{k:04d}" for k in range(500))), True
    w0.result(mine)
    w1.sync_directory()
    assert w1.read(theirs)
    assert theirs.metrics is None and not theirs.scrape_ok


def test_every_workers_in_flight_counts_are_summed_before_a_decision(pair: tuple[WorkerShare, WorkerShare]) -> None:
    w0, w1 = pair
    a0, b0, a1, b1 = ep(A), ep(B), ep(A), ep(B)
    w0.added(A)
    w0.added(B)
    w1.sync_directory()
    for _ in range(3):  # worker 1 sends three to A (its director counts them too)
        a1.inflight += 1
        w1.routed(a1, 1, 100)
    w1.refresh([a1, b1])  # the first refresh after the directory appeared writes its cells
    w0.refresh([a0, b0])
    assert (a0.inflight, a0.inflight_tokens, b0.inflight) == (3, 300, 0)
    a0.inflight += 1  # worker 0 sends one to A itself
    w0.routed(a0, 1, 50)
    w1.refresh([a1, b1])
    assert (a1.inflight, a1.inflight_tokens) == (4, 350)
    w1.routed(a1, -1, -100)
    w0.refresh([a0])
    assert (a0.inflight, a0.inflight_tokens) == (3, 250)
    assert w0.activity(a0) == (3, 250)  # the scraper's signal: every worker's


def test_the_fold_into_the_same_endpoints_stands_for_a_millisecond(
        pair: tuple[WorkerShare, WorkerShare], monkeypatch: pytest.MonkeyPatch) -> None:
    """Decisions within FOLD_EVERY of each other on the pool's one candidate tuple read the others'
    cells once; this worker's own routing still moves the counts in between; another tuple, or a
    later decision, reads them again."""
    w0, w1 = pair
    a0, a1 = ep(A), ep(A)
    w0.added(A)
    w1.sync_directory()
    w1.refresh([a1])
    clock = [1000.0]
    monkeypatch.setattr(workershare.time, "monotonic", lambda: clock[0])
    pool = (a0,)
    w0.refresh(pool)
    assert a0.inflight == 0
    a1.inflight += 2
    w1.routed(a1, 2, 20)  # worker 1 sends two
    a0.inflight += 1
    w0.routed(a0, 1, 5)  # and worker 0 one, before its next decision
    clock[0] += workershare.FOLD_EVERY / 2
    w0.refresh(pool)
    assert a0.inflight == 1  # the fold stands: own count exact, worker 1's as read a moment ago
    w0.refresh([a0])  # not the pool's tuple (a subset hint's list): read now
    assert (a0.inflight, a0.inflight_tokens) == (3, 25)
    w1.routed(a1, -2, -20)
    w0.refresh(pool)  # the fold was just made into another list: this tuple is read again
    assert a0.inflight == 1
    w1.routed(a1, 1, 10)
    clock[0] += workershare.FOLD_EVERY / 2
    w0.refresh(pool)
    assert a0.inflight == 1
    clock[0] += workershare.FOLD_EVERY
    w0.refresh(pool)
    assert (a0.inflight, a0.inflight_tokens) == (2, 15)


def test_counts_sent_before_an_endpoint_had_a_slot_are_shared_once_it_has_one(
        pair: tuple[WorkerShare, WorkerShare]) -> None:
    w0, w1 = pair
    a0, a1 = ep(A), ep(A)
    a1.inflight = 2
    w1.routed(a1, 1, 10)
    w1.routed(a1, 1, 10)
    w0.added(A)  # worker 0 starts polling A only now
    w0.refresh([a0])
    assert a0.inflight == 0
    w1.sync_directory()
    w1.refresh([a1])  # worker 1 puts its counts where A is now
    w0.refresh([a0])
    assert (a0.inflight, a0.inflight_tokens) == (2, 20)
    w0.removed(A)  # A leaves and its slot is reused: worker 1 clears its cell there
    w0.added(B)
    w1.sync_directory()
    w1.refresh([])
    for k in range(8):
        w0.added(f"10.0.1.{k}:8000")
    reused = [a for a in (f"10.0.1.{k}:8000" for k in range(8)) if w0.slot(a) is not None]
    probe = [ep(a) for a in reused]
    w0.refresh(probe)
    assert all(p.inflight == 0 for p in probe)


def test_the_reader_thread_copies_worker_zeros_pages_into_its_datastore(
        pair: tuple[WorkerShare, WorkerShare]) -> None:
    w0, w1 = pair
    ds = Datastore("pool")
    ds.set_static_endpoints([A, B])
    pub = SharePublisher(w0)
    polled = ep(A)
    pub.added(polled)
    polled.metrics, polled.scrape_ok = page(), True
    pub.result(polled)
    t = SharedMetricsThread(ds, w1, period=0.01)
    t.start()  # the first pass runs at once
    try:
        assert ds.endpoints[A].metrics == page() and ds.endpoints[A].scrape_ok
        assert ds.endpoints[B].metrics is None  # worker 0 does not poll B: nothing to copy
        assert t.reads == 1
    finally:
        import asyncio

        asyncio.run(t.stop())


def test_three_workers_counts_add_up_and_a_slot_beyond_the_directory_is_skipped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = workershare.create(3, slots=8, directory=str(tmp_path))
    ws = [WorkerShare(p, k) for k in range(3)]
    try:
        ws[0].added(A)
        ws[0].added(B)
        for w in ws[1:]:
            w.sync_directory()
        views = [(ep(A), ep(B)) for _ in ws]
        for k, w in enumerate(ws):  # worker k sends k + 1 requests to B, of 10 tokens each
            a, b = views[k]
            w.refresh([a, b])
            for _ in range(k + 1):
                b.inflight += 1
                w.routed(b, 1, 10)
        for k, w in enumerate(ws):
            a, b = views[k]
            w.refresh([a, b])
            assert (a.inflight, b.inflight, b.inflight_tokens) == (0, 6, 60)
        stranger = ep("10.0.9.9:8000")  # not in the directory: left as this worker counted it
        stranger.inflight = 5
        ws[1].refresh([stranger])
        assert stranger.inflight == 5
    finally:
        for w in ws:
            w.close()
        os.unlink(p)


def test_a_fold_of_the_same_tuple_sees_an_endpoint_that_got_its_slot_later(
        pair: tuple[WorkerShare, WorkerShare], monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows a fold walks are kept per candidate tuple and directory generation: when the
    directory changes, the same tuple is walked anew, so an endpoint that got a slot since is read."""
    w0, w1 = pair
    clock = [1000.0]
    monkeypatch.setattr(workershare.time, "monotonic", lambda: clock[0])
    a0, b0, a1, b1 = ep(A), ep(B), ep(A), ep(B)
    pool0, pool1 = (a0, b0), (a1, b1)
    w0.added(A)
    w1.sync_directory()
    w0.refresh(pool0)
    w1.refresh(pool1)
    w0.added(B)  # B gets its slot only now
    w1.sync_directory()
    w1.refresh(pool1)
    b1.inflight += 2
    w1.routed(b1, 2, 40)
    clock[0] += 2 * workershare.FOLD_EVERY
    w0.refresh(pool0)  # the same tuple as before B had a slot
    assert (b0.inflight, b0.inflight_tokens) == (2, 40)
    w1.routed(b1, -2, -40)
    clock[0] += 2 * workershare.FOLD_EVERY
    w0.refresh(pool0)
    assert (b0.inflight, b0.inflight_tokens) == (0, 0)


def test_prefill_clocks_reach_the_other_workers_and_follow_a_finish(
        pair: tuple[WorkerShare, WorkerShare], monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefill-backlog scorer's clock for a pod (Endpoint.prefill_until) goes into the worker's
    cell with each count change and on a finish that moved it (`clock`); the other worker's fold
    makes it that endpoint's others_prefill_until, and a cleared clock clears it there."""
    monkeypatch.setattr(workershare, "FOLD_EVERY", 0.0)  # every refresh folds
    w0, w1 = pair
    a0, a1 = ep(A), ep(A)
    w0.added(A)
    w1.sync_directory()
    w0.refresh([a0])
    w1.refresh([a1])
    assert a1.others_prefill_until == 0.0
    a0.prefill_until = 1000.5  # the scorer set it in on_routed, before the count
    a0.inflight += 1
    w0.routed(a0, 1, 100)
    w1.refresh([a1])
    assert a1.others_prefill_until == 1000.5
    a0.prefill_until = 0.0  # the scorer's on_finished cleared it, after the count went
    w0.clock(a0)
    w1.refresh([a1])
    assert a1.others_prefill_until == 0.0
    w0.refresh([a0])
    assert a0.others_prefill_until == 0.0  # worker 1 sent nothing


def test_three_workers_clocks_add_their_remaining_seconds(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    p = workershare.create(3, slots=8, directory=str(tmp_path))
    ws = [WorkerShare(p, k) for k in range(3)]
    now = 5000.0
    monkeypatch.setattr(workershare.time, "monotonic", lambda: now)
    try:
        ws[0].added(A)
        for w in ws[1:]:
            w.sync_directory()
        views = [ep(A) for _ in ws]
        for w, a in zip(ws, views, strict=True):
            w.refresh([a])
        for k, until in ((1, now + 0.3), (2, now + 0.2)):  # workers 1 and 2 each have prefills pending
            views[k].prefill_until = until
            ws[k].clock(views[k])
        views[0].prefill_until = now - 1.0  # worker 0's has run out: adds nothing
        ws[0].clock(views[0])
        now += 0.01  # past the fold window
        ws[0].refresh([views[0]])
        assert views[0].others_prefill_until == pytest.approx(now + 0.29 + 0.19)
    finally:
        for w in ws:
            w.close()
        os.unlink(p)


def test_a_directory_change_moves_this_workers_clock_with_its_slot(
        pair: tuple[WorkerShare, WorkerShare], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workershare, "FOLD_EVERY", 0.0)
    w0, w1 = pair
    a0, b0, b1 = ep(A), ep(B), ep(B)
    w0.added(A)
    w1.sync_directory()
    w1.refresh([b1])
    b1.prefill_until = 77.0
    b1.inflight += 1
    w1.routed(b1, 1, 10)  # B has no slot yet: kept for when it has one
    w0.added(B)
    w1.sync_directory()
    w1.refresh([b1])  # rewrites its own cells where the endpoints are now
    w0.refresh([a0, b0])
    assert (b0.others_prefill_until, a0.others_prefill_until) == (77.0, 0.0)

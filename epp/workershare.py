"""What the `--workers` processes of one picker share through one shared-memory file: the pool's
scraped metrics (worker 0 scrapes, the others read its results) and each worker's in-flight counts
(every worker's scorers see the requests all workers sent to a pod), and each worker's prefill clock
per pod (the prefill-backlog scorer counts the prefills all workers sent).

The supervisor creates the file (`create`), every worker maps it (`WorkerShare`). Layout,
little-endian, fixed at creation; the file is sparse (on tmpfs only the pages touched take memory):

    header     64 B: magic, version, workers, slots, slot bytes, generation (u64, bumped after every
               directory change), high (slots ever used), the siblings' message key (24 B at 40)
    ports      workers × u32: each worker's loopback metrics port (0: none yet), for worker 0's page;
               the top bit says the worker has mapped the file
    directory  slots × 80 B: tag (u32, bumped on every (re)assignment), used (u16), address length,
               address (72 B)
    metrics    slots × SLOT_BYTES: seq (u64, odd while being written), tag, ok, length, crc32, then the
               page's signals as msgpack
    counts     slots × workers × i64 requests in flight, then the same for their prompt tokens
    clocks     slots × workers × f64: when the prefills each worker sent are done (time.monotonic(),
               system-wide; the prefill-backlog scorer's `Endpoint.prefill_until`), 0 for none

One writer for the directory and the metrics (worker 0's scraper thread); each worker writes only its
own count cells, from its serving loop. Readers copy between two reads of the seq (or generation) and
retry when it moved, so no lock is shared between processes.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Container, Sequence
from itertools import compress
from typing import Any, Protocol

import msgspec

from epp.datastore import Datastore, Endpoint, Metrics
from epp.metrics.scrape import copied

log = logging.getLogger("epp.workershare")

MAGIC = b"EPPW"
VERSION = 3  # 2: the prefill clocks; 3: a page's steady_until
DEFAULT_SLOTS = 4096  # endpoints one picker's workers can share; more are scraped by worker 0 only
SLOT_BYTES = 4096
# The other workers' in-flight counts are folded into the same endpoints at most this often: at
# thousands of decisions a second most would re-read cells that have not moved (the fold is ~5 µs
# for 16 endpoints); a millisecond is nothing beside a scraped page's age.
FOLD_EVERY = 0.001
_HEADER = struct.Struct("<4sIIII")  # magic, version, workers, slots, slot bytes
_GEN = struct.Struct("<Q")
_HIGH = struct.Struct("<I")
_GEN_AT, _HIGH_AT, _KEY_AT, _HEADER_BYTES = 24, 32, 40, 64
_KEY_BYTES = 24  # the siblings' message key (epp.peers notes between workers), random per share
_DIR = struct.Struct("<IHH72s")  # tag, used, address length, address
_SLOT = struct.Struct("<QIHxxII")  # seq, tag, ok, payload length, crc32
_SEQ = struct.Struct("<Q")
_MAX_PAYLOAD = SLOT_BYTES - _SLOT.size
_NO_PAGE = 0xFFFFFFFF  # payload length: no page yet (or one too large to share)
_ATTACHED = 1 << 31  # in a worker's port word: it has mapped the file (the supervisor may unlink it)
_READ_TRIES = 8

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


# (the endpoints, the directory generation, the rows to read, (endpoint, slot, address) per endpoint)
_FoldPlan = tuple[Sequence[Endpoint], int, int, list[tuple[Endpoint, int, str]]]


def _layout(workers: int, slots: int) -> tuple[int, int, int, int, int]:
    """Offsets of the directory, the metrics slots, the request counts, the token counts and the
    prefill clocks."""
    directory = _HEADER_BYTES + -(-workers * 4 // 64) * 64
    metrics = -(-(directory + slots * _DIR.size) // mmap.PAGESIZE) * mmap.PAGESIZE
    counts = metrics + slots * SLOT_BYTES
    tokens = counts + slots * workers * 8
    clocks = tokens + slots * workers * 8
    return directory, metrics, counts, tokens, clocks


def _size(workers: int, slots: int) -> int:
    return _layout(workers, slots)[4] + slots * workers * 8


def create(workers: int, slots: int = DEFAULT_SLOTS, directory: str | None = None) -> str:
    """A new, zeroed share for `workers` processes (in /dev/shm when there is one); returns its path.
    The caller removes the file when the workers are gone."""
    if workers < 1 or slots < 1:
        raise ValueError("workers and slots must be positive")
    where = directory or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    fd, path = tempfile.mkstemp(prefix="epp-workers-", dir=where)
    try:
        os.ftruncate(fd, _size(workers, slots))  # sparse: zero pages cost nothing until written
        os.pwrite(fd, _HEADER.pack(MAGIC, VERSION, workers, slots, SLOT_BYTES), 0)
        os.pwrite(fd, os.urandom(_KEY_BYTES), _KEY_AT)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


def all_attached(path: str, workers: int) -> bool:
    """Every worker has mapped the share: its path can go (the mappings keep the memory), so not even
    a SIGKILL of the supervisor leaves the file behind."""
    try:
        with open(path, "rb") as f:
            raw = os.pread(f.fileno(), 4 * workers, _HEADER_BYTES)
    except OSError:
        return False
    return len(raw) == 4 * workers and all(w & _ATTACHED for w in struct.unpack(f"<{workers}I", raw))


def _pack_metrics(m: Metrics) -> bytes:
    return _encode([m.waiting, m.running, m.kv_usage, m.block_size, m.num_blocks, m.lora_max,
                    sorted(m.lora_running), sorted(m.lora_waiting), sorted(m.models), m.updated,
                    dict(m.custom) if m.custom else {}, m.steady_until])


def _unpack_metrics(data: bytes) -> Metrics:
    (waiting, running, kv, block_size, num_blocks, lora_max, lora_running, lora_waiting, models, updated,
     custom, steady_until) = _decode(data)
    return Metrics(waiting=float(waiting), running=float(running), kv_usage=float(kv), block_size=int(block_size),
                   num_blocks=int(num_blocks), lora_max=int(lora_max), lora_running=frozenset(lora_running),
                   lora_waiting=frozenset(lora_waiting), models=frozenset(models), updated=float(updated),
                   custom={str(k): float(v) for k, v in custom.items()}, steady_until=float(steady_until))


class WorkerShare:
    """One worker's view of the share. Worker 0 writes the directory and the metrics (from its
    scraper thread: `added`, `removed`, `result`); every worker keeps its own count cells current
    (`routed`, from the serving loop) and folds the others' into its endpoints' in-flight figures
    before each decision (`refresh`)."""

    def __init__(self, path: str, worker: int) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        magic, version, workers, slots, slot_bytes = _HEADER.unpack_from(self._mm, 0)
        if magic != MAGIC or version != VERSION or slot_bytes != SLOT_BYTES or size < _size(workers, slots):
            self._mm.close()
            raise ValueError(f"{path}: not a worker share of this version")
        if not 0 <= worker < workers:
            self._mm.close()
            raise ValueError(f"worker {worker} outside the share's {workers} workers")
        self.path, self.worker, self.workers, self.slots = path, worker, workers, slots
        self._other_cols = tuple(j for j in range(workers) if j != worker)  # the other workers' columns
        self._dir_at, self._metrics_at, counts_at, tokens_at, clocks_at = _layout(workers, slots)
        self._views = [memoryview(self._mm)]
        self._views += [self._views[0][counts_at:counts_at + slots * workers * 8],
                        self._views[0][tokens_at:tokens_at + slots * workers * 8],
                        self._views[0][clocks_at:clocks_at + slots * workers * 8]]
        self._counts = self._views[1].cast("q")
        self._tokens = self._views[2].cast("q")
        self._clocks = self._views[3].cast("d")
        self._slot_of: dict[str, int] = {}  # address -> slot, rebound whole (read from other threads)
        self._tag_of: dict[int, int] = {}  # slot -> its directory tag when _slot_of was read
        self._map_gen = -1  # the directory generation _slot_of was read at
        # 1 + the highest slot in _slot_of (refresh reads the cells below it); always bound before
        # _slot_of, so a reader that sees a new map sees its bound (a slot past it is skipped once)
        self._high = 0
        self._written_gen = -2  # the generation this worker last rewrote its own cells at
        # the endpoint tuple the others' counts were last folded into, and until when that fold stands
        self._folded: Sequence[Endpoint] | None = None
        self._fold_due = 0.0
        self._plan: _FoldPlan | None = None
        self._own: dict[str, list[int]] = {}  # address -> [requests, tokens] this worker has in flight
        self._own_clock: dict[str, float] = {}  # address -> this worker's prefill clock, when not 0
        self._seen: dict[str, int] = {}  # address -> the metrics seq last read (readers)
        # the writer's (worker 0's) bookkeeping
        self._tags: dict[int, int] = {}
        self._assigned: dict[str, int] = {}
        self._free_from = 0
        self._full_logged = False
        at = _HEADER_BYTES + 4 * worker
        _HIGH.pack_into(self._mm, at, int(_HIGH.unpack_from(self._mm, at)[0]) | _ATTACHED)

    def close(self) -> None:
        """Unmap (the views first: a mapping with exported views cannot close)."""
        self._counts.release()
        self._tokens.release()
        self._clocks.release()
        for v in reversed(self._views):
            v.release()
        with contextlib.suppress(BufferError):
            self._mm.close()

    # ---- the workers' prefix notes (epp.peers over ipc://) -------------------------------
    def sibling_key(self) -> bytes:
        """The key that signs the workers' messages to each other (random, made with the share)."""
        return bytes(self._mm[_KEY_AT:_KEY_AT + _KEY_BYTES])

    def sibling_url(self, worker: int) -> str:
        """Where worker `worker` publishes what its plugins learn (next to the share's file name)."""
        return f"ipc://{self.path}.peer{worker}"

    # ---- each worker's metrics port ------------------------------------------------------
    def set_metrics_port(self, port: int) -> None:
        """This worker's loopback /metrics port (workers 1..: worker 0 merges their pages into its own)."""
        _HIGH.pack_into(self._mm, _HEADER_BYTES + 4 * self.worker, (port & 0xFFFF) | _ATTACHED)

    def peer_metrics_ports(self) -> list[int]:
        """The other workers' metrics ports that are known."""
        ports = (int(_HIGH.unpack_from(self._mm, _HEADER_BYTES + 4 * i)[0]) & 0xFFFF for i in range(self.workers)
                 if i != self.worker)
        return [p for p in ports if p]

    # ---- the directory ------------------------------------------------------------------
    def _generation(self) -> int:
        return int(_GEN.unpack_from(self._mm, _GEN_AT)[0])

    def sync_directory(self) -> bool:
        """Re-read the directory if it changed since the last call; True when it did."""
        for _ in range(_READ_TRIES):
            gen = self._generation()
            if gen == self._map_gen:
                return False
            high = min(int(_HIGH.unpack_from(self._mm, _HIGH_AT)[0]), self.slots)
            found: dict[str, int] = {}
            tags: dict[int, int] = {}
            for i in range(high):
                tag, used, n, raw = _DIR.unpack_from(self._mm, self._dir_at + i * _DIR.size)
                if used and 0 < n <= len(raw):
                    found[raw[:n].decode("ascii", "replace")] = i
                    tags[i] = tag
            if self._generation() == gen:
                self._tag_of = tags
                self._high = max(found.values(), default=-1) + 1
                self._slot_of = found
                self._map_gen = gen
                return True
        return False  # the writer kept changing it: the next call tries again

    def slot(self, address: str) -> int | None:
        """The slot an endpoint's state is shared in, None when it has none (yet)."""
        return self._slot_of.get(address)

    # ---- worker 0: the writer -----------------------------------------------------------
    def _write_dir(self, i: int, address: str, used: bool) -> None:
        tag = self._tags.get(i, 0) + 1
        self._tags[i] = tag
        raw = address.encode("ascii", "replace")[:72]
        _DIR.pack_into(self._mm, self._dir_at + i * _DIR.size, tag, 1 if used else 0, len(raw), raw)
        if used:
            high = int(_HIGH.unpack_from(self._mm, _HIGH_AT)[0])
            if i >= high:
                _HIGH.pack_into(self._mm, _HIGH_AT, i + 1)
        _GEN.pack_into(self._mm, _GEN_AT, self._generation() + 1)  # after the entry: readers retry on it
        self._high = max(self._assigned.values(), default=-1) + 1
        self._slot_of = dict(self._assigned)
        self._map_gen = self._generation()

    def added(self, address: str) -> None:
        """Worker 0: an endpoint it scrapes; it gets a slot (the one it has, if any)."""
        if address in self._assigned:
            return
        taken = set(self._assigned.values())
        for k in range(self.slots):  # round robin from the last one given: a freed slot rests longest
            i = (self._free_from + k) % self.slots
            if i not in taken:
                break
        else:
            if not self._full_logged:
                self._full_logged = True
                log.warning("worker share full: more endpoints than slots; the others are not shared",
                            extra={"slots": self.slots, "endpoint": address})
            return
        self._free_from = (i + 1) % self.slots
        self._assigned[address] = i
        base = self._metrics_at + i * SLOT_BYTES
        seq = int(_SEQ.unpack_from(self._mm, base)[0])
        _SLOT.pack_into(self._mm, base, (seq | 1) + 1, self._tags.get(i, 0) + 1, 0, _NO_PAGE, 0)
        self._write_dir(i, address, True)

    def removed(self, address: str) -> None:
        """Worker 0: an endpoint left the pool; its slot is freed."""
        i = self._assigned.pop(address, None)
        if i is not None:
            self._write_dir(i, address, False)

    def result(self, ep: Endpoint) -> None:
        """Worker 0: the outcome of a poll of `ep` (its metrics and scrape_ok as they are now)."""
        i = self._assigned.get(ep.address)
        if i is None:
            return
        m = ep.metrics
        payload = _pack_metrics(m) if m is not None else b""
        length = len(payload) if m is not None else _NO_PAGE
        if len(payload) > _MAX_PAYLOAD:  # e.g. hundreds of adapter names: the readers see a failed poll
            payload, length = b"", _NO_PAGE
        base = self._metrics_at + i * SLOT_BYTES
        seq = int(_SEQ.unpack_from(self._mm, base)[0])
        if not seq & 1:
            seq += 1
        _SEQ.pack_into(self._mm, base, seq)  # odd: being written
        end = base + _SLOT.size
        self._mm[end:end + len(payload)] = payload
        ok = 1 if ep.scrape_ok and length != _NO_PAGE else 0
        _SLOT.pack_into(self._mm, base, seq, self._tags.get(i, 0), ok, length, zlib.crc32(payload))
        _SEQ.pack_into(self._mm, base, seq + 1)  # even again: whole

    def activity(self, ep: Endpoint) -> tuple[int, int]:
        """Every worker's in-flight requests and tokens on `ep` (the scraper's traffic signal)."""
        i = self._slot_of.get(ep.address)
        if i is None:
            return (ep.inflight, ep.inflight_tokens)
        base = i * self.workers
        return (sum(self._counts[base:base + self.workers]), sum(self._tokens[base:base + self.workers]))

    # ---- workers 1..: readers of the metrics --------------------------------------------
    def read(self, ep: Endpoint) -> bool:
        """Copy worker 0's latest poll of `ep` into it; True when something new was read."""
        i = self._slot_of.get(ep.address)
        if i is None:
            return False
        base = self._metrics_at + i * SLOT_BYTES
        for _ in range(_READ_TRIES):
            seq, tag, ok, length, crc = _SLOT.unpack_from(self._mm, base)
            if seq & 1:
                continue
            if tag != self._tag_of.get(i):
                return False  # the slot was given to another endpoint since the directory was read
            if seq == self._seen.get(ep.address) and ep.metrics is not None:
                return False
            payload = b"" if length == _NO_PAGE else self._mm[base + _SLOT.size:base + _SLOT.size + length]
            if int(_SEQ.unpack_from(self._mm, base)[0]) != seq:
                continue  # written meanwhile: read again
            if length != _NO_PAGE and (length > _MAX_PAYLOAD or zlib.crc32(payload) != crc):
                continue
            self._seen[ep.address] = seq
            if length != _NO_PAGE:
                try:
                    ep.metrics = _unpack_metrics(payload)
                except (msgspec.DecodeError, ValueError, TypeError):
                    return False
            ep.scrape_ok = bool(ok)
            return True
        return False

    # ---- every worker: in-flight counts -------------------------------------------------
    def routed(self, ep: Endpoint, requests: int, tokens: int, request: object = None) -> None:
        """This worker sent (+1) or finished (−1) a request on `ep`: its own cell follows at once."""
        # epp.datastore.tally, inlined: this runs twice a request on every worker
        address = ep.address
        own = self._own
        pair = own.get(address)
        n = requests if pair is None else pair[0] + requests
        if n > 0:
            t = tokens if pair is None else pair[1] + tokens
            if t < 0:
                t = 0
            if pair is None:
                own[address] = [n, t]
            else:
                pair[0], pair[1] = n, t
        else:
            n = t = 0
            if pair is not None:
                del own[address]
        clock = ep.prefill_until  # the scorer set it just before (routed) or just after (finished)
        if clock:
            self._own_clock[address] = clock
        elif address in self._own_clock:
            del self._own_clock[address]
        i = self._slot_of.get(address)
        if i is not None and self._written_gen == self._map_gen:
            cell = i * self.workers + self.worker
            self._counts[cell] = n
            self._tokens[cell] = t
            self._clocks[cell] = clock

    def clock(self, ep: Endpoint) -> None:
        """This worker's prefill clock for `ep` moved outside a count change (a finish): its cell follows."""
        address, clock = ep.address, ep.prefill_until
        if clock:
            self._own_clock[address] = clock
        else:
            self._own_clock.pop(address, None)
        i = self._slot_of.get(address)
        if i is not None and self._written_gen == self._map_gen:
            self._clocks[i * self.workers + self.worker] = clock

    def _rewrite_own(self) -> None:
        """The directory changed: put this worker's counts where the endpoints are now, zero the rest."""
        gen = self._map_gen
        n, w = self.workers, self.worker
        want = {i: self._own[a] for a, i in self._slot_of.items() if a in self._own}
        clocks = {i: self._own_clock[a] for a, i in self._slot_of.items() if a in self._own_clock}
        # this worker's column, read whole (a directory change is rare): every non-zero cell not wanted goes
        column = self._counts[w::n].tolist(), self._tokens[w::n].tolist(), self._clocks[w::n].tolist()
        keeps: tuple[Container[int], ...] = (want, want, clocks)
        views: tuple[memoryview[Any], ...] = (self._counts, self._tokens, self._clocks)
        for cells, values, keep in zip(views, column, keeps, strict=True):
            for i in compress(range(len(values)), values):  # the non-zero ones, found in C
                if i not in keep:
                    cells[i * n + w] = 0
        for i, (count, tok) in want.items():
            cell = i * n + w
            self._counts[cell] = count
            self._tokens[cell] = tok
        for i, clock in clocks.items():
            self._clocks[i * n + w] = clock
        self._written_gen = gen

    def _others(self, cells: memoryview, high: int) -> list[int]:
        """Per slot below `high`, the other workers' cells summed (one strided copy per worker)."""
        n, cols = self.workers, self._other_cols
        if len(cols) == 1:
            j = cols[0]
            return cells[j:high * n:n].tolist()
        if not cols:
            return [0] * high
        return [sum(c) for c in zip(*(cells[j:high * n:n].tolist() for j in cols), strict=True)]

    def refresh(self, endpoints: Sequence[Endpoint]) -> None:
        """Before a decision: each endpoint's in-flight figures become all workers' (this one's own
        counts, exact, plus the others' cells as they are now, or as read within FOLD_EVERY for the
        same endpoint tuple)."""
        if self._written_gen != self._map_gen:
            self._rewrite_own()
        elif endpoints is self._folded and time.monotonic() < self._fold_due:
            # folded less than FOLD_EVERY ago into these very endpoints: their counts are this
            # worker's own, exact (routing and finishing move them), plus the others' as read then
            return
        plan = self._plan
        if plan is None or plan[0] is not endpoints or plan[1] != self._map_gen:
            plan = self._plan = self._plan_for(endpoints)
        high = plan[2]
        others, other_tokens = self._others(self._counts, high), self._others(self._tokens, high)
        self._fold_clocks(plan[3], high)
        own = self._own.get
        for ep, i, address in plan[3]:
            o = others[i]
            mine = own(address)
            if mine is None:
                if o <= 0:
                    ep.inflight = ep.inflight_tokens = 0
                else:
                    ep.inflight = o
                    t = other_tokens[i]
                    ep.inflight_tokens = t if t > 0 else 0
            else:
                t = other_tokens[i]
                ep.inflight = mine[0] + o if o > 0 else mine[0]
                ep.inflight_tokens = mine[1] + t if t > 0 else mine[1]
        self._folded = endpoints
        self._fold_due = time.monotonic() + FOLD_EVERY

    def _fold_clocks(self, rows: list[tuple[Endpoint, int, str]], high: int) -> None:
        """Each endpoint's `others_prefill_until`: the other workers' prefill clocks, as one clock (their
        remaining seconds added up, since the engine prefills one after another)."""
        n, cols, cells = self.workers, self._other_cols, self._clocks
        if len(cols) == 1:
            j = cols[0]
            theirs = cells[j:high * n:n].tolist()
            if not any(theirs):  # the usual case without the scorer: nothing to fold
                for ep, _i, _a in rows:
                    ep.others_prefill_until = 0.0
                return
            for ep, i, _a in rows:
                ep.others_prefill_until = theirs[i]
            return
        now = time.monotonic()
        columns = [cells[j:high * n:n].tolist() for j in cols]
        for ep, i, _a in rows:
            left = 0.0
            for col in columns:
                if col[i] > now:
                    left += col[i] - now
            ep.others_prefill_until = now + left if left else 0.0

    def _plan_for(self, endpoints: Sequence[Endpoint]) -> _FoldPlan:
        """(the endpoints, the directory generation, the rows to read, (endpoint, slot, address) for
        each endpoint with a slot): what a fold of `endpoints` walks, kept while both stay the same."""
        # the generation first: a directory read by the other thread meanwhile leaves this plan on the
        # older generation, so the next fold makes it again
        gen = self._map_gen
        high, slot_of = self._high, self._slot_of
        rows = [(ep, i, ep.address) for ep in endpoints
                if (i := slot_of.get(ep.address)) is not None and i < high]
        return (endpoints, gen, high, rows)


class SharedMetricsThread:
    """Workers 1..N−1: in place of a scraper, a daemon thread that copies worker 0's polls from the
    share into this worker's endpoints every `period` seconds (the pages are as fresh as worker 0's
    plus at most one period; the model servers are polled once per picker, not once per worker)."""

    def __init__(self, datastore: Datastore, share: WorkerShare, period: float) -> None:
        self.datastore = datastore
        self.share = share
        self.period = max(period, 0.001)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reads = 0  # pages copied (tests)

    def start(self) -> None:
        """Start copying (the first pass runs before this returns)."""
        if self._thread is not None:
            return
        self.poll()
        self._thread = threading.Thread(target=self._run, name="shared-metrics", daemon=True)
        self._thread.start()

    def poll(self) -> None:
        """One pass: the directory if it changed, then every endpoint's latest page."""
        self.share.sync_directory()
        for ep in copied(lambda: list(self.datastore.endpoints.values())):  # the loop may change it meanwhile
            if self.share.read(ep):
                self.reads += 1

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.poll()
            except Exception:  # never let one odd slot end the copying for good
                log.exception("reading the worker share failed")

    async def stop(self) -> None:
        """End the thread."""
        import asyncio

        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
            self._thread = None


class SharePublisher:
    """Worker 0's scraper hooks (epp.metrics.scrape.Publisher): every endpoint it polls gets a slot,
    every poll's outcome is written to it, and the scraper's traffic signal counts every worker."""

    def __init__(self, share: WorkerShare) -> None:
        self.share = share

    def added(self, ep: Endpoint) -> None:
        self.share.added(ep.address)

    def removed(self, ep: Endpoint) -> None:
        self.share.removed(ep.address)

    def result(self, ep: Endpoint) -> None:
        self.share.result(ep)

    def activity(self, ep: Endpoint) -> tuple[int, int]:
        return self.share.activity(ep)



class _Notes(Protocol):
    def routed(self, ep: Endpoint, requests: int, tokens: int, request: object = None) -> None: ...


class SiblingShare:
    """What a worker's director shares (`epp.director.LoadShare`): in-flight counts through the share,
    and what its plugins learn from each routed request through `notes` (an `epp.peers.PeerSync` in
    notes-only mode between the workers), so N workers keep one prefix placement as one picker does."""

    def __init__(self, share: WorkerShare, notes: _Notes) -> None:
        self.share = share
        self.notes = notes
        self._count, self._note = share.routed, notes.routed  # bound once: twice a request

    def refresh(self, endpoints: Sequence[Endpoint]) -> None:
        """The other workers' counts and prefill clocks folded into `endpoints` (the notes carry none)."""
        self.share.refresh(endpoints)

    def clock(self, ep: Endpoint) -> None:
        """This worker's prefill clock for `ep` moved on a finish: into the share."""
        self.share.clock(ep)

    def routed(self, ep: Endpoint, requests: int, tokens: int, request: object = None) -> None:
        """Count it in the share; tell the siblings what the plugins learned from a routed request."""
        self._count(ep, requests, tokens, request)
        if request is not None:
            self._note(ep, requests, tokens, request)

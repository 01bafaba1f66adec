"""The poller: one asyncio task per endpoint reads its model server's /metrics page.

Tasks start and stop with the endpoint set (Datastore.subscribe). Each polls every `interval`
seconds (`--refresh-metrics-interval`, 50 ms), with a random start offset and a little per-cycle
jitter so that pods are not polled in lock-step; a semaphore bounds the polls in flight, and each
endpoint keeps one HTTP/1.1 connection alive between polls (epp.metrics.http: raw asyncio streams,
a fraction of aiohttp's CPU per poll; bench/metrics_poller.py).

Each poll first asks for only the needed families (`?name[]=...`, honoured by prometheus_client
based servers such as vLLM: the server renders a few lines instead of a 40 KB page). A response that
still carries other families, or lacks the needed ones, makes that endpoint fall back to the plain
URL from then on (the choice is re-probed when the endpoint's engine changes).

A good poll replaces `endpoint.metrics` (stamped with time.monotonic()) and sets `scrape_ok`; a
failed one (HTTP error, timeout, refused, not a metrics page, cut short) clears `scrape_ok` and
keeps the old snapshot, whose growing age makes scheduling treat it as stale (epp.metrics.is_stale).
A change between working and failing is logged once each way, never per poll.

A model server cannot make the picker pay for its page: the body is read incrementally and the
poll aborted (connection dropped) past `max_page_bytes` (4 MiB; a vLLM page is ~40 KB), and a page
carrying more than `MAX_SERIES` lines of one wanted name fails (parse cost per poll is bounded by
both). A failing endpoint is polled less and less often: the delay doubles from the interval up
to `max_backoff` seconds and returns to the interval with the first good poll.

Where a page lives comes from the endpoint's engine (EngineSpec.scheme/path/port: trtllm-serve
on /prometheus/metrics, Triton on port 8002) unless the Scraper is given scheme/path/port itself.

`ScrapeThread` runs a Scraper on an event loop of its own in a thread, so polls, page parsing and
their timers never run on the serving loop (what the picker process uses).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl as ssl_lib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar
from urllib.parse import quote

from xxhash import xxh64_intdigest

from epp.datastore import Datastore, Endpoint, Metrics
from epp.metrics.engines import ENGINES, EngineSpec, MissingMetrics, read_metrics, resolve_engine
from epp.metrics.http import HTTPGetError, PageConnection, PageTooLargeError
from epp.metrics.parse import TooManySeries

log = logging.getLogger("epp.metrics.scrape")

DEFAULT_INTERVAL = 0.05
DEFAULT_TIMEOUT = 1.0
DEFAULT_CONCURRENCY = 128
DEFAULT_MAX_PAGE_BYTES = 4 << 20
DEFAULT_MAX_BACKOFF = 2.0
CALM_AFTER = 3  # polls in a row with the same signals before an idle endpoint is polled slower

# The classic text format (not OpenMetrics), uncompressed: on a LAN gzip costs both sides CPU for nothing.
_HEADERS = {"Accept": "text/plain;version=0.0.4;q=1,*/*;q=0.1", "Accept-Encoding": "identity"}


class ScrapeError(Exception):
    """A poll that produced no usable snapshot; the message says why."""


class PageTooLarge(ScrapeError):
    """The page passed the size cap; the rest was not read."""


@dataclass(eq=False)
class _Target:
    """The poll state of one endpoint."""

    endpoint: Endpoint
    engine_label: str | None = None  # endpoint.engine the spec was resolved from
    spec: EngineSpec | None = None
    conn: PageConnection | None = None  # kept alive between polls
    plain_url: str | None = None  # path (and query) on the connection's server
    filtered_url: str | None = None
    use_filter: bool | None = None  # None: not yet known; True: honoured; False: plain URL only
    ssl: ssl_lib.SSLContext | bool = True
    failing: bool = False
    backoff: float = 0.0  # the current delay after a failed poll (0 while polls succeed)
    polls: int = 0  # polls attempted (tests and benchmarks watch the backoff through it)
    calm: int = 0  # successful polls in a row whose signals did not change
    gap: float = 0.0  # the current delay between polls while healthy (grows while calm and idle, or quiet)
    seen: tuple[int, int] = (0, 0)  # the endpoint's in-flight (count, tokens) when the last poll began
    last_page: tuple[EngineSpec, int, int, Metrics] | None = None  # spec, length, digest, reading
    stopped: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


def _read(target: _Target, spec: EngineSpec, page: bytes) -> Metrics:
    """`read_metrics` of a polled page, stamped now. A page equal to the target's last one (same
    engine spec, length and 64-bit digest of its bytes) reuses that reading without decoding it:
    an idle server's page rarely changes, and reading it was half of a poll's CPU
    (bench/metrics_poller.py). The digest costs ~4 µs for a 40 KB page and keeps nothing of the
    page; a server that forged a collision would only be read as it was on its previous poll."""
    now = time.monotonic()
    size, digest = len(page), xxh64_intdigest(page)
    last = target.last_page
    if last is not None and last[0] is spec and last[1] == size and last[2] == digest:
        return replace(last[3], updated=now)
    metrics = read_metrics(spec, page, now)
    target.last_page = (spec, size, digest, metrics)
    return metrics


def only_requested(text: str, names: frozenset[str]) -> bool:
    """Every sample line on the page is one of `names` (the server honoured `?name[]=`)."""
    start, end = 0, len(text)
    while start < end:
        eol = text.find("\n", start)
        if eol < 0:
            eol = end
        line = text[start:eol].strip()
        start = eol + 1
        if not line or line[0] == "#":
            continue
        cut = len(line)
        for sep in ("{", " ", "\t"):
            i = line.find(sep)
            if 0 <= i < cut:
                cut = i
        if line[:cut] not in names:
            return False
    return True


def _signals(m: Metrics) -> tuple[object, ...]:
    """What scorers read from one scrape, without its time: equal tuples mean nothing changed."""
    return (m.waiting, m.running, m.kv_usage, m.lora_running, m.lora_waiting, m.lora_max, m.models,
            m.block_size, m.num_blocks, tuple(m.custom.items()) if m.custom else ())


def _activity(ep: Endpoint) -> tuple[int, int]:
    """What this picker's own traffic changes on an endpoint: equal values, nothing routed there or
    ended there in between (almost surely: a start and an end of equal prompt sizes cancel out)."""
    return (ep.inflight, ep.inflight_tokens)


class Publisher(Protocol):
    """Where a scraper's results also go (epp.workershare: the other --workers processes)."""

    def added(self, ep: Endpoint) -> None: ...

    def removed(self, ep: Endpoint) -> None: ...

    def result(self, ep: Endpoint) -> None: ...

    def activity(self, ep: Endpoint) -> tuple[int, int]: ...


def _has_required(text: str, spec: EngineSpec) -> bool:
    """Some name of each required signal appears at a line start (a cheap pre-check)."""
    return all(any(f"\n{n}" in text or text.startswith(n) for n in alts) for alts in spec.required_names)


class Scraper:
    """Polls every endpoint of `datastore` and keeps `endpoint.metrics` fresh."""

    def __init__(
        self,
        datastore: Datastore,
        *,
        interval: float = DEFAULT_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        max_concurrency: int = DEFAULT_CONCURRENCY,
        engines: Mapping[str, EngineSpec] = ENGINES,
        port: int | None = None,
        path: str | None = None,
        scheme: str | None = None,
        ssl: ssl_lib.SSLContext | bool | None = None,
        jitter: float = 0.1,
        name_filter: bool = True,
        rng: random.Random | None = None,
        max_page_bytes: int = DEFAULT_MAX_PAGE_BYTES,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        idle_interval: float | None = None,
        quiet_interval: float | None = None,
        max_age: float | None = None,
        follow: bool = True,
        align: float | None = None,
        publish: Publisher | None = None,
    ) -> None:
        """`port`/`path`/`scheme` override where every model server's metrics are read (default:
        the engine's, see EngineSpec); `ssl` is used for https (a context; True: verify; False: do not verify;
        default: the engine's `insecure_skip_verify`). `jitter` is the per-cycle spread as a
        fraction of the interval. `max_concurrency` bounds polls in flight: a poll to a silent pod
        holds its slot until `timeout`, so keep it well above the number of pods that may hang at
        once. `name_filter=False` never tries `?name[]=`. `max_page_bytes` caps one page;
        `max_backoff` caps the delay between polls of a failing endpoint (at least the interval).
        `idle_interval` (None: off) adapts the rate to traffic and to change: an endpoint with no
        request in flight whose signals stayed the same for CALM_AFTER polls is polled ever slower,
        up to every `idle_interval` s; a request routed to it, or a change on its page, brings it
        back to `interval` at once (the wait is cut in `interval` slices that look at its in-flight
        count). Meanwhile its reading carries `steady_until`, when the slowest next poll is due, and
        readers do not take it for stale before then whatever `max_age` says. `quiet_interval` (None: off) ties a
        busy endpoint's rate to this picker's traffic: with requests in flight but none routed
        there or finished there since its last poll (its in-flight count and tokens unchanged),
        it is polled ever slower, up to every `quiet_interval` s; the first dispatch or completion
        brings it back to `interval` (the page a decision reads after a change this picker made is
        at most ~`interval` old; changes it did not make show within `quiet_interval`).
        `max_age` (None: no bound) is the age past which readers take a page for stale (the
        scheduler's metricsStalenessThreshold): the quiet rate is capped at half of it, so a busy
        endpoint is never scored as a stale one because the poller chose to wait (an idle one is
        vouched for instead).
        `follow=False`: start() does not subscribe to the datastore (ScrapeThread passes the
        changes on itself). `align` (seconds, at most the interval; None: the interval; 0: off): each endpoint's wake is
        moved to the nearest multiple of it on the loop's clock, so polls due about together share
        one timer wake and one loop pass (a separate wake per poll was about a third of a poll's
        CPU at 4 endpoints: bench/metrics_poller.py). Only the wake moves, not the schedule it is
        computed from: the mean rate is unchanged, a page is at most `align`/2 later. `publish` (None:
        nobody): told of every endpoint polled and every poll's outcome, and asked for the traffic
        signal (in-flight counts) in place of the endpoint's own (--workers: every worker's)."""
        if interval <= 0 or timeout <= 0 or max_concurrency < 1 or max_page_bytes < 1:
            raise ValueError("interval, timeout, max_page_bytes must be positive, max_concurrency at least 1")
        self.datastore = datastore
        self.interval = interval
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        self.engines = engines
        self.port = port
        self.path = path if not path or path.startswith("/") else "/" + path
        self.scheme = scheme
        self.ssl = ssl
        self.max_page_bytes = max_page_bytes
        self.max_backoff = max(max_backoff, interval)
        if max_age is not None and max_age > 0:
            # A page older than max_age scores as the worst pod (epp.scheduling.cycle): a gap that
            # long sends traffic away from a healthy pod, off its cached prefixes. Half leaves room
            # for the jitter and the poll's own time on a loaded machine. A steady idle page needs no
            # cap: the scraper vouches for it until its next poll (Metrics.steady_until).
            cap = max_age / 2
            quiet_interval = min(quiet_interval, cap) if quiet_interval else quiet_interval
        self.idle_interval = idle_interval if idle_interval and idle_interval > interval else None
        self.quiet_interval = quiet_interval if quiet_interval and quiet_interval > interval else None
        self.jitter = min(max(jitter, 0.0), 0.9)
        self.align = interval if align is None else min(max(align, 0.0), interval)
        self.name_filter = name_filter
        self._rng = rng or random.Random()
        self._targets: dict[str, _Target] = {}
        self._retiring: set[asyncio.Task[None]] = set()  # cancelled with their endpoint, still unwinding
        self._sem: asyncio.Semaphore | None = None
        self._running = False
        self._subscribed = not follow
        self.publish = publish
        self._activity = publish.activity if publish is not None else _activity
        self.polls_ok = 0  # counters for tests, benchmarks and telemetry
        self.polls_failed = 0

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start polling every current endpoint and follow the endpoint set. Call on the loop."""
        if self._running:
            return
        self._running = True
        self._sem = asyncio.Semaphore(self.max_concurrency)
        if not self._subscribed:
            self.datastore.subscribe(self._on_endpoints)
            self._subscribed = True
        for ep in list(self.datastore.endpoints.values()):
            self._add(ep)

    async def stop(self) -> None:
        """Stop every poll and close the session. Endpoint metrics are left as they are."""
        if not self._running:
            return
        self._running = False
        targets = list(self._targets.values())
        self._targets.clear()
        tasks = [t.task for t in targets if t.task is not None] + list(self._retiring)
        for t in targets:
            t.stopped = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in targets:
            if t.conn is not None:
                t.conn.close()

    @property
    def polling(self) -> frozenset[str]:
        """Addresses of the endpoints being polled."""
        return frozenset(self._targets)

    def polls(self) -> dict[str, int]:
        """Polls attempted per endpoint address (a failing endpoint's count grows ever slower)."""
        return {addr: t.polls for addr, t in self._targets.items()}

    def _on_endpoints(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        if not self._running:
            return
        for ep in removed:
            target = self._targets.get(ep.address)
            if target is not None and target.endpoint is ep:
                del self._targets[ep.address]
                self._retire(target)
                if self.publish is not None:
                    self.publish.removed(ep)
        for ep in added:
            self._add(ep)

    def _retire(self, target: _Target) -> None:
        target.stopped = True  # a poll in flight writes nothing after this
        task = target.task
        if task is not None and not task.done():
            task.cancel()
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _add(self, ep: Endpoint) -> None:
        old = self._targets.get(ep.address)
        if old is not None:
            if old.endpoint is ep:
                return
            self._retire(old)
        target = _Target(ep)
        self._targets[ep.address] = target
        if self.publish is not None:
            self.publish.added(ep)
        target.task = asyncio.get_running_loop().create_task(self._run(target), name=f"scrape {ep.address}")

    # ---- polling -------------------------------------------------------------------------
    async def _run(self, target: _Target) -> None:
        try:
            await self._loop_polls(target)
        finally:
            if target.conn is not None:
                target.conn.close()

    async def _loop_polls(self, target: _Target) -> None:
        loop = asyncio.get_running_loop()
        interval, jitter, rng = self.interval, self.jitter, self._rng
        await asyncio.sleep(rng.uniform(0, interval))  # spread first polls over one interval
        next_at = loop.time()
        while not target.stopped:
            await self.poll_once(target)
            step = interval * (1.0 + rng.uniform(-jitter, jitter))
            if target.failing:
                # back off a failing endpoint: a broken or hostile server costs less and less
                target.backoff = min(max(target.backoff * 2, interval * 2), self.max_backoff)
                next_at += target.backoff
            elif (self.idle_interval is not None and target.calm >= CALM_AFTER
                  and self._activity(target.endpoint)[0] == 0):
                # nothing routed there and nothing changed: the page costs the server to render
                target.backoff = 0.0
                target.gap = min(max(target.gap * 2, step * 2), self.idle_interval)
                next_at += target.gap
            elif (self.quiet_interval is not None and self._activity(target.endpoint)[0] > 0
                  and self._activity(target.endpoint) == target.seen):
                # busy, but nothing this picker did changed it since the last poll: a fresh page per
                # change is what decisions need, not one per interval (each poll costs both sides)
                target.backoff = 0.0
                target.gap = min(max(target.gap * 2, step * 2), self.quiet_interval)
                next_at += target.gap
            else:
                target.backoff = 0.0
                target.gap = step
                next_at += step
            now = loop.time()
            if next_at < now:  # the poll overran (timeouts): start the next one now, not a burst
                next_at = now
            if target.gap > interval and not target.failing:
                if await self._idle_wait(target, self._wake_at(next_at, now), interval):
                    # woken before next_at: the schedule starts over from this poll, else every
                    # early wake would push the next unwoken poll later by the rest of its wait
                    # (after a busy second, a quiet pod went unpolled for longer than its page
                    # stays fresh)
                    next_at = loop.time()
            else:
                await asyncio.sleep(self._wake_at(next_at, now) - now)

    def _wake_at(self, at: float, now: float) -> float:
        """When to wake for a poll due `at`: the nearest point of the wake grid shared by every
        endpoint, never one already past (then the next point; a poll already due: now)."""
        tick = self.align
        if tick <= 0 or at <= now:
            return max(at, now)
        wake = round(at / tick) * tick
        return wake if wake > now else wake + tick

    async def _idle_wait(self, target: _Target, until: float, step: float) -> bool:
        """Sleep to `until` in `step` slices (each woken on the shared grid), cut short when a
        request is routed to the endpoint or one ends there (its in-flight accounting moved since
        the last poll began); True if cut short."""
        loop = asyncio.get_running_loop()
        ep = target.endpoint
        while not target.stopped:
            now = loop.time()
            left = until - now
            if left <= 0:
                return False
            await asyncio.sleep(self._wake_at(now + min(step, left), now) - now)
            if self._activity(ep) != target.seen:
                target.calm = 0
                target.gap = 0.0
                return True
        return False

    async def poll_once(self, target: _Target) -> None:
        """One poll of one endpoint: fetch, parse, record the outcome."""
        assert self._sem is not None
        target.polls += 1
        target.seen = self._activity(target.endpoint)  # a change from here on is news for the next poll
        async with self._sem:
            try:
                async with asyncio.timeout(self.timeout):
                    metrics = await self._scrape(target)
            except (ScrapeError, MissingMetrics, TooManySeries) as err:
                self._failed(target, str(err))
            except TimeoutError:
                self._failed(target, f"timed out after {self.timeout:g}s")
            except (OSError, ValueError, EOFError) as err:
                self._failed(target, f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
            except Exception as err:  # never let one odd reply end this endpoint's polling for good
                self._failed(target, f"unexpected {type(err).__name__}: {err}")
            else:
                self._succeeded(target, metrics)

    def _resolve(self, target: _Target) -> EngineSpec:
        ep = target.endpoint
        if target.spec is None or ep.engine != target.engine_label:
            spec = resolve_engine(ep.engine, self.engines)
            if target.spec is None or spec.name != target.spec.name:
                target.use_filter = None if self.name_filter else False
            target.spec, target.engine_label = spec, ep.engine
            scheme = self.scheme or spec.scheme
            path = self.path or spec.path
            target.ssl = self.ssl if self.ssl is not None else not spec.insecure_skip_verify
            if target.conn is not None:
                target.conn.close()
            target.conn = PageConnection(scheme, ep.ip, self.port or spec.port or ep.port, target.ssl, _HEADERS)
            query = "&".join(f"name%5B%5D={quote(n, safe='')}" for n in spec.names)
            target.plain_url = path
            target.filtered_url = f"{path}?{query}"
        return target.spec

    async def _fetch(self, target: _Target, url: str) -> bytes:
        """The page at `url` (a path on the target's server), capped at max_page_bytes; a redirect
        is not followed (an error like any non-200 status)."""
        assert target.conn is not None
        try:
            body = await target.conn.get(url, self.max_page_bytes)
        except PageTooLargeError as e:
            raise PageTooLarge(str(e)) from None
        except HTTPGetError as e:
            raise ScrapeError(str(e)) from None
        except asyncio.IncompleteReadError:
            raise ScrapeError("connection closed before the page ended") from None
        return body

    async def _scrape(self, target: _Target) -> Metrics:
        spec = self._resolve(target)
        assert target.plain_url is not None and target.filtered_url is not None
        if target.use_filter:
            # Honoured when probed: trusted from then on (no per-poll check). A reply that lacks
            # the families sends the endpoint back to probing, and this poll to the full page.
            page = await self._fetch(target, target.filtered_url)
            try:
                return _read(target, spec, page)
            except MissingMetrics:
                target.use_filter = None
                log.info("metrics name filter reply lacks the families, probing again",
                         extra={"endpoint": target.endpoint.address})
                return _read(target, spec, await self._fetch(target, target.plain_url))
        if target.use_filter is None:
            probe: bytes | None
            try:
                probe = await self._fetch(target, target.filtered_url)
            except PageTooLarge:
                raise
            except ScrapeError:
                probe = None  # some servers reject unknown query parameters: try the plain URL
            text = probe.decode("utf-8", "replace") if probe is not None else ""
            if probe is not None and only_requested(text, frozenset(spec.names)) and _has_required(text, spec):
                metrics = _read(target, spec, probe)
                target.use_filter = True
                return metrics
            metrics = _read(target, spec, await self._fetch(target, target.plain_url))
            target.use_filter = False  # only once the full page proved good
            return metrics
        return _read(target, spec, await self._fetch(target, target.plain_url))

    def _succeeded(self, target: _Target, metrics: Metrics) -> None:
        if target.stopped:
            return
        ep = target.endpoint
        old = ep.metrics
        target.calm = target.calm + 1 if old is not None and _signals(old) == _signals(metrics) else 0
        # A steady idle page is vouched for until the slowest next poll could be due (the idle gap,
        # its jitter and the wake grid), so readers do not take it for stale meanwhile: a request
        # routed there cuts the wait to an interval, a change on the page shows at the next poll.
        idle = self.idle_interval
        metrics.steady_until = (metrics.updated + idle + 2 * self.interval
                                if idle is not None and target.calm >= CALM_AFTER and self._activity(ep)[0] == 0
                                else 0.0)
        ep.metrics = metrics
        ep.scrape_ok = True
        self.polls_ok += 1
        if self.publish is not None:
            self.publish.result(ep)
        if target.failing:
            target.failing = False
            log.info("metrics scrape recovered", extra={"endpoint": ep.address})

    def _failed(self, target: _Target, reason: str) -> None:
        if target.stopped:
            return
        ep = target.endpoint
        ep.scrape_ok = False
        self.polls_failed += 1
        if self.publish is not None:
            self.publish.result(ep)
        if not target.failing:
            target.failing = True
            log.warning("metrics scrape failing", extra={"endpoint": ep.address, "error": reason})


_T = TypeVar("_T")


def copied(fn: Callable[[], _T]) -> _T:
    """fn() copying a table the scraper thread may change meanwhile: copied again when it did."""
    for _ in range(100):
        try:
            return fn()
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return fn()


def _name_os_thread(name: bytes) -> None:
    """Give the calling thread its name in the OS too (/proc/<pid>/task/<tid>/comm, top -H), so a
    per-thread CPU reading tells the scraper from gRPC's threads; a no-op where prctl is missing."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


class ScrapeThread:
    """A Scraper on its own event loop in a daemon thread: no poll, parse or poll timer runs on the
    serving loop. The datastore's endpoint changes are passed to it with call_soon_threadsafe; its
    results are single attribute writes on the Endpoint objects (`metrics`, `scrape_ok`), which
    readers on the serving loop see whole (the GIL makes each write atomic)."""

    def __init__(self, datastore: Datastore, **kw: object) -> None:
        """`kw`: the Scraper's own parameters."""
        self.datastore = datastore
        self.scraper = Scraper(datastore, follow=False, **kw)  # type: ignore[arg-type]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._subscribed = False

    def start(self, timeout: float = 10.0) -> None:
        """Start the thread and the polls. Call from the serving loop: it is blocked until the
        scraper has taken its snapshot of the endpoints, so no change falls between the snapshot
        and the subscription."""
        if self._thread is not None:
            return
        ready = threading.Event()
        failed: list[BaseException] = []
        try:  # the serving loop's kind (uvloop as shipped): its timers and callbacks cost less per poll
            make_loop: Callable[[], asyncio.AbstractEventLoop] = type(asyncio.get_running_loop())
        except RuntimeError:
            make_loop = asyncio.new_event_loop

        def begin() -> None:
            try:
                self.scraper.start()
            except BaseException as e:  # reported to start()'s caller
                failed.append(e)
            ready.set()

        def run() -> None:
            _name_os_thread(b"scraper")
            loop = make_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.call_soon(begin)
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="scraper", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("the scraper thread did not start")
        if failed:
            raise failed[0]
        if not self._subscribed:
            self.datastore.subscribe(self._on_endpoints)
            self._subscribed = True

    def _on_endpoints(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.scraper._on_endpoints, list(added), list(removed))

    def call(self, fn: Callable[[], object]) -> None:
        """Run `fn` on the scraper's loop (tests)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(fn)

    async def stop(self) -> None:
        """Stop every poll, close the session, end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = None
        try:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.scraper.stop(), loop))
        finally:
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join, 10.0)
            self._thread = None

    @property
    def polling(self) -> frozenset[str]:
        return copied(lambda: self.scraper.polling)

    def polls(self) -> dict[str, int]:
        return copied(self.scraper.polls)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

"""Debug routes on the metrics port (`--enable-pprof`): what the process is doing, in plain text.

The reference serves Go's pprof handlers; these are their Python counterparts:

- `/debug/pprof/` lists the routes.
- `/debug/pprof/goroutine` (alias `tasks`): every asyncio task with its stack, then every thread's.
- `/debug/pprof/heap?top=N`: the N biggest allocation sites (tracemalloc). Tracing allocations
  slows the process, so it starts on the first request ("started; ask again") and stops with
  `?stop=1`.
- `/debug/pprof/profile?seconds=N`: a cProfile of the event-loop thread for N seconds (default
  10, at most 60), the top functions by cumulative time, or by their own time with `sort=tottime`
  (also `calls`). One profile at a time (409 otherwise).

The HTTP server runs on its own thread; what must run on the event loop (the task list, the
profiler switch) is handed to it with `call_soon_threadsafe` and waited for with a timeout, so a
stuck loop gives an error page instead of a hung request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import cProfile
import io
import pstats
import sys
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs

PREFIX = "/debug/pprof"
MAX_PROFILE_SECONDS = 60.0
MAX_TOP = 500
_LOOP_TIMEOUT = 5.0

_SORTS = {"cumulative": pstats.SortKey.CUMULATIVE, "tottime": pstats.SortKey.TIME, "calls": pstats.SortKey.CALLS}

T = TypeVar("T")
Reply = tuple[int, str]  # (HTTP status, text body)


class DebugRoutes:
    """Answers `/debug/pprof/...` requests; `loop` is the picker's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._profiling = threading.Lock()

    def handle(self, path: str, query: str) -> Reply:
        """(status, text) for one GET; unknown routes are 404."""
        q = {k: v[-1] for k, v in parse_qs(query).items()}
        route = path[len(PREFIX):].strip("/")
        if route == "":
            return 200, _INDEX
        if route in ("goroutine", "tasks"):
            return self.tasks()
        if route in ("heap", "allocs"):
            return self.heap(_int(q.get("top"), 25, 1, MAX_TOP), q.get("stop", "") in ("1", "true"))
        if route == "profile":
            seconds = _float(q.get("seconds"), 10.0, 0.1, MAX_PROFILE_SECONDS)
            sort = q.get("sort", "cumulative")
            if sort not in _SORTS:
                return 400, f"sort must be one of {', '.join(_SORTS)}, not {sort[:40]!r}\n"
            return self.profile(seconds, _int(q.get("top"), 40, 1, MAX_TOP), _SORTS[sort])
        return 404, f"no debug route {path!r}; see {PREFIX}/\n"

    # ---- routes -----------------------------------------------------------------------------
    def tasks(self) -> Reply:
        """Every asyncio task (name, state, stack), then every thread's stack."""
        try:
            text = self._on_loop(_dump_tasks, self.loop)
        except Exception as e:  # a stuck loop is itself the answer
            text = f"could not list asyncio tasks: {type(e).__name__}: {e}\n"
        out = io.StringIO(text)
        out.seek(0, io.SEEK_END)
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            out.write(f"\n--- thread {names.get(ident, '?')} ({ident})\n")
            out.write("".join(traceback.format_stack(frame)))
        return 200, out.getvalue()

    def heap(self, top: int, stop: bool) -> Reply:
        """The biggest allocation sites since tracemalloc started."""
        if stop:
            was = tracemalloc.is_tracing()
            tracemalloc.stop()
            return 200, "tracemalloc stopped\n" if was else "tracemalloc was not running\n"
        if not tracemalloc.is_tracing():
            tracemalloc.start(10)
            return 200, ("tracemalloc started (it slows allocation; stop with ?stop=1); ask again to see the "
                         "allocation sites since now\n")
        snap = tracemalloc.take_snapshot().filter_traces((tracemalloc.Filter(False, tracemalloc.__file__),
                                                          tracemalloc.Filter(False, "<frozen importlib._bootstrap>")))
        stats = snap.statistics("lineno")
        current, peak = tracemalloc.get_traced_memory()
        lines = [f"traced: {current / 1e6:.1f} MB now, {peak / 1e6:.1f} MB peak; top {top} sites:"]
        for st in stats[:top]:
            frame = st.traceback[0]
            lines.append(f"{st.size / 1024:10.1f} KiB {st.count:8d} blocks  {frame.filename}:{frame.lineno}")
        return 200, "\n".join(lines) + "\n"

    def profile(self, seconds: float, top: int, sort: pstats.SortKey = pstats.SortKey.CUMULATIVE) -> Reply:
        """cProfile of the event-loop thread for `seconds`, ordered by `sort`."""
        if not self._profiling.acquire(blocking=False):
            return 409, "a profile is already running\n"
        try:
            prof = cProfile.Profile()
            try:
                self._on_loop(prof.enable)
            except Exception as e:
                return 503, f"could not start the profiler on the event loop: {e}\n"
            time.sleep(seconds)
            try:
                self._on_loop(prof.disable)
            except Exception as e:
                return 503, f"could not stop the profiler on the event loop: {e}\n"
            out = io.StringIO()
            out.write(f"cProfile of the event-loop thread for {seconds:g} s\n")
            stats = pstats.Stats(prof, stream=out)
            stats.sort_stats(sort).print_stats(top)
            return 200, out.getvalue()
        finally:
            self._profiling.release()

    # ---- helpers ----------------------------------------------------------------------------
    def _on_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the event loop thread and return its result (TimeoutError if stuck)."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout=_LOOP_TIMEOUT)


def _dump_tasks(loop: asyncio.AbstractEventLoop) -> str:
    tasks = sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name())
    out = io.StringIO()
    out.write(f"{len(tasks)} asyncio tasks\n")
    for t in tasks:
        state = "done" if t.done() else ("cancelling" if t.cancelling() else "pending")
        out.write(f"\n--- task {t.get_name()} [{state}] {t.get_coro()!r}\n")
        for frame in t.get_stack(limit=20):
            out.write("".join(traceback.format_stack(frame, limit=1)))
    return out.getvalue()


def _int(text: str | None, default: int, lo: int, hi: int) -> int:
    try:
        return min(max(int(text), lo), hi) if text else default
    except ValueError:
        return default


def _float(text: str | None, default: float, lo: float, hi: float) -> float:
    try:
        v = float(text) if text else default
    except ValueError:
        return default
    return min(max(v, lo), hi) if v == v else default


_INDEX = f"""debug routes (text):
  {PREFIX}/goroutine           asyncio tasks and thread stacks (alias: tasks)
  {PREFIX}/heap?top=N          biggest allocation sites (starts tracemalloc on first use; ?stop=1 stops it)
  {PREFIX}/profile?seconds=N   cProfile of the event loop for N seconds (max {MAX_PROFILE_SECONDS:g});
                               &sort=tottime orders by own time (default cumulative; also calls)
"""

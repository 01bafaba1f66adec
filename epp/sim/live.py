"""Drives an `Engine` in real time: one asyncio task steps it, sleeping each step's duration x time scale.

The driver keeps a *simulated* clock. While the engine is busy the clock advances by exactly the
modelled step durations, even if the event loop runs late, so the timings the engine reports (TTFT,
queue time, e2e) are the model's and never wall-clock jitter divided by the time scale. Arrivals are
stamped with the wall time mapped to simulated time, clamped into the step in progress; an arrival at
an idle engine moves the clock forward to itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from epp.sim.engine import Engine, Seq

log = logging.getLogger("epp.sim.live")


class LiveDriver:
    """Runs `engine` on the current event loop; wall seconds = simulated seconds x `time_scale`."""

    def __init__(self, engine: Engine, time_scale: float = 1.0) -> None:
        if not time_scale > 0:
            raise ValueError("time_scale must be > 0")
        self.engine = engine
        self.time_scale = time_scale
        self.vnow = 0.0  # simulated seconds since start
        self._wall0 = 0.0
        self._step_start = 0.0
        self._step_end = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wall0 = loop.time()
        self._task = loop.create_task(self._run(), name="sim-engine")
        self._task.add_done_callback(self._ended)

    @staticmethod
    def _ended(task: asyncio.Task[None]) -> None:
        # a crash here would leave every request hanging: make it loud
        if not task.cancelled() and task.exception() is not None:
            log.error("sim engine loop crashed", exc_info=task.exception())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def now(self) -> float:
        """The simulated time of an event happening now."""
        wall_v = (asyncio.get_running_loop().time() - self._wall0) / self.time_scale
        if self.engine.stepping:
            return min(max(wall_v, self._step_start), self._step_end)
        return max(self.vnow, wall_v)

    def wall_delay(self, simulated_seconds: float) -> float:
        """Wall seconds for a simulated duration."""
        return simulated_seconds * self.time_scale

    def submit(self, seq: Seq) -> None:
        """Queue a sequence built with `arrival = now()`."""
        engine = self.engine
        if not engine.stepping and not engine.has_work:
            self.vnow = max(self.vnow, seq.arrival)  # idle: the clock jumps to the arrival
        engine.add(seq)
        self._wake.set()

    def abort(self, seq: Seq) -> None:
        self.engine.abort(seq, self.now())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        while True:
            if not engine.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            duration = engine.begin_step(self.vnow)
            if duration is None:  # cannot happen with a valid engine; never spin
                log.warning("engine has work but scheduled nothing; waiting for a change")
                self._wake.clear()
                await self._wake.wait()
                continue
            self._step_start = self.vnow
            self._step_end = end = self.vnow + duration
            delay = self._wall0 + end * self.time_scale - loop.time()
            await asyncio.sleep(delay if delay > 0 else 0)
            self.vnow = end
            engine.end_step(end)

"""Flow control under asyncio: a request's coroutine awaits one future while it is queued.

Nothing runs per queued request per tick. The controller's cycle runs when something may have
made room: an arrival, `notify()` (a request finished, the endpoint set changed, metrics were
refreshed), the earliest TTL deadline (one timer for the whole queue), and, while requests wait
on a saturated pool, one re-check every `recheck_interval` (the metrics the utilization detector
reads change only when a scrape lands, which nothing announces).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from epp.flowcontrol.controller import MAX_DISPATCH_PER_CYCLE, FlowController
from epp.flowcontrol.types import Drop, FlowKey, Item, Outcome

T = TypeVar("T")

DEFAULT_RECHECK = 0.05  # s; about one metrics scrape


class AsyncFlowControl:
    """Drives a FlowController from the running event loop."""

    def __init__(self, controller: FlowController, *, recheck_interval: float = DEFAULT_RECHECK) -> None:
        self.controller = controller
        self.recheck_interval = recheck_interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._soon: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def admit(self, key: FlowKey, bind: Callable[[], T], *, byte_size: int = 0, request_id: str = "",
                    model: str = "", target_model: str = "", ttl: float | None = None,
                    unbind: Callable[[T], Any] | None = None, slo_ttft: float | None = None) -> T | Drop:
        """Wait for dispatch, then return `bind()` (called in the dispatch cycle: the endpoint is
        chosen at that moment); or the Drop that answers the client. If the waiting coroutine is
        cancelled (client gone) the request leaves its queue at once; a binding already made for
        it is handed to `unbind`."""
        loop = self._get_loop()
        fut: asyncio.Future[T | Drop] = loop.create_future()

        def done(item: Item) -> Any:
            try:
                value: Any = bind() if item.outcome is Outcome.DISPATCHED else item.drop
            except Exception as e:  # the binding failed: the waiter gets the error, never hangs
                if not fut.done():
                    fut.set_exception(e)
                return None
            if fut.done():  # the waiter is gone (cancelled): give the binding back
                if item.outcome is Outcome.DISPATCHED and unbind is not None:
                    unbind(value)
            else:
                fut.set_result(value)
            return value

        item = self.controller.submit(key, byte_size, done, request_id=request_id, ttl=ttl, model=model,
                                      target_model=target_model, slo_ttft=slo_ttft)
        if not item.done:
            self._arm()
        try:
            return await fut
        except asyncio.CancelledError:
            if not self.controller.cancel(item) and item.outcome is Outcome.DISPATCHED and unbind is not None \
                    and fut.done() and not fut.cancelled():
                unbind(item.result)  # dispatched, but the waiter never resumed to use it
            self.notify()
            raise

    # ---- wake-ups ---------------------------------------------------------------------------
    def notify(self) -> None:
        """Something may have made room: run a dispatch cycle soon (coalesced)."""
        if self._soon is None and self.controller.live:
            self._soon = self._get_loop().call_soon(self._cycle)

    def _cycle(self) -> None:
        self._soon = None
        c = self.controller
        c.expire()
        n = c.dispatch()
        if n >= MAX_DISPATCH_PER_CYCLE:
            self.notify()  # more may go: yield to the loop first
        self._arm()

    def _arm(self) -> None:
        """One timer: the earliest TTL deadline, or the re-check while requests wait on a full pool."""
        c = self.controller
        if not c.live:
            self._cancel_timer()
            return
        loop = self._get_loop()
        now = c.clock()
        at = now + self.recheck_interval
        deadline = c.next_deadline()
        if deadline is not None:
            at = min(at, deadline)
        if self._timer is not None and abs(self._timer_at - at) < 1e-4:
            return
        self._cancel_timer()
        self._timer_at = at
        self._timer = loop.call_later(max(0.0, at - now), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._cycle()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> int:
        """Shut down: every queued request is answered (500, rejected-shutting-down); the count."""
        self._cancel_timer()
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        return self.controller.shutdown()

"""Prefill budget: room while some endpoint has less than `budget` prompt tokens sent to it and not
yet answered with a first token.

Flow control then keeps the engines' own FCFS queues about one or two steps deep and holds the rest
in the picker, where the ordering policy (e.g. shortest-prompt-first) decides what goes next and
the scheduler binds it to the pod that just freed (late binding). The signal is the first token:
the router sees it when the response starts streaming. Today only the discrete-event simulator
delivers it (`epp.flowcontrol.sim`, the cluster's `on_first_token` hook); the live request path
does not yet, so this detector is not a registered plugin (see docs/flow-control.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.datastore import Endpoint

CHARS_PER_TOKEN = 4  # the picker's estimate before any tokenizer: ~4 bytes of body a token


def tokens_of(byte_size: int) -> int:
    """Estimated prompt tokens of a body of `byte_size` bytes (at least 1)."""
    return max(1, -(-byte_size // CHARS_PER_TOKEN))


class PrefillBudgetDetector:
    """Counts, per endpoint address, the estimated prompt tokens of requests awaiting their first token."""

    def __init__(self, budget_tokens: int) -> None:
        if budget_tokens < 1:
            raise ValueError("budget_tokens must be >= 1")
        self.budget = budget_tokens
        self.pending: dict[str, int] = {}
        self._open: dict[str, tuple[str, int]] = {}  # request id -> (address, tokens)

    def dispatched(self, request_id: str, endpoint: Endpoint, byte_size: int, tokens: int | None = None) -> None:
        """A request was sent to `endpoint`: its prefill counts until released(). `tokens` is the
        work to prefill when the caller knows it (prompt less the pod's cached prefix), else the
        body's estimated prompt tokens."""
        tokens = tokens_of(byte_size) if tokens is None else max(1, tokens)
        self._open[request_id] = (endpoint.address, tokens)
        self.pending[endpoint.address] = self.pending.get(endpoint.address, 0) + tokens

    def released(self, request_id: str) -> bool:
        """Its first token came (or it ended without one): it stops counting. Idempotent."""
        entry = self._open.pop(request_id, None)
        if entry is None:
            return False
        address, tokens = entry
        left = self.pending.get(address, 0) - tokens
        if left > 0:
            self.pending[address] = left
        else:
            self.pending.pop(address, None)
        return True

    def load(self, endpoint: Endpoint) -> float:
        """The endpoint's pending prefill as a share of the budget."""
        return self.pending.get(endpoint.address, 0) / self.budget

    def pool_saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
        """The least loaded endpoint's share of its budget (1.0 for an empty pool): below 1, a pod has room."""
        return min((self.load(ep) for ep in endpoints), default=1.0)

    def pool_saturated(self, endpoints: Sequence[Endpoint], now: float) -> bool:
        return self.pool_saturation(endpoints, now) >= 1.0

"""Pickers: turn summed scores into endpoints in preference order (primary, then fallbacks)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from epp.datastore import Endpoint
from epp.scheduling.cycle import Cycle
from epp.scheduling.registry import PICKER, BuildContext, Params, register

# Scores within this distance count as equal (sums of the same terms can differ in the last bit).
TIE_EPSILON = 1e-9


def _max_endpoints(p: Params) -> int:
    n = p.integer("maxNumOfEndpoints", 1, lo=1, hi=64)
    p.done()
    return n


class _PickerBase:
    def __init__(self, name: str, params: int, ctx: BuildContext) -> None:
        self.name = name
        self.max_endpoints = params
        self.rng: random.Random = ctx.rng

    @classmethod
    def parse(cls, p: Params) -> int:
        return _max_endpoints(p)


@register("max-score-picker", PICKER)
class MaxScorePicker(_PickerBase):
    """Highest score first; equal scores are ordered at random, so a burst of equal-scoring
    requests spreads instead of landing on whichever pod happens to sort first."""

    def pick(self, cycle: Cycle, endpoints: Sequence[Endpoint], scores: list[float]) -> list[Endpoint]:
        n = len(endpoints)
        if self.max_endpoints == 1 or n == 1:
            best = max(scores)
            floor = best - TIE_EPSILON
            ties = [i for i in range(n) if scores[i] >= floor]
            i = ties[0] if len(ties) == 1 else ties[int(self.rng.random() * len(ties))]
            return [endpoints[i]]
        order = list(range(n))
        self.rng.shuffle(order)
        # Quantise so near-equal sums tie; the stable sort keeps the shuffled order among ties.
        order.sort(key=lambda i: round(scores[i] / TIE_EPSILON), reverse=True)
        return [endpoints[i] for i in order[: self.max_endpoints]]


@register("random-picker", PICKER)
class RandomPicker(_PickerBase):
    """Uniformly random endpoints, ignoring scores."""

    def pick(self, cycle: Cycle, endpoints: Sequence[Endpoint], scores: list[float]) -> list[Endpoint]:
        return self.rng.sample(list(endpoints), min(self.max_endpoints, len(endpoints)))


@register("weighted-random-picker", PICKER)
class WeightedRandomPicker(_PickerBase):
    """Random in proportion to score, without replacement (A-Res: largest U^(1/score) first).

    Zero-score endpoints come last, in random order; all zero means uniform.
    """

    def pick(self, cycle: Cycle, endpoints: Sequence[Endpoint], scores: list[float]) -> list[Endpoint]:
        rand = self.rng.random
        # Endpoints scoring 0 get keys in (-1, 0]: after every positive one, random among themselves.
        keys = [rand() ** (1.0 / s) if s > 1e-300 else -rand() for s in scores]
        if self.max_endpoints == 1:
            return [endpoints[max(range(len(keys)), key=keys.__getitem__)]]
        order = sorted(range(len(keys)), key=keys.__getitem__, reverse=True)
        return [endpoints[i] for i in order[: self.max_endpoints]]

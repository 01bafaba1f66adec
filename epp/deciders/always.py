"""`always-disagg-pd-decider`: every request is disaggregated (no parameters)."""

from __future__ import annotations

from epp.datastore import Endpoint
from epp.scheduling.framework import SchedulingRequest
from epp.scheduling.registry import DECIDER, BuildContext, NoParams, register


@register("always-disagg-pd-decider", DECIDER)
class AlwaysDisaggPDDecider(NoParams):
    """Says yes to every request."""

    def __init__(self, name: str, params: None, ctx: BuildContext) -> None:
        self.name = name

    def disaggregate(self, request: SchedulingRequest, endpoint: Endpoint | None) -> bool:
        return True

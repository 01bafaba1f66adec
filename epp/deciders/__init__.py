"""Disaggregation deciders: per request, whether a stage of `disagg-profile-handler` runs (see README.md)."""

from __future__ import annotations

from typing import Protocol

from epp.datastore import Endpoint
from epp.scheduling.framework import SchedulingRequest


class Decider(Protocol):
    """Answers whether to disaggregate a stage for `request`, given the decode endpoint already
    chosen (None in prefill-first order, where nothing is chosen yet)."""

    name: str

    def disaggregate(self, request: SchedulingRequest, endpoint: Endpoint | None) -> bool: ...

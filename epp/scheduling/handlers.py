"""Profile handlers: which of the config's `schedulingProfiles` run for a request.

`single-profile-handler` (the default when a config names none) runs the one profile there is. The
handlers that run several profiles a request or change the destination live beside it:
`disagg-profile-handler` (P/D, disagg.py) and `data-parallel-profile-handler` (dataparallel.py);
config.build_scheduler wraps the profiles in the scheduler each needs.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.scheduling.registry import HANDLER, BuildContext, ConfigError, NoParams, register

DEFAULT_HANDLER = "single-profile-handler"


@register(DEFAULT_HANDLER, HANDLER)
class SingleProfileHandler(NoParams):
    """Runs the single configured profile for every request; refuses a config with several."""

    def __init__(self, name: str, params: None, ctx: BuildContext) -> None:
        self.name = name

    @staticmethod
    def validate(profiles: Sequence[str], path: str) -> None:
        """Raise ConfigError unless exactly one profile is configured (the reference's rule)."""
        if len(profiles) != 1:
            raise ConfigError(path, f"single-profile-handler runs exactly one profile; got {len(profiles)} "
                                    f"({', '.join(profiles)}). Several profiles a request need "
                                    "disagg-profile-handler (P/D disaggregation)")

    @staticmethod
    def select(profiles: Sequence[str]) -> str:
        """The profile that runs: the only one."""
        return profiles[0]

"""`endpoint-notification-source`: endpoint add/remove events delivered to its extractors.

In this picker the datastore already tells its listeners (Datastore.subscribe) when endpoints come
and go; declaring the source records that the config asks for it (DataLayerConfig.endpoint_notifications).
The extractors the reference attaches to it (precise prefix index, multimodal cache) are not yet supported.
"""

from __future__ import annotations

from epp.scheduling.registry import DATA_SOURCE, BuildContext, NoParams, register


@register("endpoint-notification-source", DATA_SOURCE)
class EndpointNotificationSource(NoParams):
    """No parameters."""

    def __init__(self, name: str, params: None, ctx: BuildContext) -> None:
        self.name = name

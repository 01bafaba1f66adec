"""`always-disagg-multimodal-decider`: run the encode stage for chat requests whose messages carry
image, video or audio content blocks (`image_url`, `video_url`, `input_audio`); text-only requests
skip it. No parameters."""

from __future__ import annotations

from collections.abc import Mapping

from epp.datastore import Endpoint
from epp.scheduling.framework import SchedulingRequest
from epp.scheduling.registry import DECIDER, BuildContext, NoParams, register

MEDIA_TYPES = frozenset({"image_url", "video_url", "input_audio"})
MAX_BLOCKS = 4096  # content blocks looked at per request (bounded work on hostile bodies)


def has_media(body: Mapping[str, object] | None) -> bool:
    """Whether a chat body's messages hold a multimodal content block."""
    if not isinstance(body, Mapping):
        return False
    messages = body.get("messages")
    if not isinstance(messages, list):
        return False
    seen = 0
    for m in messages:
        content = m.get("content") if isinstance(m, Mapping) else None
        if not isinstance(content, list):
            continue
        for block in content:
            seen += 1
            if seen > MAX_BLOCKS:
                return False
            if isinstance(block, Mapping) and block.get("type") in MEDIA_TYPES:
                return True
    return False


@register("always-disagg-multimodal-decider", DECIDER)
class AlwaysDisaggMultimodalDecider(NoParams):
    """Yes for requests with media content, no otherwise."""

    def __init__(self, name: str, params: None, ctx: BuildContext) -> None:
        self.name = name

    def disaggregate(self, request: SchedulingRequest, endpoint: Endpoint | None) -> bool:
        return has_media(request.body)

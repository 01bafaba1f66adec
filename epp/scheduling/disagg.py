"""`disagg-profile-handler`: prefill/decode (and encode) disaggregation across scheduling profiles.

Per request, in the default `stageOrder: decode-first`: run the decode profile (always); then, if
an encode decider is configured, the encode profile exists and the decider says so for the chosen
decode pod, the encode profile; then, likewise, the prefill profile with the prefill decider. The
decode pod is the destination (`x-gateway-destination-endpoint` and `envoy.lb`); the prefill pod
goes in request header `x-prefiller-host-port: ip:port`, the encode pods in `x-encoder-hosts-ports:
ip:port,...`; a stage that did not run sets no header. `stageOrder: prefill-first` runs the
prefill profile (whenever it exists; no prefill decider may be given), then encode, then decode.

Parameters as the reference: `stageOrder`, `profiles.{decode,prefill,encode}` (defaults `decode`,
`prefill`, `encode`), `deciders.{prefill,encode}` (decider plugin names; without one the stage never
runs); or the deprecated flat form `decodeProfile`, `prefillProfile`, `encodeProfile`,
`prefillDeciderPluginName`, `encodeDeciderPluginName`, `deciderPluginName` (not mixed with the
nested one). `pd-profile-handler` (deprecated in the reference) is the same handler under its old
name, accepting its `threshold`-era keys `prefixPluginType`, `prefixPluginName`, `primaryPort`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from epp.datastore import Endpoint
from epp.scheduling.framework import SchedulingRequest, SchedulingResult
from epp.scheduling.profile import ProfileScheduler, WeightedScorer
from epp.scheduling.registry import HANDLER, REQUEST_CONTROL, BuildContext, ConfigError, Params, register

PREFILL_HEADER = "x-prefiller-host-port"
ENCODE_HEADER = "x-encoder-hosts-ports"
DECODE_FIRST, PREFILL_FIRST = "decode-first", "prefill-first"
DECIDER_TYPES = ("prefix-based-pd-decider", "always-disagg-pd-decider", "always-disagg-multimodal-decider")
_LEGACY = ("decodeProfile", "prefillProfile", "encodeProfile", "prefillDeciderPluginName",
           "encodeDeciderPluginName", "deciderPluginName")
_IGNORED_LEGACY = ("prefixPluginType", "prefixPluginName", "primaryPort", "hashBlockSize", "threshold")
# request.scratch key: what the prefill/encode stages chose, for on_routed / on_finished
_STAGES = "disagg:stages"
# request.scratch key: (handler name, handler type, decision type) for the picker's metrics
DISAGG_DECISION = "disagg:decision"


@dataclass(frozen=True, slots=True)
class DisaggParams:
    stage_order: str = DECODE_FIRST
    decode: str = "decode"
    prefill: str = "prefill"
    encode: str = "encode"
    prefill_decider: str = ""
    encode_decider: str = ""


def parse_stage_order(value: object, path: str) -> str:
    """`decode-first` / `prefill-first`, spelled as the reference accepts (case, `-`, `_` ignored;
    also `decode`, `prefill`; empty = decode-first)."""
    if value is None:
        return DECODE_FIRST
    if not isinstance(value, str):
        raise ConfigError(path, f"expected {DECODE_FIRST} or {PREFILL_FIRST}, got {value!r}")
    key = value.lower().replace("-", "").replace("_", "")
    if key in ("", "decodefirst", "decode"):
        return DECODE_FIRST
    if key in ("prefillfirst", "prefill"):
        return PREFILL_FIRST
    raise ConfigError(path, f"invalid stage order {value!r}: must be {DECODE_FIRST} or {PREFILL_FIRST}")


def _names(p: Params, keys: Sequence[str]) -> dict[str, str]:
    return {k: p.string(k, "") for k in keys}


@register("disagg-profile-handler", HANDLER)
class DisaggProfileHandler:
    """Chooses which of the decode / encode / prefill profiles run for a request (module doc)."""

    def __init__(self, name: str, params: DisaggParams, ctx: BuildContext | None) -> None:
        self.name = name
        self.p = params

    @classmethod
    def parse(cls, p: Params) -> DisaggParams:
        legacy = [k for k in p.raw if k in _LEGACY or k in _IGNORED_LEGACY]
        nested = [k for k in p.raw if k in ("profiles", "deciders")]
        if legacy and nested:
            raise ConfigError(p.field(legacy[0]), "give either the nested profiles/deciders parameters or the "
                                                  "deprecated flat ones, not both")
        order = parse_stage_order(p.get("stageOrder"), p.field("stageOrder"))
        if legacy:
            flat = _names(p, _LEGACY)
            for k in _IGNORED_LEGACY:
                p.get(k)
            p.done()
            out = DisaggParams(order, flat["decodeProfile"] or "decode", flat["prefillProfile"] or "prefill",
                               flat["encodeProfile"] or "encode",
                               flat["prefillDeciderPluginName"] or flat["deciderPluginName"],
                               flat["encodeDeciderPluginName"])
        else:
            profiles = p.sub("profiles")
            pr = _names(profiles, ("decode", "prefill", "encode"))
            profiles.done()
            deciders = p.sub("deciders")
            de = _names(deciders, ("prefill", "encode"))
            deciders.done()
            p.done()
            out = DisaggParams(order, pr["decode"] or "decode", pr["prefill"] or "prefill", pr["encode"] or "encode",
                               de["prefill"], de["encode"])
        if out.stage_order == PREFILL_FIRST and out.prefill_decider:
            raise ConfigError(p.field("deciders.prefill"), f"a prefill decider is not supported in {PREFILL_FIRST} "
                                                           "stage order (prefill always runs first)")
        return out

    @staticmethod
    def refs(params: DisaggParams) -> list[tuple[str, str, tuple[str, ...]]]:
        """The decider plugins the parameters name: (parameter, plugin name, acceptable types)."""
        out: list[tuple[str, str, tuple[str, ...]]] = []
        if params.prefill_decider:
            out.append(("deciders.prefill", params.prefill_decider, DECIDER_TYPES))
        if params.encode_decider:
            out.append(("deciders.encode", params.encode_decider, DECIDER_TYPES))
        return out

    @staticmethod
    def validate_profiles(params: DisaggParams, profiles: Sequence[str], path: str) -> None:
        """Raise ConfigError unless the decode profile exists (the others are optional)."""
        if params.decode not in profiles:
            raise ConfigError(path, f"disagg-profile-handler needs a decode profile named \"{params.decode}\" "
                                    f"(profiles.decode); the config has {', '.join(profiles) or 'none'}")


@register("pd-profile-handler", HANDLER)
class PdProfileHandler(DisaggProfileHandler):
    """The reference's deprecated name for disagg-profile-handler (same behaviour)."""


class DisaggScheduler:
    """Runs the decode, encode and prefill profiles for a request as the handler orders them; the
    result's endpoints are the decode profile's, its headers name the prefill / encode picks."""

    def __init__(self, params: DisaggParams, profiles: dict[str, ProfileScheduler],
                 prefill_decider: Any = None, encode_decider: Any = None, *,
                 handler_name: str = "disagg-profile-handler", handler_type: str = "disagg-profile-handler") -> None:
        self.p = params
        self.handler_name, self.handler_type = handler_name, handler_type
        self.profiles = profiles
        self.decode = profiles[params.decode]
        self.prefill = profiles.get(params.prefill)
        self.encode = profiles.get(params.encode)
        self.prefill_decider = prefill_decider
        self.encode_decider = encode_decider
        self.name = params.decode
        # decisions since start (disaggregated or not), for tests, logs and the benchmark
        self.decisions: dict[str, int] = {"decode-only": 0, "prefill-decode": 0, "encode-decode": 0,
                                          "encode-prefill-decode": 0, "failed": 0}

    # ---- the Scheduler interface -----------------------------------------------------------
    @property
    def scorers(self) -> tuple[WeightedScorer, ...]:
        """The decode profile's scorers (what the server inspects, e.g. for a session-affinity scorer)."""
        return self.decode.scorers

    @property
    def max_endpoints(self) -> int:
        return self.decode.max_endpoints

    @property
    def plugin_timer(self) -> Callable[[str, str, str, float], None] | None:
        return self.decode.plugin_timer

    @plugin_timer.setter
    def plugin_timer(self, fn: Callable[[str, str, str, float], None] | None) -> None:
        for prof in self.profiles.values():
            prof.plugin_timer = fn

    def schedule(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        stages: dict[str, tuple[ProfileScheduler, list[Endpoint], dict[str, Any]]] = {}
        if self.p.stage_order == PREFILL_FIRST:
            if self.prefill is not None:
                self._run("prefill", self.prefill, request, candidates, stages)
            self._maybe_encode(request, candidates, None, stages)
            result = self.decode.schedule(request, candidates)
        else:
            result = self.decode.schedule(request, candidates)
            if result.endpoints:
                primary = result.endpoints[0]
                self._maybe_encode(request, candidates, primary, stages)
                if self.prefill is not None and self.prefill_decider is not None \
                        and self.prefill_decider.disaggregate(request, primary):
                    self._run("prefill", self.prefill, request, candidates, stages)
        if not result.endpoints:
            self.decisions["failed"] += 1
            return SchedulingResult([], f"no decode endpoint: {result.reason}" if result.reason else
                                    "failed to find available decode workers")
        headers: list[tuple[str, str]] = []
        if "prefill" in stages:
            headers.append((PREFILL_HEADER, stages["prefill"][1][0].address))
        if "encode" in stages:
            headers.append((ENCODE_HEADER, ",".join(e.address for e in stages["encode"][1])))
        key = "-".join(s for s in ("encode", "prefill") if s in stages)
        decision = f"{key}-decode" if key else "decode-only"
        self.decisions[decision] += 1
        request.scratch[DISAGG_DECISION] = (self.handler_name, self.handler_type, decision)
        request.scratch[_STAGES] = stages
        picked = {name: eps for name, (_, eps, _) in stages.items()}
        picked["decode"] = result.endpoints
        return SchedulingResult(result.endpoints, headers=headers, profiles=picked)

    def _maybe_encode(self, request: SchedulingRequest, candidates: Sequence[Endpoint], primary: Endpoint | None,
                      stages: dict[str, tuple[ProfileScheduler, list[Endpoint], dict[str, Any]]]) -> None:
        if self.encode is not None and self.encode_decider is not None \
                and self.encode_decider.disaggregate(request, primary):
            self._run("encode", self.encode, request, candidates, stages)

    @staticmethod
    def _run(stage: str, prof: ProfileScheduler, request: SchedulingRequest, candidates: Sequence[Endpoint],
             stages: dict[str, tuple[ProfileScheduler, list[Endpoint], dict[str, Any]]]) -> None:
        # Each profile sees (and leaves) its own per-request scratch: plugins shared between profiles
        # (one prefix-cache-scorer in both) keep their per-decision values apart for on_routed.
        mine = dict(request.scratch)
        mine.pop(_STAGES, None)
        saved = request.scratch
        request.scratch = mine
        try:
            res = prof.schedule(request, candidates)
        finally:
            request.scratch = saved
        if res.endpoints:
            stages[stage] = (prof, res.endpoints[: 1] if stage == "prefill" else res.endpoints, mine)

    def _each_stage(self, request: SchedulingRequest, hook: str) -> None:
        stages = request.scratch.get(_STAGES)
        if not stages:
            return
        saved = request.scratch
        for prof, eps, scratch in stages.values():
            request.scratch = scratch
            try:
                getattr(prof, hook)(request, eps[0])
            finally:
                request.scratch = saved

    def on_routed(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        """The decode pod learns the prompt (its KV arrives by transfer), so does the prefill pod."""
        self.decode.on_routed(request, endpoint)
        self._each_stage(request, "on_routed")

    def on_finished(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        self.decode.on_finished(request, endpoint)
        self._each_stage(request, "on_finished")
        request.scratch.pop(_STAGES, None)

    def peer_notes(self, request: SchedulingRequest, endpoint: Endpoint) -> dict[str, Any]:
        """The decode profile's notes (the stages' pods are told by their own engines' events)."""
        return self.decode.peer_notes(request, endpoint)

    def apply_peer_notes(self, endpoint: Endpoint, notes: Mapping[str, Any]) -> None:
        self.decode.apply_peer_notes(endpoint, notes)

    def forget(self, address: str) -> None:
        for prof in self.profiles.values():
            prof.forget(address)

    def on_endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for prof in self.profiles.values():
            prof.on_endpoints_changed(added, removed)

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for prof in self.profiles.values():
            out.update(prof.stats())
        return out


@dataclass(frozen=True, slots=True)
class HeadersHandlerParams:
    prefill_profile: str = "prefill"
    encode_profile: str = "encode"


@register("disagg-headers-handler", REQUEST_CONTROL)
class DisaggHeadersHandler:
    """The reference's deprecated PreRequest plugin that wrote the prefill/encode headers; the
    disagg-profile-handler writes them itself, so this one is accepted (with its `prefillProfile`,
    `encodeProfile`) and does nothing."""

    def __init__(self, name: str, params: HeadersHandlerParams, ctx: BuildContext | None) -> None:
        self.name = name
        self.p = params

    @classmethod
    def parse(cls, p: Params) -> HeadersHandlerParams:
        out = HeadersHandlerParams(p.string("prefillProfile", "prefill"), p.string("encodeProfile", "encode"))
        p.done()
        return out


@register("prefill-header-handler", REQUEST_CONTROL)
class PrefillHeaderHandler(DisaggHeadersHandler):
    """Older name of disagg-headers-handler (prefill header only); accepted, does nothing."""

"""`precise-prefix-cache-producer` and `precise-prefix-cache-scorer`: prefix affinity from what the
engines really hold (their KV events), configured as llm-d writes it.

The producer owns a PreciseIndex (epp.kvevents.index) and, when events come over ZMQ, a subscriber
thread (epp.kvevents.subscriber):
- centralized: `kvEventsConfig.zmqEndpoint` (e.g. `tcp://*:5557`) is bound and engines connect; the
  topic `kv@<podIP:port>@<model>` names the endpoint;
- per pod: with `kvEventsConfig.discoverPods` (llm-d's default) and the producer wired as the
  extractor of an `endpoint-notification-source`, each endpoint's publisher is dialed at
  `tcp://<ip>:<podDiscoveryConfig.socketPort + rank>` (rank = the endpoint's port's position in the
  pool's target ports), with `replaySocketPort + rank` for replays when set, and dropped (its blocks
  forgotten) when the endpoint leaves.

Per request it needs the prompt's token ids: `request.scratch["token_ids"]` when a token producer
set them, else its own `tokenizer` (ours: `{backend: local, path: ...}` or `{backend: sim}`); with
neither, it gives no precise scores. Match info per endpoint: leading cached blocks (weighted by
tier, `indexerConfig.backendConfigs`) / the prompt's blocks. `speculativeIndexing` adds the routed
request's blocks to the chosen endpoint, covering the event delay: held while the request is in
flight with `speculativeHoldInFlight` (ours, default false; released by on_finished or the
endpoint's own BlockStored for the block), then for `speculativeTTL` (2 s, from the pick without it).

The producer's match info (`ratios`, what `prefix-cache-scorer` with `prefixMatchInfoProducerName`
reads) keeps the approximate index as the fallback for endpoints that publish no events: those are
scored and recorded as the approximate `prefix-cache-scorer` would, and an endpoint that publishes
gets no approximate credit. The scorer (`precise-prefix-cache-scorer`, llm-d's deprecated
composite) scores with a producer: the one it names (`prefixMatchInfoProducerName`), else the first
precise producer declared, else one of its own built from the same parameters.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from epp.datastore import Endpoint
from epp.kvevents.index import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_ENTRIES_PER_POD,
    DEFAULT_MAX_PODS,
    DEFAULT_SPECULATIVE_TTL,
    PreciseIndex,
)
from epp.kvevents.keys import DEFAULT_BLOCK_TOKENS, RequestKeys
from epp.kvevents.subscriber import KVEventSubscriber
from epp.kvevents.wire import ENGINE_TYPES, TOPIC_PREFIX, VLLM, decode_payload
from epp.producers.token import TokenProducer
from epp.scheduling.cycle import Cycle
from epp.scheduling.framework import SchedulingRequest
from epp.scheduling.registry import PRODUCER, SCORER, BuildContext, ConfigError, Params, register
from epp.tokens import CACHE_SALT, TOKEN_IDS, Tokenizer, messages_of, salt_of

log = logging.getLogger("epp.producers.precise")

DEFAULT_SOCKET_PORT = 5557
DEFAULT_MAX_BLOCKS = 16384  # 256K tokens at 16 a block: matching never reads further
_KEYS = "precise-keys"  # request.scratch: (producer name, RequestKeys)
_HELD = "precise-held"  # request.scratch: (producer name, address) whose speculative entries it holds
_TOTAL = "precise-total-blocks"  # request.scratch: the prompt's blocks when only a prefix's ids are known


@dataclass(frozen=True, slots=True)
class PreciseParams:
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    hash_seed: str = ""
    tier_weights: Mapping[str, float] = field(default_factory=lambda: {"gpu": 1.0, "cpu": 0.8})
    enable_metrics: bool = False
    engine_type: str = VLLM
    zmq_endpoint: str = ""
    topic_filter: str = TOPIC_PREFIX
    discover_pods: bool = True
    socket_port: int = DEFAULT_SOCKET_PORT
    replay_port: int = -1
    speculative: bool = False
    speculative_ttl: float = DEFAULT_SPECULATIVE_TTL
    speculative_hold: bool = False  # ours: entries live while their request is in flight, then the TTL
    max_blocks: int = DEFAULT_MAX_BLOCKS
    max_pods: int = DEFAULT_MAX_PODS
    max_entries_per_pod: int = DEFAULT_MAX_ENTRIES_PER_POD
    max_entries: int = DEFAULT_MAX_ENTRIES
    model_name: str = ""  # the model of per-pod topics that do not name one
    tokenizer: Mapping[str, Any] = field(default_factory=dict)  # ours: {backend: local|sim, path}
    producer: str = ""  # scorer only: prefixMatchInfoProducerName
    rendezvous_on_miss: bool = False  # ours: a prefix no endpoint holds scores 1.0 on its rendezvous home


def _backend_configs(p: Params) -> dict[str, float]:
    raw = p.get("backendConfigs")
    if raw is None:
        return {"gpu": 1.0, "cpu": 0.8}
    if not isinstance(raw, list):
        raise ConfigError(p.field("backendConfigs"), "expected a list of {name, weight}")
    out: dict[str, float] = {}
    for i, item in enumerate(raw):
        ip = Params(item, f"{p.field('backendConfigs')}[{i}]")
        name = ip.string("name", "").lower()
        if not name:
            raise ConfigError(ip.field("name"), "a backend needs a name (gpu, cpu, ...)")
        out[name] = ip.number("weight", 1.0, lo=0)
        ip.done()
    return out


def parse_params(p: Params, *, scorer: bool = False) -> PreciseParams:
    """llm-d's parameters: tokenProcessorConfig, indexerConfig, kvEventsConfig, speculativeIndexing,
    speculativeTTL; plus ours (tokenizer, maxPrefixBlocksToMatch, modelName)."""
    tp = p.sub("tokenProcessorConfig")
    legacy = tp.integer("blockSize", 0, lo=1, hi=4096)
    block = tp.integer("blockSizeTokens", legacy or DEFAULT_BLOCK_TOKENS, lo=1, hi=4096)
    seed = tp.get("hashSeed")
    if seed is not None and not isinstance(seed, str):
        raise ConfigError(tp.field("hashSeed"), f"expected a string, got {seed!r}")
    tp.done()
    ix = p.sub("indexerConfig")
    if ix.has("tokenizersPoolConfig"):
        raise ConfigError(ix.field("tokenizersPoolConfig"), "not supported: configure a token-producer, or this "
                          "plugin's `tokenizer` (local tokenizer files)")
    kb = ix.sub("kvBlockIndexConfig")
    metrics = kb.boolean("enableMetrics", False)
    kb.get("metricsLoggingInterval")
    mem = kb.sub("inMemoryConfig")
    size = mem.integer("size", DEFAULT_MAX_ENTRIES, lo=1)
    per_pod = mem.integer("podCacheSize", DEFAULT_MAX_ENTRIES_PER_POD, lo=1)
    mem.done()
    for other in ("redisConfig", "valkeyConfig", "costAwareMemoryConfig"):
        if kb.has(other):
            raise ConfigError(kb.field(other), "not supported: this picker keeps the index in memory "
                              "(every replica hears every event)")
    kb.done()
    weights = _backend_configs(ix)
    ix.done()
    ev = p.sub("kvEventsConfig")
    zmq_endpoint = ev.get("zmqEndpoint") or ""
    if not isinstance(zmq_endpoint, str) or (zmq_endpoint and not zmq_endpoint.startswith(("tcp://", "ipc://"))):
        raise ConfigError(ev.field("zmqEndpoint"), f"expected tcp://host:port or ipc://path, got {zmq_endpoint!r}")
    topic = ev.get("topicFilter")
    if topic is None:
        topic = TOPIC_PREFIX
    if not isinstance(topic, str):
        raise ConfigError(ev.field("topicFilter"), f"expected a string, got {topic!r}")
    ev.integer("concurrency", 4, lo=1)  # llm-d's worker count: one thread here (ordering per endpoint)
    engine = ev.string("engineType", VLLM, choices=ENGINE_TYPES)
    discover = ev.boolean("discoverPods", True)
    pd = ev.sub("podDiscoveryConfig")
    pd.get("podLabelSelector")  # endpoints come from the pool (the notification source)
    pd.get("podNamespace")
    socket_port = pd.integer("socketPort", DEFAULT_SOCKET_PORT, lo=1, hi=65535)
    replay_port = pd.integer("replaySocketPort", -1, lo=-1, hi=65535)
    pd.done()
    ev.done()
    tok = p.get("tokenizer")
    if tok is not None:
        tk = Params(tok, p.field("tokenizer"))
        backend = tk.string("backend", "local", choices=("local", "sim"))
        path = tk.string("path", "") if backend == "local" else ""
        if backend == "local" and not path:
            raise ConfigError(tk.field("path"), "the local tokenizer needs `path` (a directory with tokenizer.json, "
                              "or a model name in the HF cache)")
        tk.done()
        tok = {"backend": backend, "path": path}
    out = PreciseParams(
        block_tokens=block, hash_seed=seed or "", tier_weights=weights, enable_metrics=metrics, engine_type=engine,
        zmq_endpoint=zmq_endpoint, topic_filter=topic, discover_pods=discover, socket_port=socket_port,
        replay_port=replay_port, speculative=p.boolean("speculativeIndexing", False),
        speculative_ttl=p.duration("speculativeTTL", DEFAULT_SPECULATIVE_TTL),
        speculative_hold=p.boolean("speculativeHoldInFlight", False),
        max_blocks=p.integer("maxPrefixBlocksToMatch", DEFAULT_MAX_BLOCKS, lo=1, hi=1 << 20),
        max_pods=DEFAULT_MAX_PODS, max_entries_per_pod=per_pod, max_entries=size,
        model_name=p.string("modelName", ""), tokenizer=dict(tok or {}),
        rendezvous_on_miss=p.boolean("rendezvousOnMiss", False),
        producer=p.string("prefixMatchInfoProducerName", "") if scorer else "",
    )
    return out


def make_tokenizer(spec: Mapping[str, Any]) -> Tokenizer | None:
    backend = spec.get("backend")
    if backend == "sim":
        from epp.tokens.sim import SimTokenizer
        return SimTokenizer()
    if backend == "local":
        from epp.tokens.local import LocalTokenizer, TokenizerError
        try:
            return LocalTokenizer(str(spec["path"]))
        except TokenizerError as e:
            raise ConfigError("tokenizer.path", str(e)) from None
    return None


def _prompt(request: SchedulingRequest) -> str:
    """The whole completion prompt (request.prompt is cut for the approximate index)."""
    body = request.body
    if isinstance(body, Mapping):
        p = body.get("prompt")
        if isinstance(p, str):
            return p
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            return p[0]
    return request.prompt


@register("precise-prefix-cache-producer", PRODUCER)
class PrecisePrefixCacheProducer:
    """Holds the precise index and its event subscriber (see the module doc)."""

    def __init__(self, name: str, params: PreciseParams, ctx: BuildContext) -> None:
        self.name = name
        self.params = params
        self.kv_index = PreciseIndex(params.block_tokens, params.hash_seed, params.tier_weights,
                                  max_pods=params.max_pods, max_entries_per_pod=params.max_entries_per_pod,
                                  max_entries=params.max_entries, speculative_ttl=params.speculative_ttl,
                                  clock=ctx.clock)
        self.tokenizer: Tokenizer | None = make_tokenizer(params.tokenizer)
        self._plugins = ctx.plugins  # a token-producer declared in the config, found on first use
        self.subscriber: KVEventSubscriber | None = None
        self._lock = threading.Lock()
        self.tokenize_failures = 0
        self.no_tokens = 0
        self.target_ports: Sequence[int] = ()  # the pool's target ports (rank = position), set by the wiring
        # per-pod mode is on only when the config wires this producer to an endpoint-notification-source
        # (llm-d's rule); the wiring sets it, then endpoints seen by observe() are dialed
        self.notifications = False
        from epp.scheduling.prefix import PrefixIndex

        self.fallback = PrefixIndex()  # approximate, for endpoints that publish no events
        self._approx_key = f"precise-approx:{name}"
        self._seen: dict[str, Endpoint] = {}
        self._seen_from: object = None

    @classmethod
    def parse(cls, p: Params) -> PreciseParams:
        out = parse_params(p)
        p.done()
        return out

    # ---- events in -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the subscriber thread (and bind the centralized endpoint, when configured)."""
        with self._lock:
            if self.subscriber is not None:
                return
            self.subscriber = KVEventSubscriber(self.kv_index, engine=self.params.engine_type,
                                                topic_filter=self.params.topic_filter, model=self.params.model_name)
            self.subscriber.start()
        if self.params.zmq_endpoint:
            bound = self.subscriber.bind(self.params.zmq_endpoint)
            if not bound:
                raise RuntimeError(f"kv events: cannot bind {self.params.zmq_endpoint}")
            log.info("kv events: listening on %s (centralized)", bound)

    def stop(self) -> None:
        if self.subscriber is not None:
            self.subscriber.stop()
            self.subscriber = None

    def observe(self, endpoints: Sequence[Endpoint]) -> None:
        """Called with each request's candidates: starts the subscriber on first use (centralized
        mode binds then) and, in per-pod mode, dials endpoints not seen before. Cheap when the
        candidate sequence is the one seen last (the datastore rebuilds it only on change)."""
        if endpoints is self._seen_from:
            return
        self._seen_from = endpoints
        if self.subscriber is None and self.params.zmq_endpoint:
            self.start()
        if not (self.notifications and self.params.discover_pods):
            return
        for ep in endpoints:
            if ep.address not in self._seen:
                self._seen[ep.address] = ep
                self.endpoint_added(ep, endpoints)
        if len(self._seen) > 4 * self.kv_index.max_pods:  # bounded; removals come through endpoint_removed
            self._seen.clear()

    def rank_of(self, ep: Endpoint, endpoints: Sequence[Endpoint] = ()) -> int:
        """The endpoint's data-parallel rank: its port's position in the pool's target ports, or
        among the ports of the same pod's endpoints when those are not known."""
        ports = list(self.target_ports) or sorted({e.port for e in endpoints if e.ip == ep.ip} | {ep.port})
        return ports.index(ep.port) if ep.port in ports else 0

    def endpoint_added(self, ep: Endpoint, endpoints: Sequence[Endpoint] = ()) -> None:
        """Per-pod mode: dial the endpoint's publisher (socketPort + rank)."""
        if not self.params.discover_pods:
            return
        self.start()
        assert self.subscriber is not None
        rank = self.rank_of(ep, endpoints)
        replay = ""
        if self.params.replay_port > 0:
            replay = f"tcp://{_host(ep.ip)}:{self.params.replay_port + rank}"
        self.subscriber.add_source(ep.address, f"tcp://{_host(ep.ip)}:{self.params.socket_port + rank}", replay)

    def endpoint_removed(self, ep: Endpoint | str) -> None:
        """The endpoint left the pool: stop listening to it and forget its blocks."""
        address = ep if isinstance(ep, str) else ep.address
        self._seen.pop(address, None)
        self.fallback.forget(address)
        if self.subscriber is not None and self.params.discover_pods:
            self.subscriber.remove_source(address)
        else:
            self.kv_index.forget(address)

    def feed(self, address: str, model: str, payload: bytes) -> None:
        """Apply one message's payload from `address` (the discrete-event simulator's delivery)."""
        self.kv_index.apply(address, model, decode_payload(payload, self.params.engine_type))

    # ---- per request ---------------------------------------------------------------------
    def keys(self, request: SchedulingRequest) -> RequestKeys | None:
        """The request's block keys (made once per request), or None without token ids."""
        got = request.scratch.get(_KEYS)
        if got is not None and got[0] == self.name:
            return got[1]  # type: ignore[no-any-return]
        ids = request.scratch.get(TOKEN_IDS)
        self.token_source()
        whole = True
        if ids is None and self.tokenizer is not None:
            try:
                by_request = getattr(self.tokenizer, "ids_for_request", None)
                if by_request is not None:  # a token-producer: may only know a prefix (background renders)
                    ids, whole = by_request(request.model, request.body, _prompt(request), messages_of(request.body))
                else:
                    ids = self.tokenizer.ids_for(_prompt(request), messages_of(request.body))
            except ValueError as e:  # the tokenizer's own errors (a template that raised, ...)
                self.tokenize_failures += 1
                if self.tokenize_failures == 1:
                    log.warning("precise prefix: tokenizing failed (%s); such requests get no precise score", e)
                ids = None
            if ids is not None:
                request.scratch[TOKEN_IDS] = ids
        if not ids:
            self.no_tokens += 1
            request.scratch[_KEYS] = (self.name, None)
            return None
        salt = request.scratch.get(CACHE_SALT) or salt_of(request.body)
        keys = self.kv_index.request_keys(ids, request.model, self.params.max_blocks, salt)
        if not whole:  # ids of a prefix only: the share is of the whole prompt's estimated blocks
            est = len(request.prompt.encode("utf-8", "surrogatepass")) // 4 // self.params.block_tokens
            request.scratch[_TOTAL] = max(keys.count, min(est, self.params.max_blocks))
        request.scratch[_KEYS] = (self.name, keys)
        return keys

    def token_source(self) -> Tokenizer | None:
        """This producer's tokenizer: its own, else the config's token-producer (not `estimate`),
        found on first use."""
        if self.tokenizer is None and self._plugins:
            self.tokenizer = next((p for p in self._plugins.values()
                                   if isinstance(p, TokenProducer) and p.params.backend != "estimate"), None)
            self._plugins = {}
        return self.tokenizer

    def precise_ratios(self, request: SchedulingRequest, endpoints: Sequence[Endpoint]) -> list[float] | None:
        """Per endpoint: weighted leading cached blocks / the prompt's blocks; None without tokens."""
        keys = self.keys(request)
        if keys is None or not keys.count:
            return None
        matched = self.kv_index.match(keys, [ep.address for ep in endpoints])
        total = float(request.scratch.get(_TOTAL, keys.count))
        return [m / total for m in matched]

    def _approx_blocks(self, request: SchedulingRequest) -> Any:
        from epp.scheduling.prefix import DEFAULT_MAX_BLOCKS as APPROX_MAX_BLOCKS
        from epp.scheduling.prefix import PromptBlocks

        got = request.scratch.get(self._approx_key)
        if got is None:
            got = PromptBlocks(request.prompt, request.model, 64, APPROX_MAX_BLOCKS)
            request.scratch[self._approx_key] = got
        return got

    def ratios(self, request: SchedulingRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        """Match info per endpoint (0..1): precise for endpoints that publish events, the approximate
        index's for the others (an endpoint that publishes gets no approximate credit)."""
        self.observe(endpoints)
        precise = self.precise_ratios(request, endpoints)
        publishing = [self.kv_index.publishes(ep.address) for ep in endpoints]
        if all(publishing):
            out = precise if precise is not None else [0.0] * len(endpoints)
        else:
            blocks = self._approx_blocks(request)
            approx = (self.fallback.match(blocks, endpoints, 1.0 / blocks.count) if blocks.count
                      else [0.0] * len(endpoints))
            out = [(precise[i] if precise is not None else 0.0) if pub else approx[i]
                   for i, pub in enumerate(publishing)]
        if self.params.rendezvous_on_miss and precise is not None and not any(out):
            self._home(request, endpoints, out)
        return out

    def _home(self, request: SchedulingRequest, endpoints: Sequence[Endpoint], out: list[float]) -> None:
        """A prefix no endpoint holds (nor speculatively): 1.0 for its rendezvous home (the highest
        hash of its first blocks' key among endpoints within 1.25× the mean load), so every replica
        sends a new prefix to the same endpoint before any event can tell them where it went."""
        from epp.scheduling.prefix import DEFAULT_RENDEZVOUS_BLOCKS, DEFAULT_RENDEZVOUS_EPSILON, rendezvous_home

        keys = self.keys(request)
        if keys is None or not keys.count:
            return
        k = min(DEFAULT_RENDEZVOUS_BLOCKS, keys.count)
        loads = [max(ep.metrics.waiting + ep.metrics.running, ep.inflight) if ep.metrics is not None
                 else float(ep.inflight) for ep in endpoints]
        home = rendezvous_home(keys.upto(k)[k - 1], endpoints, loads, DEFAULT_RENDEZVOUS_EPSILON)
        if home >= 0:
            out[home] = 1.0

    def on_routed(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        if not self.kv_index.publishes(endpoint.address):
            blocks = self._approx_blocks(request)
            if blocks.count:
                self.fallback.insert(endpoint.address, blocks, 31250)
        if not self.params.speculative:
            return
        keys = self.keys(request)
        if keys is not None and keys.count:
            hold = self.params.speculative_hold
            self.kv_index.speculate(endpoint.address, keys, hold=hold)
            if hold:
                request.scratch[_HELD] = (self.name, endpoint.address)

    def peer_note(self, request: SchedulingRequest, endpoint: Endpoint) -> Any:
        """For active-active peers (epp.peers): this request's block keys (what this replica just
        speculated), so every replica holds the same speculative entries before any engine event."""
        if not self.params.speculative:
            return None
        keys = self.keys(request)
        return keys.all()[: self.kv_index.max_speculative] if keys is not None and keys.count else None

    def peer_apply(self, endpoint: Endpoint, note: Any) -> None:
        """A peer routed a request with these block keys to `endpoint`: speculate them here too."""
        if self.params.speculative and isinstance(note, list) and note:
            self.kv_index.speculate(endpoint.address, [int(k) for k in note])

    def on_finished(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        """The request finished (or was abandoned): its speculative entries start their TTL."""
        held = request.scratch.pop(_HELD, None)
        if held is None or held[0] != self.name:
            return
        got = request.scratch.get(_KEYS)
        if got is not None and got[0] == self.name and got[1] is not None:
            self.kv_index.release(held[1], got[1])

    def on_endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        """Datastore listener: endpoints that left are forgotten (and no longer listened to)."""
        for ep in removed:
            self.endpoint_removed(ep)

    def stats(self) -> dict[str, float]:
        st = self.kv_index.stats
        out = {
            "precise_index_entries": float(self.kv_index.entries),
            "precise_index_keys": float(self.kv_index.keys_held()),
            "precise_speculative_entries": float(self.kv_index.speculative_entries),
            "precise_speculative_expired": float(st.speculative_expired),
            "precise_speculative_expired_unconfirmed": float(st.speculative_expired_unconfirmed),
            "precise_stored_blocks": float(st.stored_blocks),
            "precise_removed_blocks": float(st.removed_blocks),
            "precise_lookup_hit_ratio": st.lookup_hit_blocks / st.lookup_blocks if st.lookup_blocks else 0.0,
        }
        if self.subscriber is not None:
            out["precise_event_gaps"] = float(self.subscriber.stats.gaps)
            out["precise_event_messages"] = float(self.subscriber.stats.messages)
        return out


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip and not ip.startswith("[") else ip


@register("precise-prefix-cache-scorer", SCORER)
class PrecisePrefixCacheScorer:
    """llm-d's composite: a prefix-cache-scorer bound to a precise producer (see the module doc)."""

    BOUNDED = True

    def __init__(self, name: str, params: PreciseParams, ctx: BuildContext) -> None:
        self.name = name
        self._scores_key = f"prefix-scores:{name}"
        found = ctx.plugins.get(params.producer) if params.producer else next(
            (p for p in ctx.plugins.values() if isinstance(p, PrecisePrefixCacheProducer)), None)
        if params.producer and not isinstance(found, PrecisePrefixCacheProducer):
            raise ConfigError("prefixMatchInfoProducerName",
                              f"{params.producer!r} is not a precise-prefix-cache-producer")
        self.producer: PrecisePrefixCacheProducer = (
            found if isinstance(found, PrecisePrefixCacheProducer) else PrecisePrefixCacheProducer(name, params, ctx))

    @classmethod
    def parse(cls, p: Params) -> PreciseParams:
        out = parse_params(p, scorer=True)
        p.done()
        return out

    def score(self, cycle: Cycle, endpoints: Sequence[Endpoint]) -> list[float]:
        out = self.producer.ratios(cycle.request, endpoints)
        # what prefix-cache-scorer leaves for later plugins (no-hit-lru-scorer tells cold requests by it)
        cycle.request.scratch[self._scores_key] = (endpoints, out)
        return out

    def on_routed(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        self.producer.on_routed(request, endpoint)

    def on_finished(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        self.producer.on_finished(request, endpoint)

    def peer_note(self, request: SchedulingRequest, endpoint: Endpoint) -> Any:
        return self.producer.peer_note(request, endpoint)

    def peer_apply(self, endpoint: Endpoint, note: Any) -> None:
        self.producer.peer_apply(endpoint, note)

    def forget(self, address: str) -> None:
        self.producer.endpoint_removed(address)

    def stats(self) -> dict[str, float]:
        return self.producer.stats()


def find_producers(scheduler: Any) -> list[PrecisePrefixCacheProducer]:
    """The precise producers a built scheduler's plugins read (through prefix-cache-scorer's match
    source or the composite scorer), however its profiles nest (P/D, data-parallel handlers)."""
    found: dict[int, PrecisePrefixCacheProducer] = {}
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> None:
        if obj is None or depth > 4 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, PrecisePrefixCacheProducer):
            found[id(obj)] = obj
            return
        if isinstance(obj, Mapping):
            for v in obj.values():
                walk(v, depth + 1)
            return
        if isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth + 1)
            return
        for attr in ("producers", "scorers", "scorer", "match_source", "producer", "profiles", "profile",
                     "inner", "decode", "prefill"):
            walk(getattr(obj, attr, None), depth + 1)

    walk(scheduler, 0)
    return list(found.values())


def find_preparers(scheduler: Any) -> list[TokenProducer]:
    """The token producers a built scheduler's precise producers read that must await the engine's
    render before scheduling (the Director's preparers); empty when none renders (no cost then)."""
    out: dict[int, TokenProducer] = {}
    for prod in find_producers(scheduler):
        src = prod.token_source()
        if isinstance(src, TokenProducer) and src.renders:
            out[id(src)] = src
    return list(out.values())


def wire(producers: Sequence[PrecisePrefixCacheProducer], data_layer: Any, specs: Any) -> None:
    """Per-pod mode for producers wired as extractors of an endpoint-notification-source (llm-d's
    rule): `data_layer.sources` is ((source name, (extractor names...)), ...); `specs` the plugins."""
    types = {s.name: s.type for s in specs}
    wired = {ext for src, exts in getattr(data_layer, "sources", ()) if types.get(src) == "endpoint-notification-source"
             for ext in exts}
    for p in producers:
        if p.name in wired:
            p.notifications = True

"""Prefill/decode disaggregation in the simulator: the KV handoff as vLLM's NIXL connector shows it
to a router, live (SimServer) and in the discrete-event mode (PDCluster).

A prefill request carries `kv_transfer_params: {do_remote_decode: true, ...}` (and one output token):
the server runs it as usual and answers with `kv_transfer_params: {do_remote_prefill: true,
do_remote_decode: false, remote_engine_id, remote_block_ids, remote_host, remote_port, tp_size}`.
A decode request carrying those params skips the prefill it would otherwise do: the blocks named
arrive by transfer, costing `base_ms + ms_per_token x tokens` (simulated) before the sequence is
queued, and only the prompt's last partial block is computed locally. The transferred blocks land
in the decode pod's prefix cache, as vLLM registers them. In the discrete-event mode the prefill
pod keeps the prompt's blocks in use until the transfer ends (vLLM frees them once pulled).

Defaults: a Llama-3.1-8B token's KV is 128 KiB (see epp.sim.config); over a 200 Gb/s RDMA link
(~25 GB/s) that is ~5 µs a token (`ms_per_token` 0.005), plus ~1 ms to set the transfer up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from epp.datastore import Endpoint
from epp.sim.config import EngineConfig
from epp.sim.des import Cluster, RequestResult, SimRequest
from epp.sim.tokens import block_hashes

PREFILL, DECODE, BOTH = "prefill", "decode", "both"


@dataclass(frozen=True, slots=True)
class TransferCost:
    """KV transfer time between a prefill and a decode pod (simulated milliseconds)."""

    base_ms: float = 1.0
    ms_per_token: float = 0.005

    def seconds(self, tokens: int) -> float:
        return 0.0 if tokens <= 0 else (self.base_ms + self.ms_per_token * tokens) / 1000.0


def prefill_request_params() -> dict[str, Any]:
    """What a sidecar sends the prefill pod (vLLM NIXL connector, protocol.md §12)."""
    return {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None}


def is_prefill_request(params: object) -> bool:
    return isinstance(params, Mapping) and params.get("do_remote_decode") is True


def prefill_response_params(engine_id: str, prompt_tokens: int, block_size: int, host: str,
                            port: int) -> dict[str, Any]:
    """What the prefill pod answers: the prompt's full blocks, ready to be pulled."""
    full = prompt_tokens // block_size
    return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": engine_id,
            "remote_block_ids": list(range(full)), "remote_host": host, "remote_port": port, "tp_size": 1}


def remote_tokens(params: object, block_size: int, prompt_tokens: int) -> int:
    """Prompt tokens whose KV a decode request brings from a prefill pod (0: none / not P/D).
    Bounded by the prompt; malformed params count as none (the engine then prefills itself)."""
    if not isinstance(params, Mapping) or params.get("do_remote_prefill") is not True:
        return 0
    ids = params.get("remote_block_ids")
    if not isinstance(ids, list):
        return 0
    return min(len(ids) * block_size, prompt_tokens)


# ---- discrete-event mode ----------------------------------------------------------------------
@dataclass(slots=True)
class PDResult:
    """One client request through P/D (virtual seconds): first token and end from the decode leg."""

    request_id: str
    arrival: float
    disaggregated: bool
    prefill_server: int = -1
    decode_server: int = -1
    first_token: float | None = None
    finished: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # local prefix-cache hits on the decode pod
    transfer_tokens: int = 0
    status: int = 200
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def ttft(self) -> float:
        return (self.first_token if self.first_token is not None else self.arrival) - self.arrival

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first (0 for one-token answers)."""
        if self.first_token is None or self.finished is None or self.output_tokens < 2:
            return 0.0
        return (self.finished - self.first_token) / (self.output_tokens - 1)


@dataclass(slots=True)
class _Leg:
    """Per-request routing state carried in SimRequest.data between the two legs."""

    original: SimRequest
    arrival: float
    prefill: int = -1
    decode: int = -1
    prefill_req: SimRequest | None = None  # the prefill leg's request (one output token)
    prefill_result: RequestResult | None = None


Chooser = Any  # callable (SimRequest, Sequence[Endpoint]) -> (decode index, prefill index or None)


class PDPolicy:
    """Routes each request: `choose_pd(request, endpoints)` answers (decode index, prefill index or
    None); with a prefill index the request first runs there with one output token, then (after the
    transfer) on the decode server with the prefill's blocks. Results are merged per request."""

    def __init__(self, choose_pd: Chooser, transfer: TransferCost | None = None,
                 on_finished: Any = None) -> None:
        self.choose_pd = choose_pd
        self.transfer = transfer or TransferCost()
        self.on_finished = on_finished  # called (request, decode index, prefill index) at the end
        self.cluster: Cluster | None = None
        self.results: list[PDResult] = []

    def bind(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def choose(self, request: SimRequest, servers: Sequence[Endpoint]) -> int | None:
        decode, prefill = self.choose_pd(request, servers)
        leg = _Leg(request, self._now(), prefill=-1 if prefill is None else prefill, decode=decode)
        if prefill is None:
            self._dispatch_later(replace(request, data=leg), decode)
        else:
            leg.prefill_req = replace(request, max_tokens=1, data=leg, remote_tokens=0)
            self._dispatch_later(leg.prefill_req, prefill)
        return None  # held: dispatched by the call above, at this same instant

    def _now(self) -> float:
        assert self.cluster is not None
        return self.cluster.now

    def _dispatch_later(self, req: SimRequest, idx: int) -> None:
        assert self.cluster is not None
        cluster = self.cluster
        at = cluster.now
        cluster.call_at(at, cluster.dispatch, req, idx, at)

    def on_complete(self, res: RequestResult) -> None:
        req = res.request
        leg = req.data if req is not None else None
        if not isinstance(leg, _Leg):
            return
        cluster = self.cluster
        assert cluster is not None
        if req is leg.prefill_req:
            if not res.ok:  # the prefill failed: the client gets its error
                self._finish(leg, res)
                return
            leg.prefill_result = res  # hand the KV to the decode server after the transfer
            block = cluster.servers[leg.decode].engine.cfg.block_size
            tokens = (res.prompt_tokens // block) * block
            decode_req = replace(leg.original, data=leg, remote_tokens=tokens)
            held = self._hold_blocks(cluster.servers[leg.prefill].engine, leg.original)
            cluster.hold()
            at = cluster.now + self.transfer.seconds(tokens)

            def pulled() -> None:
                cluster.servers[leg.prefill].engine.kv.release(held)  # the decode pod has the KV now
                cluster.dispatch(decode_req, leg.decode, cluster.now)

            cluster.call_at(at, pulled)
            return
        self._finish(leg, res)

    @staticmethod
    def _hold_blocks(engine: Any, req: SimRequest) -> list[int]:
        """Pin the prompt's blocks on the prefill engine until the decode pod has pulled them (vLLM's
        NIXL connector frees them only then): they stay used, not merely cached."""
        cfg = engine.cfg
        hashes = block_hashes(req.prompt, cfg.block_size, req.model or cfg.model, cfg.chars_per_token)
        held, _ = engine.kv.match(hashes, len(hashes))
        engine.kv.take(held)
        return held

    def _finish(self, leg: _Leg, decode: RequestResult) -> None:
        disagg = leg.prefill >= 0
        req = decode.request
        out = PDResult(
            request_id=leg.original.request_id, arrival=leg.arrival, disaggregated=disagg,
            prefill_server=leg.prefill, decode_server=decode.server if decode.server >= 0 else leg.decode,
            first_token=decode.first_token, finished=decode.finished, prompt_tokens=decode.prompt_tokens,
            output_tokens=decode.output_tokens, cached_tokens=decode.cached_tokens,
            transfer_tokens=req.remote_tokens if req is not None else 0,
            status=decode.status, error=decode.error)
        self.results.append(out)
        if self.on_finished is not None:
            self.on_finished(leg.original, leg.decode, leg.prefill)


def pd_cluster(roles: Sequence[str], choose_pd: Chooser, *, engine: EngineConfig | None = None,
               transfer: TransferCost | None = None, seed: int = 0, poll_interval: float | None = 0.05,
               on_finished: Any = None) -> tuple[Cluster, PDPolicy]:
    """A discrete-event cluster whose server i has role `roles[i]` (prefill, decode or both: the
    endpoint's `role`, as the pod label), routed by a PDPolicy."""
    policy = PDPolicy(choose_pd, transfer, on_finished)
    cfg = engine or EngineConfig()
    cluster = Cluster([cfg] * len(roles), policy, seed=seed, poll_interval=poll_interval)
    for server, role in zip(cluster.servers, roles, strict=True):
        server.endpoint.role = "" if role == BOTH else role
        server.endpoint.labels = {**server.endpoint.labels, "llm-d.ai/role": role}
    return cluster, policy


def run_pd(cluster: Cluster, policy: PDPolicy, workload: Iterable[tuple[float, SimRequest]]) -> list[PDResult]:
    """Run a workload to the end; one PDResult per request, in completion order."""
    cluster.run(workload)
    return policy.results


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def summarize_pd(results: Sequence[PDResult]) -> dict[str, Any]:
    """TTFT and TPOT p50/p90 (s), output tokens/s, share disaggregated, errors."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [r.tpot for r in ok if r.output_tokens >= 2]
    span = (max(r.finished or 0.0 for r in ok) - min(r.arrival for r in ok)) if ok else 0.0
    out: dict[str, Any] = {"requests": len(results), "errors": len(results) - len(ok),
                           "disaggregated": sum(r.disaggregated for r in ok) / len(ok) if ok else 0.0}
    for q in (0.5, 0.9):
        out[f"ttft_p{round(q * 100)}"] = _pct(ttft, q)
        out[f"tpot_p{round(q * 100)}"] = _pct(tpot, q)
    out["output_tokens_per_s"] = sum(r.output_tokens for r in ok) / span if span > 0 else 0.0
    out["makespan"] = span
    return out


__all__ = ["BOTH", "DECODE", "PREFILL", "PDPolicy", "PDResult", "TransferCost", "is_prefill_request",
           "pd_cluster", "prefill_request_params", "prefill_response_params", "remote_tokens", "run_pd",
           "summarize_pd"]

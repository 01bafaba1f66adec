"""`python -m epp.sim`: run one or more simulated model servers until SIGINT/SIGTERM.

Prints one line per server once it listens, for scripts and tests to read:
`SIM READY name=<name> url=http://<host>:<port>`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from epp.sim.config import DEFAULT_MODEL, EngineConfig, Faults
from epp.sim.server import SimServerConfig, serve_many


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    d = EngineConfig()
    p = argparse.ArgumentParser(prog="python -m epp.sim", description="Simulated vLLM/SGLang model server.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="listen port (0: from the OS)")
    p.add_argument("--count", type=int, default=1,
                   help="servers to start in this process, on consecutive ports (or all from the OS with 0)")
    p.add_argument("--name", default="", help="x-sim-server name (with --count: a prefix, -<i> appended)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--lora", type=_csv, default=(), help="comma-separated adapter names")
    p.add_argument("--max-loras", type=int, default=d.max_loras)
    p.add_argument("--lora-load-ms", type=float, default=d.lora_load_ms)
    p.add_argument("--engine", choices=("vllm", "sglang"), default="vllm", help="metric names to export")
    p.add_argument("--time-scale", type=float, default=1.0, help="wall seconds per simulated second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--num-gpu-blocks", type=int, default=d.num_gpu_blocks)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--step-base-ms", type=float, default=d.step_base_ms)
    p.add_argument("--decode-ms-per-seq", type=float, default=d.decode_ms_per_seq)
    p.add_argument("--attn-ms-per-kv-token", type=float, default=d.attn_ms_per_kv_token)
    p.add_argument("--prefill-ms-per-token", type=float, default=d.prefill_ms_per_token)
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    p.add_argument("--max-tokens-cap", type=int, default=d.max_tokens_cap)
    k = p.add_argument_group("KV events (vLLM's --kv-events-config, wire format of epp.sim.kvevents)")
    k.add_argument("--kv-events-endpoint", default="",
                   help="ZMQ PUB endpoint: bound when it has `*` (with --count, server i binds port + i: its "
                        "data-parallel rank), else connected (a picker's centralized endpoint)")
    k.add_argument("--kv-events-replay-endpoint", default="", help="ROUTER replay endpoint (bound; port + i too)")
    k.add_argument("--kv-events-topic", default="", help="topic (default llm-d's kv@<host:port>@<model>)")
    f = p.add_argument_group("fault injection")
    f.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests answered with an error")
    f.add_argument("--error-status", type=int, default=500)
    f.add_argument("--extra-latency-ms", type=float, default=0.0, help="simulated ms before queueing")
    f.add_argument("--die-after-chunks", type=int, default=-1,
                   help="drop connections after K stream chunks (non-streaming: before the body)")
    f.add_argument("--unhealthy", action="store_true", help="/health answers 503")
    f.add_argument("--log-level", default="WARNING")
    return p


def _plus(endpoint: str, i: int) -> str:
    """`tcp://host:port` with port + i ("" stays "")."""
    if not endpoint or i == 0:
        return endpoint
    head, _, port = endpoint.rpartition(":")
    return f"{head}:{int(port) + i}"


def configs_from_args(args: argparse.Namespace) -> list[SimServerConfig]:
    """One server config per `--count`, validated."""
    if args.count < 1:
        raise ValueError("--count must be >= 1")
    out = []
    for i in range(args.count):
        engine = EngineConfig(
            model=args.model, loras=args.lora, max_loras=args.max_loras, lora_load_ms=args.lora_load_ms,
            block_size=args.block_size, num_gpu_blocks=args.num_gpu_blocks, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
            step_base_ms=args.step_base_ms, decode_ms_per_seq=args.decode_ms_per_seq,
            attn_ms_per_kv_token=args.attn_ms_per_kv_token, prefill_ms_per_token=args.prefill_ms_per_token,
            default_max_tokens=args.default_max_tokens, max_tokens_cap=args.max_tokens_cap)
        engine.validate()
        faults = Faults(error_rate=args.error_rate, error_status=args.error_status,
                        extra_latency_ms=args.extra_latency_ms, die_after_chunks=args.die_after_chunks,
                        unhealthy=args.unhealthy)
        faults.update({})  # validates
        name = args.name if args.count == 1 else (f"{args.name or 'sim'}-{i}")
        port = args.port + i if args.port else 0
        kv, replay = args.kv_events_endpoint, args.kv_events_replay_endpoint
        if args.count > 1 and "*" in kv:  # one publisher per rank, on consecutive ports (as vLLM's DP ranks)
            kv, replay = _plus(kv, i), _plus(replay, i)
        out.append(SimServerConfig(host=args.host, port=port, name=name, engine_kind=args.engine,
                                   time_scale=args.time_scale, seed=args.seed + i, engine=engine, faults=faults,
                                   kv_events_endpoint=kv, kv_events_replay=replay, kv_events_topic=args.kv_events_topic,
                                   data_parallel_rank=i if args.count > 1 and kv else None))
    return out


async def _run(configs: Sequence[SimServerConfig]) -> None:
    servers = await serve_many(configs)
    for s in servers:
        print(f"SIM READY name={s.name} url={s.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for s in servers:
            await s.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        configs = configs_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        asyncio.run(_run(configs))
    except OSError as e:
        print(f"epp.sim: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

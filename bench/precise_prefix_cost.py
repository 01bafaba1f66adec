"""What precise prefix routing costs the picker: event ingestion, lookups, tokenizing, memory.

    .venv/bin/python bench/precise_prefix_cost.py            # everything (~2 min)
    .venv/bin/python bench/precise_prefix_cost.py --quick    # smaller figures (~20 s)
    sections: --only ingest zmq lookup tokenize rss

- ingest: block events one core decodes and indexes per second (vLLM-shaped messages from 64
  endpoints: a BlockStored of 32 blocks × 16 tokens with its parent, then a BlockRemoved of 32
  earlier blocks), through epp.kvevents.wire.decode_payload + PreciseIndex.apply; goal ≥ 200 k/s.
- zmq: the same through real sockets on loopback (the simulator's publisher, the subscriber
  thread), and how long one message takes from publish to the index (median and p99 of 200).
- lookup: one request's keys and match against 64 endpoints at 8 k and 128 k prompt tokens, cold
  (nobody holds it) and hot (one endpoint holds all of it).
- tokenize: a BPE tokenizer trained here (tokenizers, 8 k vocabulary) with a chat template through
  LocalTokenizer: µs per KB of prompt, and per turn of a conversation growing to 64 KB with and
  without the prefix token cache.
- rss: resident memory of an index holding 64 endpoints × 100 k blocks.
Prints a table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epp.kvevents.index import PreciseIndex  # noqa: E402
from epp.kvevents.keys import RequestKeys  # noqa: E402
from epp.kvevents.wire import decode_payload, encode_payload, encode_removed, encode_stored  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def messages(pods: int, per_pod: int, blocks: int = 32, bs: int = 16, seed: int = 0) -> list[tuple[str, bytes]]:
    """Per pod a chain of stores (each message: a store of `blocks` blocks, and from the second one
    on a removal of the previous message's blocks), interleaved across pods."""
    rng = random.Random(seed)
    out: list[tuple[str, list[bytes]]] = []
    for p in range(pods):
        msgs = []
        parent = None
        prev: list[int] = []
        for _ in range(per_pod):
            hs = [rng.getrandbits(64) for _ in range(blocks)]
            toks = [rng.randrange(128000) for _ in range(blocks * bs)]
            evs = [encode_stored(hs, parent, toks, bs)]
            if prev:
                evs.append(encode_removed(prev))
            msgs.append(encode_payload(evs, 0.0))
            parent, prev = hs[-1], hs
        out.append((f"10.0.{p // 250}.{p % 250 + 1}:8000", msgs))
    inter: list[tuple[str, bytes]] = []
    for i in range(per_pod):
        for addr, msgs in out:
            inter.append((addr, msgs[i]))
    return inter


def bench_ingest(quick: bool) -> dict[str, float]:
    msgs = messages(64, 20 if quick else 60)
    idx = PreciseIndex()
    gc.collect()
    t0 = time.process_time()
    blocks = 0
    for addr, payload in msgs:
        b = decode_payload(payload)
        idx.apply(addr, "m", b)
    dt = time.process_time() - t0
    st = idx.stats
    blocks = st.stored_blocks + st.removed_blocks
    return {"ingest_block_events_per_s": blocks / dt, "ingest_messages_per_s": len(msgs) / dt,
            "ingest_blocks": float(blocks)}


def bench_zmq(quick: bool) -> dict[str, float]:
    from epp.kvevents.subscriber import KVEventSubscriber
    from epp.sim.kvevents import ZmqPublisher, topic_for

    idx = PreciseIndex()
    sub = KVEventSubscriber(idx, model="m")
    pub = ZmqPublisher("tcp://127.0.0.1:0", topic_for("127.0.0.1:8000", "m"))
    sub.add_source("127.0.0.1:8000", pub.endpoint)
    try:
        for _ in range(500):  # slow joiner
            pub.publish([encode_stored([1], None, [1] * 16, 16)])
            if idx.size_of("127.0.0.1:8000"):
                break
            time.sleep(0.01)
        rng = random.Random(2)
        # latency: one message at a time, publish -> visible in the index
        lat = []
        parent = None
        for _ in range(200):
            hs = [rng.getrandbits(64) for _ in range(4)]
            before = idx.stats.batches
            t = time.perf_counter()
            pub.publish([encode_stored(hs, parent, [rng.randrange(1000) for _ in range(64)], 16)])
            for _ in range(100_000):
                if idx.stats.batches > before:
                    break
                time.sleep(0.00005)
            lat.append(time.perf_counter() - t)
            parent = hs[-1]
        # throughput: a burst of messages from one publisher thread (same core pair)
        n = 2000 if quick else 6000
        payloads = [m for _, m in messages(1, n, seed=3)]
        start_blocks = idx.stats.stored_blocks + idx.stats.removed_blocks
        t = time.perf_counter()
        for p in payloads:
            with pub._lock:
                pub._pub.send_multipart([pub.topic.encode(), pub.seq.to_bytes(8, "big"), p])
                pub.seq += 1
        target = start_blocks + sum(32 if i == 0 else 64 for i in range(n))
        for _ in range(200_000):
            if idx.stats.stored_blocks + idx.stats.removed_blocks >= target:
                break
            time.sleep(0.0005)
        dt = time.perf_counter() - t
        got = idx.stats.stored_blocks + idx.stats.removed_blocks - start_blocks
        lat.sort()
        return {"zmq_block_events_per_s": got / dt, "zmq_latency_p50_ms": statistics.median(lat) * 1000,
                "zmq_latency_p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000, "zmq_gaps": float(sub.stats.gaps)}
    finally:
        sub.stop()
        pub.close()


def bench_lookup(quick: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    rng = random.Random(4)
    for tokens in (8192, 131072):
        idx = PreciseIndex()
        ids = [rng.randrange(128000) for _ in range(tokens)]
        nb = tokens // 16
        hs = list(range(1, nb + 1))
        for s in range(0, nb, 512):
            idx.apply("10.0.0.1:8000", "m", decode_payload(encode_payload(
                [encode_stored(hs[s:s + 512], hs[s - 1] if s else None, ids[s * 16:(s + 512) * 16], 16)], 0.0)))
        for p in range(2, 65):  # 63 others holding other things
            idx.apply(f"10.0.0.{p}:8000", "m", decode_payload(encode_payload(
                [encode_stored([10**6 + p], None, [p] * 16, 16)], 0.0)))
        addrs = [f"10.0.0.{p}:8000" for p in range(1, 65)]
        reps = 20 if tokens > 10000 else 200
        for label, req in (("hot", ids), ("cold", [7, *ids[1:]])):
            t = time.perf_counter()
            for _ in range(reps):
                m = idx.match(RequestKeys(req, "m"), addrs)
            dt = (time.perf_counter() - t) / reps
            assert (m[0] == nb) == (label == "hot")
            out[f"lookup_{tokens // 1024}k_{label}_us"] = dt * 1e6
        t = time.perf_counter()
        for _ in range(reps):
            RequestKeys(ids, "m").all()
        out[f"keys_{tokens // 1024}k_us"] = (time.perf_counter() - t) / reps * 1e6
    return out


TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] }}<|eot_id|>\n{% endfor %}{% if add_generation_prompt %}"
            "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def make_tokenizer_dir(path: Path, seed: int = 5) -> Path:
    """A BPE tokenizer (byte-level, 8k vocabulary) trained on generated text, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from epp.sim.workload import random_text

    rng = random.Random(seed)
    corpus = [random_text(rng, 2000) for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|begin_of_text|>", "<|start_header_id|>",
                                                                   "<|end_header_id|>", "<|eot_id|>"])
    tok.train_from_iterator(corpus, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "chat_template": TEMPLATE,
                                                            "add_bos_token": True}))
    return path


def bench_tokenize(quick: bool) -> dict[str, float]:
    from epp.sim.workload import random_text
    from epp.tokens.local import LocalTokenizer

    with tempfile.TemporaryDirectory() as d:
        make_tokenizer_dir(Path(d))
        plain = LocalTokenizer(d, prefix_cache=False)
        cached = LocalTokenizer(d)
        rng = random.Random(6)
        text = random_text(rng, 64 * 1024)
        t = time.perf_counter()
        reps = 5 if quick else 20
        for _ in range(reps):
            plain.encode(text)
        per_kb = (time.perf_counter() - t) / reps / 64 * 1e6
        # a conversation growing to ~64 KB: each turn tokenized whole (plain) or by prefix (cached)
        msgs: list[dict[str, str]] = [{"role": "system", "content": random_text(rng, 4000)}]
        turns = []
        while sum(len(m["content"]) for m in msgs) < 64 * 1024:
            msgs.append({"role": "user", "content": random_text(rng, 3000)})
            turns.append([dict(m) for m in msgs])
            msgs.append({"role": "assistant", "content": random_text(rng, 1500)})
        out = {"tokenize_us_per_kb": per_kb}
        for label, tk in (("plain", plain), ("prefix_cache", cached)):
            t = time.perf_counter()
            for conv in turns:
                ids = tk.ids_for("", conv)
            out[f"conversation_{label}_ms_per_turn"] = (time.perf_counter() - t) / len(turns) * 1000
            out[f"conversation_{label}_last_turn_tokens"] = float(len(ids or []))
        same = all(plain.ids_for("", c) == cached.ids_for("", c) for c in turns)
        out["prefix_cache_ids_identical"] = 1.0 if same else 0.0
        out["conversation_turns"] = float(len(turns))
        return out


def bench_rss(quick: bool) -> dict[str, float]:
    pods, per_pod = (64, 20_000) if quick else (64, 100_000)
    gc.collect()
    base = rss_mb()
    idx = PreciseIndex()
    rng = random.Random(7)
    t = time.process_time()
    chunk = 512
    toks_block = [rng.randrange(128000) for _ in range(chunk * 16)]
    for p in range(pods):
        addr = f"10.1.{p // 250}.{p % 250 + 1}:8000"
        parent = None
        for s in range(0, per_pod, chunk):
            hs = [rng.getrandbits(64) for _ in range(chunk)]
            toks = toks_block[:]
            toks[0] = p * 100_000 + s  # every pod and chunk a distinct chain
            idx.apply(addr, "m", decode_payload(encode_payload([encode_stored(hs, parent, toks, 16)], 0.0)))
            parent = hs[-1]
    fill = time.process_time() - t
    gc.collect()
    used = rss_mb() - base
    return {"rss_pods": float(pods), "rss_blocks_per_pod": float(per_pod), "rss_index_mb": used,
            "rss_bytes_per_block": used * 1024 * 1024 / (pods * per_pod), "rss_fill_s": fill,
            "rss_entries": float(idx.entries)}


SECTIONS = {"ingest": bench_ingest, "zmq": bench_zmq, "lookup": bench_lookup, "tokenize": bench_tokenize,
            "rss": bench_rss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out: dict[str, Any] = {}
    for name in args.only:
        got = SECTIONS[name](args.quick)
        out.update(got)
        for k, v in got.items():
            print(f"{k:40s} {v:14,.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

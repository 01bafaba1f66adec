"""The KV-event wire format (vLLM's, and SGLang's variant of it), decoded by position.

A ZMQ message is three frames `[topic, seq (uint64 big-endian), payload]`; the payload is msgpack of
`[ts, events, data_parallel_rank?]` with each event an array whose first item is its tag (msgspec
`array_like`, trailing defaults omitted). Newer vLLM can also send an event as a map with a `type`
key; both decode to the same records. Every field is read with a length and type check, so a short,
long or foreign event is either read or reported (WireError), never guessed at.

Block hashes are opaque: ints (kept as their low 64 bits) or bytes (the last 8 bytes, big-endian).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

MASK64 = (1 << 64) - 1
VLLM, SGLANG = "vllm", "sglang"
ENGINE_TYPES = (VLLM, SGLANG)
TOPIC_PREFIX = "kv@"
DEFAULT_TIER = "gpu"
MAX_TOKENS_PER_EVENT = 1 << 20  # a store event longer than this is refused (bounded CPU per message)


class WireError(ValueError):
    """A message or event that does not follow the wire format."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_hash: int | None
    token_ids: array[int]  # unsigned 32-bit ids, packed
    block_size: int
    lora_id: int | None = None
    tier: str = DEFAULT_TIER  # `medium`, lower-cased ("gpu" when absent)
    lora_name: str | None = None
    extra_keys: tuple[Any, ...] | None = None  # per engine block: None or a list of keys
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    tier: str = DEFAULT_TIER
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    tier: str = ""


Event = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: tuple[Event, ...]
    data_parallel_rank: int | None = None


_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                  "lora_name", "extra_keys", "group_idx")
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")
_decoder = msgspec.msgpack.Decoder()
_encoder = msgspec.msgpack.Encoder()


def parse_topic(topic: str) -> tuple[str, str]:
    """(endpoint, model) from llm-d's topic `kv@<ip:port>@<model>`; ("", "") for any other shape."""
    parts = topic.split("@")
    if len(parts) == 3 and parts[0] == "kv" and parts[1]:
        return parts[1], parts[2]
    return "", ""


def hash_value(raw: Any, what: str = "block hash") -> int:
    """An engine hash as an unsigned 64-bit int (ints: low 64 bits; bytes: the last 8, big-endian)."""
    if isinstance(raw, bool):
        raise WireError(f"{what}: a bool is not a hash")
    if isinstance(raw, int):
        return raw & MASK64
    if isinstance(raw, (bytes, bytearray, memoryview)):
        b = bytes(raw)
        if not b:
            raise WireError(f"{what}: empty bytes")
        return int.from_bytes(b[-8:], "big")
    raise WireError(f"{what}: expected an int or bytes, got {type(raw).__name__}")


def _hashes(raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise WireError(f"block_hashes: expected an array, got {type(raw).__name__}")
    return tuple(hash_value(h) for h in raw)


def _int(raw: Any, what: str, lo: int | None = None) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise WireError(f"{what}: expected an integer, got {type(raw).__name__}")
    if lo is not None and raw < lo:
        raise WireError(f"{what}: {raw} < {lo}")
    return raw


def _opt_str(raw: Any, what: str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise WireError(f"{what}: expected a string, got {type(raw).__name__}")
    return raw


def _tier(raw: Any) -> str:
    s = _opt_str(raw, "medium")
    return s.lower() if s else DEFAULT_TIER


def _at(fields: list[Any], i: int) -> Any:
    return fields[i] if i < len(fields) else None


def _stored(f: list[Any], engine: str) -> BlockStored:
    if len(f) < 5:
        raise WireError(f"BlockStored: need at least 5 fields, got {len(f)}")
    hashes = _hashes(f[1])
    parent = None if f[2] is None else hash_value(f[2], "parent_block_hash")
    tokens = f[3]
    if not isinstance(tokens, list):
        raise WireError(f"BlockStored: token_ids: expected an array, got {type(tokens).__name__}")
    if len(tokens) > MAX_TOKENS_PER_EVENT:
        raise WireError(f"BlockStored: {len(tokens)} token ids (more than {MAX_TOKENS_PER_EVENT})")
    try:  # one C-level pass checks every id (ints in 0..2^32-1) and packs them for hashing
        packed = array("I", tokens)
    except (TypeError, OverflowError):
        raise WireError("BlockStored: token_ids: expected unsigned 32-bit integers") from None
    block_size = _int(f[4], "BlockStored: block_size", lo=1)
    lora_id = None if _at(f, 5) is None else _int(f[5], "BlockStored: lora_id")
    extra = _at(f, 8)
    if extra is not None:
        if not isinstance(extra, list) or not all(e is None or isinstance(e, list) for e in extra):
            raise WireError("BlockStored: extra_keys: expected an array of arrays or nils")
        extra = tuple(None if e is None else tuple(_freeze(x) for x in e) for e in extra)
    group = None
    if engine == VLLM and _at(f, 9) is not None:
        group = _int(f[9], "BlockStored: group_idx", lo=0)
    return BlockStored(hashes, parent, packed, block_size, lora_id, _tier(_at(f, 6)),
                       _opt_str(_at(f, 7), "BlockStored: lora_name"), extra, group)


def _freeze(x: Any) -> Any:
    """Extra keys as hashable, comparable values (lists become tuples)."""
    if isinstance(x, list):
        return tuple(_freeze(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in x.items()))
    return x


def _removed(f: list[Any], engine: str) -> BlockRemoved:
    if len(f) < 2:
        raise WireError(f"BlockRemoved: need at least 2 fields, got {len(f)}")
    group = None
    if engine == VLLM and _at(f, 3) is not None:
        group = _int(f[3], "BlockRemoved: group_idx", lo=0)
    return BlockRemoved(_hashes(f[1]), _tier(_at(f, 2)), group)


def _fields(raw: Any) -> list[Any]:
    if isinstance(raw, list):
        return raw
    if isinstance(raw, dict):  # map-encoded event: back to positions
        tag = raw.get("type")
        if not isinstance(tag, str):
            raise WireError("map-encoded event without a string `type`")
        order = _STORED_FIELDS if tag == "BlockStored" else _REMOVED_FIELDS if tag == "BlockRemoved" else ()
        return [tag, *(raw.get(k) for k in order)]
    raise WireError(f"event: expected an array or a map, got {type(raw).__name__}")


def decode_event(raw: Any, engine: str = VLLM) -> Event:
    """One decoded msgpack event (an array or a map) as a record."""
    f = _fields(raw)
    if not f or not isinstance(f[0], str):
        raise WireError("event: no string tag")
    tag = f[0]
    if tag == "BlockStored":
        return _stored(f, engine)
    if tag == "BlockRemoved":
        return _removed(f, engine)
    if tag == "AllBlocksCleared":
        return AllBlocksCleared(_opt_str(_at(f, 1), "AllBlocksCleared: medium") or "")
    raise WireError(f"unknown event tag {tag!r}")


def decode_payload(payload: bytes, engine: str = VLLM) -> EventBatch:
    """A message's payload frame as an EventBatch; WireError for anything malformed."""
    try:
        top = _decoder.decode(payload)
    except msgspec.DecodeError as e:
        raise WireError(f"payload is not msgpack: {e}") from None
    if not isinstance(top, list) or len(top) < 2:
        raise WireError("payload: expected [ts, events, data_parallel_rank?]")
    ts, events = top[0], top[1]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise WireError("payload: ts is not a number")
    if not isinstance(events, list):
        raise WireError("payload: events is not an array")
    rank = None if _at(top, 2) is None else _int(top[2], "data_parallel_rank", lo=0)
    return EventBatch(float(ts), tuple(decode_event(e, engine) for e in events), rank)


def parse_frames(frames: Sequence[bytes]) -> tuple[str, int, bytes]:
    """(topic, seq, payload) of a three-frame message; WireError otherwise."""
    if len(frames) != 3 or len(frames[1]) != 8:
        raise WireError(f"expected [topic, 8-byte seq, payload], got {len(frames)} frames")
    try:
        topic = bytes(frames[0]).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("topic is not UTF-8") from None
    return topic, int.from_bytes(frames[1], "big"), bytes(frames[2])


# ---- encoding (the simulator publishes with these; tests build messages with them) -----------------
def encode_stored(hashes: Sequence[int], parent: int | None, token_ids: Sequence[int], block_size: int,
                  lora_id: int | None = None, medium: str | None = None, lora_name: str | None = None,
                  extra_keys: Sequence[Any] | None = None) -> list[Any]:
    """A BlockStored event as vLLM's array (trailing defaults omitted)."""
    ev: list[Any] = ["BlockStored", list(hashes), parent, list(token_ids), block_size,
                     lora_id, medium, lora_name, None if extra_keys is None else list(extra_keys)]
    while len(ev) > 5 and ev[-1] is None:
        ev.pop()
    return ev


def encode_removed(hashes: Sequence[int], medium: str | None = None) -> list[Any]:
    ev: list[Any] = ["BlockRemoved", list(hashes), medium]
    if medium is None:
        ev.pop()
    return ev


def encode_payload(events: Sequence[list[Any]], ts: float, data_parallel_rank: int | None = None) -> bytes:
    """`[ts, events, rank?]` as msgpack bytes."""
    top: list[Any] = [ts, list(events)]
    if data_parallel_rank is not None:
        top.append(data_parallel_rank)
    return _encoder.encode(top)


def frames(topic: str, seq: int, payload: bytes) -> list[bytes]:
    return [topic.encode(), seq.to_bytes(8, "big"), payload]

"""The KV-event wire format: vLLM's arrays and maps, SGLang's shorter arrays, hashes as ints or bytes."""

from __future__ import annotations

import msgspec
import pytest

from epp.kvevents.wire import (
    SGLANG,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    WireError,
    decode_payload,
    encode_payload,
    encode_removed,
    encode_stored,
    frames,
    parse_frames,
    parse_topic,
)

enc = msgspec.msgpack.Encoder()


def test_vllm_array_events_round_trip() -> None:
    payload = encode_payload([encode_stored([11, 12], None, list(range(32)), 16, lora_name="ad"),
                              encode_removed([11], "CPU"), ["AllBlocksCleared"]], 5.5, 1)
    b = decode_payload(payload)
    assert b.ts == 5.5 and b.data_parallel_rank == 1
    st, rm, cl = b.events
    assert isinstance(st, BlockStored) and st.block_hashes == (11, 12) and st.parent_hash is None
    assert list(st.token_ids) == list(range(32)) and st.block_size == 16 and st.lora_name == "ad"
    assert st.tier == "gpu"
    assert isinstance(rm, BlockRemoved) and rm.block_hashes == (11,) and rm.tier == "cpu"
    assert isinstance(cl, AllBlocksCleared)


def test_trailing_defaults_omitted_and_extra_trailing_fields_ignored() -> None:
    short = ["BlockStored", [1], 7, [1, 2], 2]
    long = ["BlockStored", [1], 7, [1, 2], 2, None, "GPU", None, [["salt"]], 0, "full_attention", None, "future"]
    b = decode_payload(enc.encode([0.0, [short, long]]))
    assert b.events[0].parent_hash == 7  # type: ignore[union-attr]
    assert b.events[1].extra_keys == (("salt",),)  # type: ignore[union-attr]
    assert b.events[1].group_idx == 0  # type: ignore[union-attr]


def test_map_encoded_events() -> None:
    ev = {"type": "BlockStored", "block_hashes": [3], "parent_block_hash": None, "token_ids": [9] * 4,
          "block_size": 4, "medium": "GPU"}
    b = decode_payload(enc.encode([1.0, [ev, {"type": "BlockRemoved", "block_hashes": [3]}]]))
    assert isinstance(b.events[0], BlockStored) and b.events[0].block_hashes == (3,)
    assert isinstance(b.events[1], BlockRemoved)


def test_hashes_as_bytes_and_negative_ints() -> None:
    b = decode_payload(enc.encode([0, [["BlockRemoved", [b"\x00" * 24 + (5).to_bytes(8, "big"), -1]]]]))
    assert b.events[0].block_hashes == (5, (1 << 64) - 1)  # type: ignore[union-attr]


def test_sglang_variant_ignores_group_fields() -> None:
    ev = ["BlockStored", [1], None, [1, 2], 2, None, None, None, None, 3]
    b = decode_payload(enc.encode([0, [ev]]), SGLANG)
    assert b.events[0].group_idx is None  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", [
    b"\xc1",  # not msgpack
    enc.encode({"ts": 1}),
    enc.encode([0, "x"]),
    enc.encode([0, [["BlockStored", [1], None, [1]]]]),  # too short
    enc.encode([0, [["BlockStored", [1], None, [-1], 1]]]),  # negative token id
    enc.encode([0, [["BlockStored", [1], None, [1 << 40], 1]]]),  # token id beyond 32 bits
    enc.encode([0, [["BlockStored", [True], None, [1], 1]]]),
    enc.encode([0, [["BlockStored", [1], None, [1], 0]]]),  # block size 0
    enc.encode([0, [["Nope"]]]),
    enc.encode([0, [[]]]),
    enc.encode([0, [{"block_hashes": [1]}]]),
])
def test_malformed_payloads_raise_wire_error(bad: bytes) -> None:
    with pytest.raises(WireError):
        decode_payload(bad)


def test_frames_and_topic() -> None:
    assert parse_frames(frames("kv@1.2.3.4:8000@m", 7, b"p")) == ("kv@1.2.3.4:8000@m", 7, b"p")
    with pytest.raises(WireError):
        parse_frames([b"t", b"\x00" * 4, b"p"])
    with pytest.raises(WireError):
        parse_frames([b"t", b"p"])
    assert parse_topic("kv@10.0.0.1:8000@llama") == ("10.0.0.1:8000", "llama")
    assert parse_topic("kv@x") == ("", "")
    assert parse_topic("other@a@b") == ("", "")

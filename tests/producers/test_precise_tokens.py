"""Token backends: local tokenizer files (never downloaded), sandboxed chat templates, the prefix
token cache, and the engine render client against the simulator (with its fallback)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

from epp.sim.server import SimServer
from epp.sim.tokens import chat_prompt, token_ids
from epp.tokens.local import LocalTokenizer, TokenizerError, resolve
from epp.tokens.prefix_cache import PrefixTokenCache
from epp.tokens.render import RenderClient
from tests.procs import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from precise_prefix_cost import TEMPLATE, make_tokenizer_dir


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def test_local_tokenizer_renders_the_template_and_tokenizes(tok_dir: Path) -> None:
    t = LocalTokenizer(str(tok_dir))
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    text = t.render(msgs)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = t.ids_for("", msgs)
    assert ids == t.tok.encode(text, add_special_tokens=False).ids
    assert ids[0] == t.tok.token_to_id("<|begin_of_text|>")
    comp = t.ids_for("plain prompt text", None)
    assert comp is not None and comp[0] == t.tok.token_to_id("<|begin_of_text|>")  # add_bos_token


def test_sandbox_refuses_unsafe_templates(tmp_path: Path, tok_dir: Path) -> None:
    d = tmp_path / "evil"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ messages.__class__.__mro__[1].__subclasses__() }}"}))
    t = LocalTokenizer(str(d))
    with pytest.raises(TokenizerError):
        t.render([{"role": "user", "content": "x"}])
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages.append(1) }}"}))
    with pytest.raises(TokenizerError):
        LocalTokenizer(str(d)).render([{"role": "user", "content": "x"}])
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ raise_exception('no system') }}"}))
    with pytest.raises(TokenizerError, match="no system"):
        LocalTokenizer(str(d)).render([{"role": "user", "content": "x"}])


def test_resolve_from_hf_cache_layout_and_never_download(tmp_path: Path, tok_dir: Path) -> None:
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    assert resolve("acme/tiny", [tmp_path / "hub"]) == snap
    with pytest.raises(TokenizerError, match="never downloaded"):
        resolve("acme/absent", [tmp_path / "hub"])
    with pytest.raises(TokenizerError):
        resolve(str(tmp_path / "nothing-here"))


def test_named_templates_and_template_file(tmp_path: Path, tok_dir: Path) -> None:
    d = tmp_path / "named"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": TEMPLATE}]}))
    assert LocalTokenizer(str(d)).render([{"role": "user", "content": "a"}]).startswith("<|start_header_id|>user")
    (d / "tokenizer_config.json").write_text("{}")
    (d / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert LocalTokenizer(str(d)).render([{"role": "user", "content": "a"}]) == "[a]"


def test_prefix_cache_reuses_segments_with_identical_ids(tok_dir: Path) -> None:
    t = LocalTokenizer(str(tok_dir), prefix_cache=False)
    calls: list[int] = []

    def enc(text: str) -> list[int]:
        calls.append(len(text))
        return t._encode(text)
    cache = PrefixTokenCache(enc, segment_chars=256)
    conv = "".join(f"line {i} says something rather long about turn {i}\n" for i in range(200))
    assert cache.ids(conv) == t._encode(conv)
    first = sum(calls)
    calls.clear()
    grown = conv + "a new question\n"
    assert cache.ids(grown) == t._encode(grown)
    assert sum(calls) < first / 10  # only the tail was tokenized again
    assert cache.hits > 0


def test_prefix_cache_is_bounded() -> None:
    cache = PrefixTokenCache(lambda s: list(range(len(s))), segment_chars=10, max_ids=1000)
    for i in range(200):
        cache.ids(f"{i:05d}-" * 40 + "\n")
        assert cache.size <= 1000 + 400


async def test_render_client_against_the_simulator_and_fallback(caplog: pytest.LogCaptureFixture) -> None:
    async with SimServer() as sim:
        rc = RenderClient(sim.url, model=sim.cfg.engine.model)
        msgs = [{"role": "user", "content": "hello render"}]
        assert await rc.ids({"messages": msgs}, chat=True) == token_ids(chat_prompt(msgs))
        assert await rc.ids({"prompt": "abcdefgh"}, chat=False) == token_ids("abcdefgh")
        assert rc.renders == 2 and rc.fallbacks == 0
        await rc.close()
    dead = RenderClient(f"http://127.0.0.1:{free_port()}", timeout=0.5)
    caplog.set_level(logging.WARNING, "epp.tokens")
    for _ in range(3):
        assert await dead.ids({"prompt": "x"}, chat=False) is None
    assert dead.fallbacks == 3
    assert sum("falling back" in r.message for r in caplog.records) == 1  # logged once
    await dead.close()


def test_hf_cache_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from epp.tokens.local import hf_cache_dirs
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "b"))
    dirs = hf_cache_dirs()
    assert dirs[0] == tmp_path / "a" and dirs[1] == tmp_path / "b" / "hub"
    assert os.fspath(dirs[2]).endswith(".cache/huggingface/hub")


async def test_background_renders_serve_the_next_turn() -> None:
    """No tokenizer files: the engine renders each chat request in the background; the next turn of
    the conversation gets the earlier turn's ids as its prefix, without waiting on the request path."""
    import random as _random

    from epp.producers.precise_prefix import PrecisePrefixCacheProducer, parse_params
    from epp.producers.token import TokenProducer
    from epp.scheduling.framework import SchedulingRequest
    from epp.scheduling.loadguard import LoadGuard
    from epp.scheduling.registry import BuildContext, Params
    from epp.scheduling.saturation import SaturationDetector

    async with SimServer() as sim:
        model = sim.cfg.engine.model
        ctx = BuildContext(rng=_random.Random(0), detector=SaturationDetector(), guard=LoadGuard())
        tp = TokenProducer("tp", TokenProducer.parse(Params(
            {"modelName": "acme/not-cached", "vllm": {"url": sim.url, "timeout": "1s"}}, "")), ctx)
        assert tp.tokenizer is None and tp.rendered is not None
        ctx.plugins["tp"] = tp
        prod = PrecisePrefixCacheProducer("pp", parse_params(Params({}, "")), ctx)
        turn1 = [{"role": "system", "content": "you are a careful assistant " * 20},
                 {"role": "user", "content": "first question about the documents " * 10}]
        body1 = {"model": model, "messages": turn1}
        r1 = SchedulingRequest(request_id="1", model=model, prompt=str(turn1), body=body1)
        assert prod.keys(r1) is None  # the first turn: nothing rendered yet (the estimate)
        await tp.rendered.drain()
        assert tp.rendered.size == 1 and tp.render.renders == 1
        # the engine holds turn 1's blocks (its events, as a publisher would send them)
        ids1 = token_ids(chat_prompt(turn1))
        from epp.kvevents.wire import encode_payload, encode_stored
        n = len(ids1) // 16
        prod.feed("10.0.0.1:8000", model, encode_payload([encode_stored(list(range(1, n + 1)), None,
                                                                        ids1[:n * 16], 16)], 0.0))
        turn2 = [*turn1, {"role": "assistant", "content": "an answer"}, {"role": "user", "content": "and then?"}]
        r2 = SchedulingRequest(request_id="2", model=model, prompt=str(turn2), body={"model": model, "messages": turn2})
        from epp.datastore import Endpoint
        eps = [Endpoint(address=f"10.0.0.{i}:8000", ip=f"10.0.0.{i}", port=8000, pod="p") for i in (1, 2)]
        got = prod.ratios(r2, eps)
        assert got[0] > 0.5 and got[1] == 0.0
        assert tp.rendered.hits == 1
        await tp.rendered.drain()
        await tp.render.close()

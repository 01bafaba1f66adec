"""A local tokenizer: HF `tokenizers` with the model's `tokenizer.json`, and its chat template
rendered by a sandboxed jinja2 — from a mounted directory or the HF cache, never downloaded.

`resolve(path_or_model)` finds the files: a directory holding `tokenizer.json`; or a model name
looked up in the HF cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`:
`models--<org>--<name>/snapshots/<revision>/`, the newest snapshot); nothing else is tried. The chat
template comes from `tokenizer_config.json` (`chat_template`: a string or a list of named ones, the
`default` first) or a `chat_template.jinja` beside it. The sandbox (ImmutableSandboxedEnvironment)
refuses attribute access to internals and mutation of inputs; a template that raises or runs past
`MAX_RENDER_CHARS` is an error, and the caller falls back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from epp.tokens.prefix_cache import PrefixTokenCache

MAX_RENDER_CHARS = 4 << 20


class TokenizerError(ValueError):
    """Tokenizer files missing or unusable."""


def hf_cache_dirs() -> list[Path]:
    out = []
    if os.environ.get("HF_HUB_CACHE"):
        out.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        out.append(Path(os.environ["HF_HOME"]) / "hub")
    out.append(Path.home() / ".cache" / "huggingface" / "hub")
    return out


def resolve(path_or_model: str, cache_dirs: Sequence[Path] | None = None) -> Path:
    """The directory with the model's tokenizer.json (see the module doc); TokenizerError if none."""
    p = Path(path_or_model)
    if p.is_dir() and (p / "tokenizer.json").is_file():
        return p
    if p.is_file() and p.name == "tokenizer.json":
        return p.parent
    if "/" in path_or_model and not path_or_model.startswith(("/", ".")):
        repo = "models--" + path_or_model.replace("/", "--")
        for root in cache_dirs if cache_dirs is not None else hf_cache_dirs():
            snaps = root / repo / "snapshots"
            if snaps.is_dir():
                found = sorted((d for d in snaps.iterdir() if (d / "tokenizer.json").is_file()),
                               key=lambda d: d.stat().st_mtime, reverse=True)
                if found:
                    return found[0]
    raise TokenizerError(f"no tokenizer.json for {path_or_model!r} (a directory, or the model in the HF cache; "
                         "tokenizers are never downloaded)")


def _template(directory: Path, cfg: Mapping[str, Any]) -> str | None:
    t = cfg.get("chat_template")
    if isinstance(t, list):
        named = {e.get("name"): e.get("template") for e in t if isinstance(e, Mapping)}
        t = named.get("default") or next((v for v in named.values() if isinstance(v, str)), None)
    if isinstance(t, str) and t:
        return t
    f = directory / "chat_template.jinja"
    return f.read_text(encoding="utf-8") if f.is_file() else None


def _token_text(v: Any) -> str:
    if isinstance(v, Mapping):
        return str(v.get("content", ""))
    return v if isinstance(v, str) else ""


class LocalTokenizer:
    """Ids of a completion prompt or of chat messages rendered with the model's template."""

    def __init__(self, path_or_model: str, *, cache_dirs: Sequence[Path] | None = None,
                 prefix_cache: bool = True) -> None:
        from tokenizers import Tokenizer

        self.directory = resolve(path_or_model, cache_dirs)
        try:
            self.tok = Tokenizer.from_file(str(self.directory / "tokenizer.json"))
        except Exception as e:  # the library raises its own exception type for bad files
            raise TokenizerError(f"{self.directory / 'tokenizer.json'}: {e}") from None
        cfg_file = self.directory / "tokenizer_config.json"
        cfg: Mapping[str, Any] = {}
        if cfg_file.is_file():
            try:
                loaded = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise TokenizerError(f"{cfg_file}: {e}") from None
            cfg = loaded if isinstance(loaded, Mapping) else {}
        self.bos = _token_text(cfg.get("bos_token"))
        self.eos = _token_text(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        source = _template(self.directory, cfg)
        self.template = None
        if source is not None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            def tojson(x: Any, indent: int | None = None, **_: Any) -> str:
                return json.dumps(x, indent=indent, ensure_ascii=False)

            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = tojson
            try:
                self.template = env.from_string(source)
            except TemplateError as e:
                raise TokenizerError(f"chat template of {self.directory}: {e}") from None
        self._cache = PrefixTokenCache(self._encode) if prefix_cache else None

    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Any = None) -> str:
        """The chat prompt text, as the engine renders it (add_generation_prompt)."""
        if self.template is None:
            raise TokenizerError(f"{self.directory} has no chat template")
        from jinja2.exceptions import TemplateError

        try:
            text = self.template.render(messages=list(messages), tools=tools, add_generation_prompt=True,
                                        bos_token=self.bos, eos_token=self.eos)
        except (TemplateError, TypeError, ValueError, RecursionError) as e:
            raise TokenizerError(f"chat template: {e}") from None
        if len(text) > MAX_RENDER_CHARS:
            raise TokenizerError("chat template output is too long")
        return text

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self._cache.ids(text) if self._cache is not None else self._encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos:
            bid = self.tok.token_to_id(self.bos)
            if bid is not None and (not ids or ids[0] != bid):
                ids = [bid, *ids]
        return ids

    def ids_for(self, prompt: str, messages: Sequence[Mapping[str, Any]] | None) -> list[int] | None:
        if messages:
            return self.encode(self.render(messages), add_bos=False)  # templates write their own BOS
        return self.encode(prompt) if prompt else None

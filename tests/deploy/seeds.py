"""The YAML examples in the seed documents (../shared/seeds), extracted from their text.

A seed is a web page saved as text. An example starts at a line `apiVersion: ...` and runs while
lines look like YAML (keys, list items, indented continuations). Some pages lost their indentation
when saved (every line at column 0); those are re-nested with the CRD schema as the guide: a key
belongs to the innermost open object whose schema has that property (or accepts any key with a
value of that shape), otherwise it closes objects until one does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.crdschema import Validator

SEEDS = Path(__file__).resolve().parents[3] / "shared" / "seeds"

_YAML_LINE = re.compile(r"""^\s*(- )?[A-Za-z0-9_.\-/"']+:(\s|$)|^\s*- |^\s+\S""")
_KEY_LINE = re.compile(r"^([A-Za-z0-9_.\-/]+):\s*(.*)$")

# What metadata may hold, for re-nesting (the CRDs leave metadata to the API server).
_OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


@dataclass(frozen=True)
class Example:
    """One example object and where it came from."""

    seed: str
    index: int
    flattened: bool
    obj: dict[str, Any]


def blocks(text: str) -> list[list[str]]:
    """The YAML-looking line blocks that start at `apiVersion:`."""
    out: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("apiVersion:"):
            current = [line]
            out.append(current)
        elif current is not None and line.strip() and _YAML_LINE.match(line):
            current.append(line)
        else:
            current = None
    return out


def _child(node: dict[str, Any], key: str) -> dict[str, Any] | None:
    props = node.get("properties")
    if props is not None:
        return props.get(key)
    extra = node.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def renest(lines: list[str], schema: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the nesting of `key: value` lines that lost their indentation, guided by `schema`."""
    root: dict[str, Any] = {}
    schema = dict(schema, properties=dict(schema["properties"], metadata=_OBJECT_META))
    stack: list[tuple[dict[str, Any], dict[str, Any]]] = [(schema, root)]
    for line in lines:
        m = _KEY_LINE.match(line.strip())
        if m is None:
            raise ValueError(f"cannot re-nest line {line!r}")
        key, raw = m.group(1), m.group(2)
        opens = raw == ""
        while True:
            child = _child(stack[-1][0], key)
            if child is not None and (child.get("type") == "object") == opens:
                break
            if len(stack) == 1:
                raise ValueError(f"no place for key {key!r}")
            stack.pop()
        if opens:
            new: dict[str, Any] = {}
            stack[-1][1][key] = new
            stack.append((child, new))
        else:
            stack[-1][1][key] = yaml.safe_load(raw)
    return root


def parse_block(lines: list[str], validator: Validator) -> tuple[dict[str, Any], bool]:
    """The object of one block, and whether it had to be re-nested."""
    flattened = all(not line[:1].isspace() for line in lines) and any(
        _KEY_LINE.match(line) and not _KEY_LINE.match(line).group(2)
        for line in lines  # type: ignore[union-attr]
    )
    if not flattened:
        return yaml.safe_load("\n".join(lines)), False
    head = {m.group(1): m.group(2) for m in map(_KEY_LINE.match, lines) if m}
    version = validator.versions[(head["apiVersion"], head["kind"])]
    return renest(lines, version.schema), True


def examples(validator: Validator | None = None) -> list[Example]:
    """Every example object in every seed document."""
    validator = validator or Validator()
    out = []
    for path in sorted(SEEDS.glob("*.txt")):
        for i, lines in enumerate(blocks(path.read_text())):
            obj, flat = parse_block(lines, validator)
            out.append(Example(path.name, i, flat, obj))
    return out

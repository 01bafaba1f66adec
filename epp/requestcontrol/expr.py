"""A small, safe subset of CEL for request-attribute expressions over `usage`.

Grammar: `c ? a : b`, `||`, `&&`, `== != < <= > >=`, `+ - * / %`, unary `! -`, parentheses,
numbers, `true`/`false`, member access on `usage` (`usage.prompt_tokens`,
`usage.prompt_token_details.cached_tokens`) and `has(usage.x)`. Everything is compiled once at
config load into closures; nothing is `eval`ed. Numbers are doubles, as CEL reads a JSON Struct.
Expressions are bounded (length and nesting) so a config cannot make the compiler recurse deeply.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

MAX_LENGTH = 2048
MAX_DEPTH = 32

Env = Mapping[str, Any]
Node = Callable[[Env], Any]


class ExprError(ValueError):
    """A syntax error (at compile time) or a type/missing-field error (at evaluation)."""


_TOKEN = re.compile(r"\s*(?:(\d+\.\d*|\.\d+|\d+)|([A-Za-z_][A-Za-z0-9_]*)|(\|\||&&|==|!=|<=|>=|[-+*/%<>!?:().]))")
_MISSING = object()


def _tokens(text: str) -> list[str]:
    out, pos, n = [], 0, len(text)
    while pos < n:
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ExprError(f"unexpected character {text[pos:].lstrip()[:1]!r} at {pos}")
        out.append(m.group(m.lastindex or 0))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str, variables: frozenset[str]) -> None:
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0
        self.vars = variables

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, want: str | None = None) -> str:
        t = self.peek()
        if t is None:
            raise ExprError("unexpected end of expression")
        if want is not None and t != want:
            raise ExprError(f"expected {want!r}, got {t!r}")
        self.i += 1
        return t

    def parse(self) -> Node:
        node = self.expr()
        if self.peek() is not None:
            raise ExprError(f"unexpected {self.peek()!r}")
        return node

    def expr(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExprError("expression nested too deeply")
        cond = self.binary(0)
        if self.peek() == "?":
            self.take()
            a = self.expr()
            self.take(":")
            b = self.expr()
            self.depth -= 1
            return lambda env: a(env) if _bool(cond(env)) else b(env)
        self.depth -= 1
        return cond

    _LEVELS: tuple[tuple[str, ...], ...] = (("||",), ("&&",), ("==", "!=", "<", "<=", ">", ">="), ("+", "-"),
                                            ("*", "/", "%"))

    def binary(self, level: int) -> Node:
        if level == len(self._LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        ops = self._LEVELS[level]
        while self.peek() in ops:
            op = self.take()
            right = self.binary(level + 1)
            left = _combine(op, left, right)
            if level == 2:  # comparisons do not chain in CEL
                break
        return left

    def unary(self) -> Node:
        t = self.peek()
        if t in ("!", "-"):
            self.take()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ExprError("expression nested too deeply")
            inner = self.unary()
            self.depth -= 1
            if t == "!":
                return lambda env: not _bool(inner(env))
            return lambda env: -_num(inner(env))
        return self.member()

    def member(self) -> Node:
        t = self.take()
        if t == "(":
            node = self.expr()
            self.take(")")
            return node
        if t[0].isdigit() or t[0] == ".":
            value = float(t)
            return lambda env: value
        if t in ("true", "false"):
            b = t == "true"
            return lambda env: b
        if t == "has":
            self.take("(")
            path = self.path()
            self.take(")")
            if len(path) < 2:
                raise ExprError("has() needs a field selection like usage.prompt_tokens")
            return lambda env: _lookup(env, path) is not _MISSING
        if t[0].isalpha() or t[0] == "_":
            self.i -= 1
            path = self.path()

            def get(env: Env) -> Any:
                v = _lookup(env, path)
                if v is _MISSING:
                    raise ExprError(f"no such key: {'.'.join(path)}")
                return v

            return get
        raise ExprError(f"unexpected {t!r}")

    def path(self) -> tuple[str, ...]:
        name = self.take()
        if not (name[0].isalpha() or name[0] == "_"):
            raise ExprError(f"expected a name, got {name!r}")
        if name not in self.vars:
            raise ExprError(f"undeclared reference to {name!r}")
        out = [name]
        while self.peek() == ".":
            self.take()
            field = self.take()
            if not (field[0].isalpha() or field[0] == "_"):
                raise ExprError(f"expected a field name, got {field!r}")
            out.append(field)
        return tuple(out)


def _lookup(env: Env, path: tuple[str, ...]) -> Any:
    v: Any = env
    for key in path:
        if not isinstance(v, Mapping) or key not in v:
            return _MISSING
        v = v[key]
    return v


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ExprError(f"expected a number, got {type(v).__name__}")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ExprError(f"expected a bool, got {type(v).__name__}")
    return v


def _div(a: float, b: float) -> float:
    if b == 0:
        raise ExprError("division by zero")
    return a / b


def _mod(a: float, b: float) -> float:
    if b == 0:
        raise ExprError("modulus by zero")
    return math.fmod(a, b)


_ARITH: dict[str, Callable[[float, float], Any]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": _div, "%": _mod,
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}


def _combine(op: str, left: Node, right: Node) -> Node:
    if op == "||":
        return lambda env: _bool(left(env)) or _bool(right(env))
    if op == "&&":
        return lambda env: _bool(left(env)) and _bool(right(env))
    if op == "==":
        return lambda env: left(env) == right(env)
    if op == "!=":
        return lambda env: left(env) != right(env)
    f = _ARITH[op]
    return lambda env: f(_num(left(env)), _num(right(env)))


def compile_expr(text: str, variables: frozenset[str] = frozenset({"usage"})) -> Node:
    """Compile `text`; the result is called with {variable: value}. Raises ExprError."""
    if not text.strip():
        raise ExprError("empty expression")
    if len(text) > MAX_LENGTH:
        raise ExprError(f"expression longer than {MAX_LENGTH} characters")
    return _Parser(text, variables).parse()

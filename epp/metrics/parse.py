"""A targeted scanner for the Prometheus text exposition format (version 0.0.4).

It reads only the sample names it is asked for, and reads those correctly: quoted label values
with escaped quotes, backslashes, newlines, commas and braces; NaN / +Inf / -Inf; an optional
millisecond timestamp; several series per name; HELP/TYPE/comment lines; CRLF line endings;
leading blanks on a line. A page cut short (no final line feed) keeps its complete lines and
drops the incomplete last one, as the format requires every line to end with a line feed.

Why not a full parser: prometheus_client's takes ~7.7 ms for a 40 KB vLLM page, and the picker
polls every pod every 50 ms; finding each wanted name at line starts with `str.find` touches only
the handful of lines the scorers need. A malformed line of a wanted name is skipped, never fatal:
the caller decides whether what was found is enough.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import NamedTuple

MAX_SERIES = 4096  # lines of one wanted name per page; a real page has a handful (LoRA: tens)


class TooManySeries(ValueError):
    """A wanted name has more lines than the cap: the page is hostile or broken."""


class Sample(NamedTuple):
    """One series of a wanted name."""

    labels: Mapping[str, str]  # read-only, shared with other samples of the same label text
    value: float
    timestamp: float | None  # seconds (the page carries milliseconds), None when absent


_ESCAPE = re.compile(r'\\[\\n"]')
_UNESCAPE = {"\\\\": "\\", "\\n": "\n", '\\"': '"'}


def _unescape(value: str) -> str:
    return _ESCAPE.sub(lambda m: _UNESCAPE[m.group(0)], value)


def _closing_quote(text: str, start: int) -> int:
    """Index of the first unescaped '"' at or after `start`, or -1."""
    while True:
        q = text.find('"', start)
        if q < 0:
            return -1
        k = q - 1
        while text[k] == "\\":  # an odd run of backslashes escapes the quote (the opening quote stops it)
            k -= 1
        if (q - 1 - k) % 2 == 0:
            return q
        start = q + 1


def _label_name(segment: str, lead: str) -> str | None:
    """The label name in the text between two quoted values, e.g. ` , name = ` (lead ",")."""
    s = segment.strip(" \t")
    if not s.startswith(lead) or not s.endswith("="):
        return None
    name = s[len(lead) : -1].strip(" \t")
    return name if name.isidentifier() and name.isascii() else None


def _labels_plain(section: str) -> dict[str, str] | None:
    """Labels of a `{...}` section without backslashes: every '"' then delimits a value, so a
    split finds the values; the text between them must be `{name=`, `,name=`..., `}` or `,}`."""
    parts = section.split('"')
    count = len(parts)
    if count % 2 == 0:
        return None
    labels: dict[str, str] = {}
    lead = "{"
    for k in range(0, count - 1, 2):
        name = _label_name(parts[k], lead)
        if name is None or name in labels:
            return None
        labels[name] = parts[k + 1]
        lead = ","
    tail = parts[-1].strip(" \t")
    if count == 1:
        tail = tail[1:].lstrip(" \t") if tail[:1] == "{" else ""
    elif tail[:1] == ",":
        tail = tail[1:].lstrip(" \t")
    return labels if tail == "}" else None


def _labels_escaped(section: str) -> dict[str, str] | None:
    """Labels of a `{...}` section by walking it: values may hold escaped quotes and backslashes."""
    n = len(section)
    i = 0
    while i < n and section[i] in " \t":
        i += 1
    if i >= n or section[i] != "{":
        return None
    i += 1
    labels: dict[str, str] = {}
    while True:
        while i < n and section[i] in " \t":
            i += 1
        if i >= n:
            return None
        if section[i] == "}":
            return labels if i == n - 1 else None
        eq = section.find("=", i)
        if eq < 0:
            return None
        name = section[i:eq].strip(" \t")
        if not (name.isidentifier() and name.isascii()) or name in labels:
            return None
        i = eq + 1
        while i < n and section[i] in " \t":
            i += 1
        if i >= n or section[i] != '"':
            return None
        close = _closing_quote(section, i + 1)
        if close < 0:
            return None
        value = section[i + 1 : close]
        labels[name] = _unescape(value) if "\\" in value else value
        i = close + 1
        while i < n and section[i] in " \t":
            i += 1
        if i >= n:
            return None
        if section[i] == ",":
            i += 1
        elif section[i] != "}":
            return None


# Label sections repeat from poll to poll (the same series every 50 ms), so their parsed form is
# cached by their exact text; the mappings are read-only because every caller shares them.
_LABEL_CACHE: dict[str, Mapping[str, str]] = {}
_LABEL_CACHE_MAX = 4096
_NO_LABELS: Mapping[str, str] = MappingProxyType({})


def parse_labels(section: str) -> Mapping[str, str] | None:
    """The labels of a `{...}` section (leading blanks allowed), or None if malformed."""
    labels = _LABEL_CACHE.get(section)
    if labels is None:
        parsed = _labels_escaped(section) if "\\" in section else _labels_plain(section)
        if parsed is None:
            return None
        labels = MappingProxyType(parsed)
        if len(_LABEL_CACHE) >= _LABEL_CACHE_MAX:
            _LABEL_CACHE.clear()  # a server inventing new label values every poll: start over
        _LABEL_CACHE[section] = labels
    return labels


def parse_series(rest: str) -> Sample | None:
    """Parse what follows a sample name on its line: `{labels} value [timestamp]`.

    Returns None for a malformed line (the caller skips it).
    """
    close = rest.rfind("}")  # neither the value nor the timestamp can hold a '}'
    if close < 0:
        if rest[:1] not in (" ", "\t") or "{" in rest:
            return None
        labels = _NO_LABELS
    else:
        found = parse_labels(rest[: close + 1])
        if found is None:
            return None
        labels = found
    tokens = rest[close + 1 :].split()
    count = len(tokens)
    # float() would accept "1_0"; the format does not
    if count == 0 or count > 2 or "_" in tokens[0] or (count == 2 and "_" in tokens[1]):
        return None
    try:
        return Sample(labels, float(tokens[0]), float(tokens[1]) / 1000 if count == 2 else None)
    except ValueError:
        return None


def _at_line_start(text: str, i: int) -> bool:
    """Only blanks lie between the previous line feed (or the page start) and `i`."""
    i -= 1
    while i >= 0 and text[i] in " \t":
        i -= 1
    return i < 0 or text[i] == "\n"


def _next_sample_line(text: str, i: int, limit: int) -> int:
    """Start (after leading blanks) of the next sample line of the current group at or after `i`,
    or -1 when the group has ended (page end, or a HELP/TYPE line opening the next family)."""
    while i < limit:
        while text[i] in " \t":
            i += 1
        c = text[i]
        if c == "#":
            if text.startswith(("# HELP ", "# TYPE "), i):
                return -1
        elif c != "\r" and c != "\n":
            return i
        i = text.find("\n", i, limit) + 1  # a comment or blank line: skip it
        if i == 0:
            return -1
    return -1


def scan(page: str | bytes, names: Iterable[str], grouped: bool = True,
         max_series: int = MAX_SERIES) -> dict[str, list[Sample]]:
    """The series of each wanted sample name found on `page`, in page order.

    Names absent from the page are absent from the result. `names` are sample names as they
    appear on sample lines (a gauge's family name, or e.g. `x_total` for a counter).

    `grouped`: the format requires all lines of a metric to form one group, so by default the
    scan stops at the end of the first group of each name (an absent name still costs one pass
    over the page). With False, the whole page is searched for stray lines of each name.

    Raises TooManySeries when one name has more than `max_series` lines: parsing each costs
    microseconds, and a page of a million lines must not cost the picker a second.
    """
    text = page if isinstance(page, str) else bytes(page).decode("utf-8", "replace")
    limit = text.rfind("\n") + 1  # everything after the last line feed is an incomplete line
    found: dict[str, list[Sample]] = {}
    find = text.find
    for name in names:
        size = len(name)
        if not size or "\n" in name:
            continue
        out: list[Sample] = []
        s = find(name, 0, limit)
        while s >= 0:
            j = s + size
            # A line of this name: followed by '{' or a blank, and at a line start (maybe after
            # blanks). Other hits: its HELP/TYPE lines, a longer name, a label value.
            if text[j] not in "{ \t" or not (s == 0 or text[s - 1] == "\n" or _at_line_start(text, s)):
                s = find(name, j, limit)
                continue
            while True:  # this line and the lines of the same name that follow it
                eol = find("\n", j, limit)
                sample = parse_series(text[j:eol])
                if sample is not None:
                    out.append(sample)
                    if len(out) > max_series:
                        raise TooManySeries(f"{name}: more than {max_series} series")
                nxt = _next_sample_line(text, eol + 1, limit)
                # (a bare `name` line is malformed but still part of the group)
                if nxt < 0 or not text.startswith(name, nxt) or text[nxt + size] not in "{ \t\r\n":
                    break
                j = nxt + size
            if grouped:
                break
            s = find(name, eol, limit)
        if out:
            found[name] = out
    return found

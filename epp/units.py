"""Text forms of durations and sizes shared by the command line and the config file.

Only the grammar lives here; each caller adds its own rules (negative, zero, plain numbers) and
wraps the ValueError in its own error type (argparse's, ConfigError).
"""

from __future__ import annotations

import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

_QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
_QUANTITY_UNIT = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
                  "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def go_duration(text: str) -> float:
    """Seconds from a Go-style duration: one or more number+unit parts ("200ms", "1m30s", ".5h").

    Raises ValueError for anything else, a bare number included (callers decide what that means).
    """
    t = text.strip()
    pos, secs = 0, 0.0
    while pos < len(t):
        m = _DURATION_PART.match(t, pos)
        if m is None:
            raise ValueError(f"not a duration: {text!r}")
        secs += float(m.group(1)) * _DURATION_UNIT[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ValueError(f"not a duration: {text!r}")
    return secs


def kube_quantity(text: str) -> float:
    """The amount of a Kubernetes resource quantity ("1Gi", "500M", "250m", "1e3"); may be negative.

    Raises ValueError when the text is not one.
    """
    m = _QUANTITY.match(text.strip())
    if m is None:
        raise ValueError(f"not a quantity: {text!r}")
    return float(m.group(1)) * _QUANTITY_UNIT[m.group(2)]

"""Every profile the precise-prefix benchmark compares is a valid config built on the current default
(a change to the default that one of them cannot follow fails here, not half-way through a run)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_benchmark_profile_loads() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import precise_prefix as pp
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from epp.scheduling.config import load_config

    for name, make in pp.CONFIGS.items():
        cfg = load_config(make())
        types = {s.type for s in cfg.plugins}
        if name == "load-only":
            assert not types & {"prefix-cache-scorer", "no-hit-lru-scorer"}
        elif name.startswith("precise"):
            assert "precise-prefix-cache-scorer" in types and "prefix-cache-scorer" not in types
            nohit = next(s for s in cfg.plugins if s.type == "no-hit-lru-scorer")
            assert nohit.params.prefix_name == "precise-prefix-cache-scorer"

"""Refresh the generated tables in docs/benchmarks.md from the routing-quality results.

    .venv/bin/python bench/routing_doc.py [RESULTS_JSON] [DOC]

Defaults: bench/results/routing_quality.json (what `make bench-full` writes) and docs/benchmarks.md.
Every `<!-- routing:KEY -->` ... `<!-- /routing -->` block of the doc is replaced by the table(s)
bench/routing_quality.py renders for KEY; the prose around the blocks is the doc's own. Keys:
capacity-N, p90-N, goals-N, variants-N and detail85-N (N = cluster size), replicas, admission.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from routing_quality import ROOT, render

BLOCK = re.compile(r"(<!-- routing:(?P<key>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /routing -->)", re.S)


def sections(data: dict) -> dict[str, str]:  # type: ignore[type-arg]
    """The rendered sections by key (headings dropped: the doc has its own)."""
    out: dict[str, str] = {}
    detail: dict[str, list[str]] = {}
    for sec in render(data):
        if not sec.startswith("### "):
            continue
        head, _, body = sec.partition("\n\n")
        size = re.search(r"(\d+) servers", head)
        n = size.group(1) if size else ""
        if head.startswith("### Capacity"):
            out[f"capacity-{n}"] = body
        elif head.startswith("### p90 TTFT by load"):
            out[f"p90-{n}"] = body
        elif head.startswith("### Goals"):
            out[f"goals-{n}"] = body
        elif head.startswith("### Variants"):
            out[f"variants-{n}"] = body
        elif head.startswith("### Picker replicas"):
            out["replicas"] = out.get("replicas", "") + ("\n\n" if "replicas" in out else "") + \
                f"**{head[len('### Picker replicas: '):]}**\n\n{body}"
        elif head.startswith("### Admission"):
            out["admission"] = body
        else:  # a workload's tables at every load: keep the 85% one
            for part in body.split("\n\n**")[0:]:
                part = part if part.startswith("**") else "**" + part
                if ", 85% (" in part.split("\n", 1)[0]:
                    detail.setdefault(n, []).append(part)
    for n, parts in detail.items():
        out[f"detail85-{n}"] = "\n\n".join(parts)
    return out


def main() -> int:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "results" / "routing_quality.json"
    doc = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "docs" / "benchmarks.md"
    secs = sections(json.loads(src.read_text()))
    text = doc.read_text()
    missing: list[str] = []

    def fill(m: re.Match[str]) -> str:
        key = m.group("key")
        if key not in secs:
            missing.append(key)
            return m.group(0)
        return f"{m.group(1)}{secs[key]}\n{m.group(4)}"

    doc.write_text(BLOCK.sub(fill, text))
    if missing:
        print(f"no results for: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

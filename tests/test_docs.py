"""README keeps the two fresh-machine commands and a documentation index naming every file in
docs/; docs/differences.md stays one table with one row per area."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_has_the_fresh_machine_commands() -> None:
    assert "make demo" in README and "make test" in README
    targets = {line.split(":", 1)[0] for line in (ROOT / "Makefile").read_text().splitlines() if ":" in line}
    assert {"demo", "test"} <= targets


def test_readme_index_lists_every_doc() -> None:
    index = README.split("## More documentation", 1)[1].split("\n## ", 1)[0]
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"`docs/{p.name}`" not in index]
    assert not missing, f"README's documentation index lacks {missing}"


def test_differences_is_one_table_without_repeated_rows() -> None:
    lines = (ROOT / "docs" / "differences.md").read_text().splitlines()
    assert sum(1 for line in lines if line.startswith("|---")) == 1
    start = next(i for i, line in enumerate(lines) if line.startswith("|---"))
    rows = lines[start + 1:]
    assert rows and all(r.startswith("| ") for r in rows if r.strip()), "rows after the table"
    areas = [r.split(" | ", 1)[0][2:].strip() for r in rows if r.strip()]
    assert len(areas) == len(set(areas)), sorted(a for a in areas if areas.count(a) > 1)

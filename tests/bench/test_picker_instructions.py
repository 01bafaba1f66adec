"""bench/picker_instructions.py: the callgrind dumps it reads, from a real valgrind run (instrumentation
switched on and dumped by callgrind_control while the program runs, as the bench does to the picker)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import picker_instructions

# waits for "go" files, then does a small and a large amount of work; each step is dumped apart
CHILD = r"""
import os, sys, time
d = sys.argv[1]
def wait(name):
    while not os.path.exists(os.path.join(d, name)):
        time.sleep(0.01)
open(os.path.join(d, "ready"), "w").close()
wait("small"); sum(range(20_000)); open(os.path.join(d, "small.done"), "w").close()
wait("large"); sum(range(2_000_000)); open(os.path.join(d, "large.done"), "w").close()
wait("exit")
"""


def _wait(path: Path, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path.name} never appeared"
        time.sleep(0.05)


@pytest.mark.skipif(shutil.which("valgrind") is None or shutil.which("callgrind_control") is None,
                    reason="valgrind is not installed")
def test_dump_parts_count_each_phase_apart(tmp_path: Path) -> None:
    prefix = str(tmp_path / "cg")
    child = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={prefix}", "--instr-atstart=no",
                              sys.executable, "-c", CHILD, str(tmp_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(tmp_path / "ready")
        picker_instructions._control(child.pid, "-i", "on")
        (tmp_path / "small").touch()
        _wait(tmp_path / "small.done")
        picker_instructions._control(child.pid, "-d")
        (tmp_path / "large").touch()
        _wait(tmp_path / "large.done")
        picker_instructions._control(child.pid, "-d")
        picker_instructions._control(child.pid, "-i", "off")
        (tmp_path / "exit").touch()
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    parts = picker_instructions._part_totals(prefix)
    assert {1, 2} <= set(parts)
    # 100x the loop: the second dump holds far more, and neither is empty
    assert 0 < parts[1] and parts[2] > 20 * parts[1]

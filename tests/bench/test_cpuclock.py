"""bench/cpuclock.py: other processes' CPU to the nanosecond, exited threads included, by process
group, and per live thread by name; read from real child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import cpuclock

# burns ~0.15 s in a thread named "burner" that then exits, then ~0.15 s in a live thread, then waits
CHILD = r"""
import sys, threading, time
def burn(s):
    end = time.thread_time() + s
    while time.thread_time() < end:
        pass
t = threading.Thread(target=burn, args=(0.15,), name="gone"); t.start(); t.join()
def live():
    burn(0.15)
    time.sleep(60)
threading.Thread(target=live, name="burner", daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def child():
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # the live thread's burn
        yield p
    finally:
        p.kill()
        p.wait()


def test_a_process_clock_counts_exited_threads_and_is_not_tick_sized(child: subprocess.Popen) -> None:
    total = cpuclock.process_cpu(child.pid)
    assert total >= 0.29  # both burns, the exited thread's included
    assert total < 5.0
    ticks = total * os.sysconf("SC_CLK_TCK")
    assert abs(ticks - round(ticks)) > 1e-6 or total != round(total, 2)  # finer than a 10 ms tick


def test_a_group_sums_its_processes_and_ignores_others(child: subprocess.Popen) -> None:
    pgid = os.getpgid(child.pid)
    assert pgid == child.pid  # its own session and group
    assert cpuclock.group_cpu([pgid]) == pytest.approx(cpuclock.process_cpu(child.pid), abs=0.02)
    assert cpuclock.group_cpu([2**22 + 12345]) == 0.0  # no such group


def test_threads_by_name_live_ones_only(child: subprocess.Popen) -> None:
    threads = cpuclock.thread_cpu(child.pid)
    # Python 3.11 leaves a thread's OS name as the process's: the live burner has the main's name
    name = Path(f"/proc/{child.pid}/comm").read_text().strip()
    assert set(threads) == {"main", name}
    assert threads[name] >= 0.14
    # the exited thread is gone from the threads, not from the process clock
    assert cpuclock.process_cpu(child.pid) - sum(threads.values()) >= 0.12
    assert cpuclock.thread_cpu(2**22 + 12345) == {}


def test_children_are_found_by_parent(child: subprocess.Popen) -> None:
    assert child.pid in cpuclock.children(os.getpid())
    assert cpuclock.children(child.pid) == []  # it started none

"""CPU time of other processes and threads, to the nanosecond (Linux).

/proc/<pid>/stat counts utime + stime in clock ticks (10 ms here). A path that costs ~1 ms a
request at 16 requests/s gathers ~1.6 ticks a second, and its idle rate, read over 1.5 s, is 0, 1
or 2 ticks: the quantisation alone moved a per-request figure by ±0.4 ms. The kernel's CPU clocks
(clock_gettime on a process's clock id, the one clock_getcpuclockid(3) returns; threads: the
`sum_exec_runtime` in /proc/<pid>/task/<tid>/schedstat) are exact, and the process clock includes
threads that have exited. Every bench that reads another process's CPU uses these; the tick counts
stay as the fallback where the clock cannot be read.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_CPUCLOCK_SCHED = 2  # the clock id's low bits: CPUCLOCK_SCHED, whole process (no per-thread bit)


def _stat_fields(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2:].split()  # fields[0] is field 3 (state)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) `pid` has used, every thread included, exact where the kernel
    lets this process read the clock (same user or root), else from /proc ticks."""
    try:
        return time.clock_gettime_ns(((~pid) << 3) | _CPUCLOCK_SCHED) / 1e9
    except OSError:
        fields = _stat_fields(pid)
        return (int(fields[11]) + int(fields[12])) / _TICK


def _processes() -> Iterable[tuple[int, list[bytes]]]:
    """(pid, /proc stat fields) of every live process; one that exits meanwhile is left out."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                yield int(entry), _stat_fields(int(entry))
            except (OSError, ValueError):
                continue


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (field 4 of /proc/<pid>/stat: the parent)."""
    return [child for child, fields in _processes() if int(fields[1]) == pid]


def group_cpu(pgids: Iterable[int]) -> float:
    """CPU seconds of every live process in the process groups `pgids` (each child of a benchmark
    leads its own group, so a router's workers and helpers are counted with it)."""
    want = set(pgids)
    total = 0.0
    for pid, fields in _processes():
        if int(fields[2]) in want:  # field 5: pgrp
            try:
                total += process_cpu(pid)
            except OSError:
                continue  # exited between the two reads
    return total


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of the live threads of `pid` (/proc/<pid>/task/*/schedstat):
    the main thread is "main", the others their own names (several of one name are summed)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
        except (OSError, ValueError, IndexError):
            continue
        name = "main" if tid == str(pid) else name
        out[name] = out.get(name, 0.0) + ns / 1e9
    return out

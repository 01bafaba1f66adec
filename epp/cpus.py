"""How many CPUs this process may use: the container's CPU limit from its cgroup (v2 `cpu.max`, v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us`, the lowest of its cgroup and their parents), else the
affinity mask. `--workers` defaults to the limit (see `default_workers`).

Where the cgroup files are is read from /proc/self/mountinfo and /proc/self/cgroup, so the limit is
found with or without a cgroup namespace, on cgroup v2, v1 and hybrid hosts. Every read failure
means "no limit found": a wrong guess must never stop the picker from starting.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

# --workers by default: the CPU limit rounded up, at most this many processes (each ~60 MB idle,
# ~7,000 routed requests/s; 8 is past any model-server pool's request rate)
DEFAULT_WORKERS_CAP = 8


@dataclass(frozen=True)
class _Mount:
    root: str  # the cgroup path mounted at `point` ("/" with a cgroup namespace)
    point: str
    v2: bool


def _mounts(mountinfo: str) -> list[_Mount]:
    """cgroup2 mounts and cgroup v1 mounts holding the cpu controller, from mountinfo's text."""
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        fstype, options = tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            out.append(_Mount(fields[3], fields[4], True))
        elif fstype == "cgroup" and "cpu" in options:
            out.append(_Mount(fields[3], fields[4], False))
    return out


def _own_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """This process's (v2, v1 cpu) cgroup paths, from /proc/self/cgroup's text."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "cpu" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _limit_in(directory: str, v2: bool) -> float | None:
    """The CPU limit set on one cgroup directory, in CPUs; None without one."""
    try:
        if v2:
            text = _read(os.path.join(directory, "cpu.max"))
            if text is None:
                return None
            quota, period = text.split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_text = _read(os.path.join(directory, "cpu.cfs_quota_us"))
        period_text = _read(os.path.join(directory, "cpu.cfs_period_us"))
        if quota_text is None or period_text is None or int(quota_text) < 0:
            return None
        return int(quota_text) / int(period_text)
    except (ValueError, ZeroDivisionError):
        return None


def _directories(mount: _Mount, path: str, fs_root: str) -> list[str]:
    """The process's cgroup directory under `mount` and every parent up to the mount point."""
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        rel: list[str] = []  # a path outside what is mounted (no namespace, own cgroup mounted): the top
    else:
        rel = [p for p in path[len(root):].split("/") if p]
    top = fs_root + mount.point
    return [os.path.join(top, *rel[:i]) for i in range(len(rel), -1, -1)]


def cpu_quota(proc: str = "/proc/self", fs_root: str = "") -> float | None:
    """The lowest CPU limit on this process's cgroups, in CPUs (1.5 for `limits.cpu: 1500m`); None
    when none is set or it cannot be read. `proc` and `fs_root` are for tests."""
    mountinfo, own = _read(os.path.join(proc, "mountinfo")), _read(os.path.join(proc, "cgroup"))
    if mountinfo is None or own is None:
        return None
    v2_path, v1_path = _own_paths(own)
    limits = []
    for mount in _mounts(mountinfo):
        path = v2_path if mount.v2 else v1_path
        if path is None:
            continue
        for directory in _directories(mount, path, fs_root):
            limit = _limit_in(directory, mount.v2)
            if limit is not None and limit > 0:
                limits.append(limit)
    return min(limits) if limits else None


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (at least 1)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cpu_limit() -> int:
    """CPUs this process may use: its CPU limit rounded up, at most the affinity mask; the mask
    without a limit; at least 1 (`--workers auto`)."""
    cpus = affinity_cpus()
    quota = cpu_quota()
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def default_workers() -> tuple[int, str]:
    """`--workers` when the flag is not given, and why: the CPU limit rounded up (at most
    DEFAULT_WORKERS_CAP and the affinity mask); 1 when no limit is set, so a picker on a laptop, a
    VM or a pod without `limits.cpu` runs as one process as before."""
    quota = cpu_quota()
    if quota is None:
        return 1, "no CPU limit set (the container's cgroup has none)"
    n = max(1, min(DEFAULT_WORKERS_CAP, affinity_cpus(), math.ceil(quota)))
    return n, f"the container's CPU limit ({quota:g} CPUs, at most {DEFAULT_WORKERS_CAP} workers)"

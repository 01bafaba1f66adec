"""epp.cpus: the container's CPU limit from cgroup files laid out as the kernel does (v2, v1, hybrid,
with and without a cgroup namespace), and what --workers defaults to."""

from __future__ import annotations

from pathlib import Path

import pytest

from epp import cli, cpus

V2_MOUNT = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTS = ("35 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
             "36 30 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n")


def fake(tmp: Path, mountinfo: str, cgroup: str, files: dict[str, str]) -> tuple[str, str]:
    """A /proc/self and a filesystem root holding `files` (paths as the kernel mounts them)."""
    proc = tmp / "proc"
    proc.mkdir(parents=True)
    (proc / "mountinfo").write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n" + mountinfo)
    (proc / "cgroup").write_text(cgroup)
    root = tmp / "root"
    for path, text in files.items():
        f = root / path.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return str(proc), str(root)


def test_v2_in_a_cgroup_namespace(tmp_path: Path) -> None:
    proc, root = fake(tmp_path, V2_MOUNT, "0::/\n", {"/sys/fs/cgroup/cpu.max": "150000 100000\n"})
    assert cpus.cpu_quota(proc, root) == 1.5


def test_v2_without_a_limit(tmp_path: Path) -> None:
    proc, root = fake(tmp_path, V2_MOUNT, "0::/\n", {"/sys/fs/cgroup/cpu.max": "max 100000\n"})
    assert cpus.cpu_quota(proc, root) is None


def test_v2_the_lowest_of_the_cgroup_and_its_parents(tmp_path: Path) -> None:
    # no namespace: the process sees the host's tree; the pod's cgroup holds the limit, the container none
    proc, root = fake(tmp_path, V2_MOUNT, "0::/kubepods/pod1/ctr\n", {
        "/sys/fs/cgroup/cpu.max": "max 100000",
        "/sys/fs/cgroup/kubepods/cpu.max": "800000 100000",
        "/sys/fs/cgroup/kubepods/pod1/cpu.max": "300000 100000",
        "/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000",
    })
    assert cpus.cpu_quota(proc, root) == 3.0


def test_v2_own_cgroup_mounted_at_the_top(tmp_path: Path) -> None:
    # a container's own cgroup mounted as the root, /proc/self/cgroup still naming the host path
    mount = "30 25 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    proc, root = fake(tmp_path, mount, "0::/kubepods/pod1\n", {"/sys/fs/cgroup/cpu.max": "50000 100000"})
    assert cpus.cpu_quota(proc, root) == 0.5
    proc2, root2 = fake(tmp_path / "b", mount, "0::/elsewhere\n", {"/sys/fs/cgroup/cpu.max": "200000 100000"})
    assert cpus.cpu_quota(proc2, root2) == 2.0


def test_v1_cpu_controller(tmp_path: Path) -> None:
    proc, root = fake(tmp_path, V1_MOUNTS, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n", {
        "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
        "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    assert cpus.cpu_quota(proc, root) == 2.5


def test_v1_unlimited_and_hybrid(tmp_path: Path) -> None:
    hybrid = V1_MOUNTS + "37 30 0:32 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    proc, root = fake(tmp_path, hybrid, "3:cpu,cpuacct:/\n0::/\n", {
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000",
    })
    assert cpus.cpu_quota(proc, root) is None


@pytest.mark.parametrize("text", ["", "garbage", "10 0", "-5 100000", "x y"])
def test_unreadable_limits_are_no_limit(tmp_path: Path, text: str) -> None:
    proc, root = fake(tmp_path, V2_MOUNT, "0::/\n", {"/sys/fs/cgroup/cpu.max": text})
    assert cpus.cpu_quota(proc, root) is None


def test_no_proc_files_is_no_limit(tmp_path: Path) -> None:
    assert cpus.cpu_quota(str(tmp_path / "missing"), str(tmp_path)) is None


def test_this_machine_reads_without_error() -> None:
    quota = cpus.cpu_quota()
    assert quota is None or quota > 0
    assert 1 <= cpus.cpu_limit() <= cpus.affinity_cpus()
    n, why = cpus.default_workers()
    assert 1 <= n <= cpus.DEFAULT_WORKERS_CAP and why


def test_default_workers_follow_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 64)
    for quota, expected in [(None, 1), (0.5, 1), (1.0, 1), (1.5, 2), (4.0, 4), (32.0, cpus.DEFAULT_WORKERS_CAP)]:
        monkeypatch.setattr(cpus, "cpu_quota", lambda q=quota: q)
        assert cpus.default_workers()[0] == expected, quota
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 2)
    monkeypatch.setattr(cpus, "cpu_quota", lambda: 6.0)
    assert cpus.default_workers()[0] == 2  # never more than the CPUs it may run on
    assert cpus.cpu_limit() == 2


def test_flag_default_gives_way_where_one_process_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "default_workers", lambda: (4, "the container's CPU limit (4 CPUs)"))
    base = ["--pool-name", "p", "--grpc-port", "9002"]
    opts = cli.parse_args(base)
    assert (opts.workers, opts.workers_why) == (4, "the container's CPU limit (4 CPUs)")
    for extra, why in [(["--grpc-port", "0"], "--grpc-port 0"),
                       (["--ha-enable-leader-election"], "leader election"),
                       (["--mode", "bbr"], "--mode bbr")]:
        opts = cli.parse_args([*base, *extra])
        assert opts.workers == 1 and opts.workers_why.startswith(why), (extra, opts.workers_why)
    # given, the flag wins (and stays refused where it cannot work)
    assert cli.parse_args([*base, "--workers", "1"]).workers == 1
    assert cli.parse_args([*base, "--workers", "3"]).workers_why == ""
    with pytest.raises(SystemExit):
        cli.parse_args([*base, "--workers", "2", "--ha-enable-leader-election"])
    monkeypatch.setattr(cli, "default_workers", lambda: (1, "no CPU limit set"))
    assert cli.parse_args(base).workers == 1


def test_flow_control_keeps_one_process() -> None:
    from epp.__main__ import _flow_control_on

    gated = ("apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
             "featureGates: [flowControl]\nflowControl: {}\n")
    assert _flow_control_on(cli.parse_args(["--pool-name", "p", "--config-text", gated]))
    assert not _flow_control_on(cli.parse_args(["--pool-name", "p"]))
    ungated = gated.replace("featureGates: [flowControl]\n", "")
    assert not _flow_control_on(cli.parse_args(["--pool-name", "p", "--config-text", ungated]))
    assert not _flow_control_on(cli.parse_args(["--pool-name", "p", "--config-text", "kind: [broken"]))

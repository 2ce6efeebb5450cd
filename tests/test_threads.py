"""Torch's CPU threads on a machine shared with other work: a notebook's kernel (and the grader) use the
cores left free, measured from /proc/stat, and an explicit OMP_NUM_THREADS is obeyed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from peftlab import env


def ticks_of(*samples):
    """A fake `cpu_ticks` that returns ``samples`` in turn: (busy, total, cpus)."""
    samples = iter(samples)
    return lambda: next(samples)


@pytest.fixture()
def two_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(env, "cgroup_cpu_limit", lambda: None)  # the machine's own quota, if any, aside


def cgroup_tree(tmp_path, files: dict[str, str], own: str = "0::/\n"):
    """A fake /sys/fs/cgroup with ``files`` (relative path: content) and a /proc/self/cgroup."""
    for name, content in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(content)
    (tmp_path / "fs").mkdir(exist_ok=True)
    (tmp_path / "self").write_text(own)
    return {"root": str(tmp_path / "fs"), "own": str(tmp_path / "self")}


@pytest.mark.parametrize("files, own, limit", [
    ({"cpu.max": "200000 100000\n"}, "0::/\n", 2.0),                       # v2, docker run --cpus 2
    ({"cpu.max": "max 100000\n"}, "0::/\n", None),                         # v2, no quota
    ({"kubepods/pod1/cpu.max": "150000 100000\n", "cpu.max": "max 100000\n"},
     "0::/kubepods/pod1\n", 1.5),                                           # v2, the process's own group first
    ({"cpu.max": "50000 100000\n"}, "0::/gone\n", 0.5),                    # v2, own group unreadable: the root
    ({"system.slice/cpu.max": "100000 100000\n", "system.slice/job.scope/cpu.max": "max 100000\n"},
     "0::/system.slice/job.scope\n", 1.0),                                 # v2, the quota on a parent slice
    ({"a/cpu.max": "300000 100000\n", "a/b/cpu.max": "200000 100000\n"}, "0::/a/b\n", 2.0),  # v2, the smallest
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, "1:cpu:/\n", 3.0),  # v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, "1:cpu:/\n", None),
    ({}, "0::/\n", None),                                                   # nothing to read
    ({"cpu.max": "garbage\n"}, "0::/\n", None),
])
def test_cgroup_cpu_limit_reads_v2_and_v1_quotas(tmp_path, files, own, limit):
    assert env.cgroup_cpu_limit(**cgroup_tree(tmp_path, files, own)) == limit


@pytest.mark.parametrize("limit, cores", [(None, 16), (2.0, 2), (1.5, 2), (0.5, 1), (64.0, 16)])
def test_usable_cores_is_capped_by_the_containers_quota(monkeypatch, limit, cores):
    """A 2-core container on a 16-core host: torch gets 2 threads, not 16."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(env, "cgroup_cpu_limit", lambda: limit)
    assert env.usable_cores() == cores
    ticks = ticks_of((0, 0, 16), (0, 1600, 16))  # the host idle: free cores are the usable ones
    assert env.free_cores(ticks=ticks, sleep=lambda s: None) == cores


@pytest.mark.parametrize("busy, free", [(0, 2), (10, 2), (40, 2), (60, 1), (100, 1), (200, 1)])
def test_free_cores_subtracts_the_busy_share_of_the_machine(two_cores, busy, free):
    # 200 ticks over the sample on 2 CPUs: ``busy`` of them busy (100 = one core's worth)
    assert env.free_cores(ticks=ticks_of((0, 0, 2), (busy, 200, 2)), sleep=lambda s: None) == free


def test_free_cores_counts_the_whole_machine_against_this_process_cores(two_cores):
    # a 16-CPU host, this process pinned to 2: 13 busy CPUs leave 3, of which it may use 2
    assert env.free_cores(ticks=ticks_of((0, 0, 16), (1300, 1600, 16)), sleep=lambda s: None) == 2
    # 15.5 busy CPUs of 16 leave less than one core: still one thread
    assert env.free_cores(ticks=ticks_of((0, 0, 16), (1550, 1600, 16)), sleep=lambda s: None) == 1


def test_free_cores_falls_back_to_all_cores_without_proc_stat(two_cores):
    def unreadable():
        raise OSError("no /proc/stat")

    assert env.free_cores(ticks=unreadable, sleep=lambda s: None) == 2
    assert env.free_cores(ticks=ticks_of((5, 100, 2), (5, 100, 2)), sleep=lambda s: None) == 2  # no time passed


def test_cpu_ticks_reads_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 2 8 70 5 1 2 2 9 0\ncpu0 5 1 4 35 2 0 1 1 0 0\ncpu1 5 1 4 35 3 1 1 1 0 0\nintr 1 2\n")
    # guest (9) is already counted in user; idle + iowait = 75 of 100
    assert env.cpu_ticks(str(stat)) == (25, 100, 2)


def kernel_threads(extra_env: dict[str, str], burner: bool) -> str:
    """torch's thread count after `import peftlab` in a process that looks like a notebook kernel."""
    code = ("import sys; sys.modules['ipykernel'] = type(sys)('ipykernel')\n"
            "import peftlab, torch; print(torch.get_num_threads(), peftlab.env.FITTED)")
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    burn = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if burner else None
    try:
        if burn:
            subprocess.run([sys.executable, "-c", "import time; time.sleep(0.5)"], check=True)
        return subprocess.run([sys.executable, "-c", code], env={**environ, **extra_env}, capture_output=True,
                              text=True, check=True, timeout=120).stdout.strip()
    finally:
        if burn:
            burn.kill()
            burn.wait()


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) != 2 or not os.path.exists("/proc/stat"),
                    reason="measured on the 2-core reference machine")
def test_a_kernel_on_a_busy_machine_runs_one_thread():
    """With a CPU burner on one of two cores, the kernel's torch gets one thread; an explicit
    OMP_NUM_THREADS (what the grader sets) is kept."""
    assert kernel_threads({}, burner=True).startswith("1 {'threads': 1, 'cores': 2}")
    assert kernel_threads({"OMP_NUM_THREADS": "2"}, burner=True) == "2 None"


def test_outside_a_kernel_nothing_is_changed():
    code = "import os, peftlab; print(os.environ.get('OMP_NUM_THREADS'), peftlab.env.FITTED)"
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True,
                          check=True).stdout.strip() == "None None"


@pytest.mark.parametrize("value, cap", [("3", 3), ("1", 1), ("", None), ("0", None), ("-2", None), ("four", None)])
def test_thread_cap_reads_a_positive_omp_num_threads(monkeypatch, value, cap):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert env.thread_cap() == cap

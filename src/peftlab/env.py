"""Where the notebook runs: versions, Colab detection, available accelerators."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import sys
import time
from pathlib import Path

# The distributions a learner (or an instructor reading a bug report) wants to see first.
REPORTED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "numpy",
    "matplotlib",
    "ipywidgets",
    "peftlab",
)


def in_colab() -> bool:
    """True inside Google Colab (its runtime module is imported before any user code runs)."""
    return "google.colab" in sys.modules


def package_versions(names=REPORTED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution, or None when it is not installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_summary() -> str:
    """One line on the accelerator torch sees, or that it runs on the CPU."""
    import torch

    if torch.cuda.is_available():
        from peftlab import hardware

        device = hardware.current_device()
        major, minor = device.capability
        return (f"CUDA: {device.name}, {device.total_memory / hardware.GiB:.1f} GiB, compute capability "
                f"{major}.{minor}, {hardware.precision(device)}" + (f", {device.count} GPUs" if device.count > 1 else ""))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "Apple MPS"
    threads = torch.get_num_threads()
    busy = f", {FITTED['cores'] - FITTED['threads']} of {FITTED['cores']} cores busy with other work at start" if (
        FITTED and FITTED["threads"] < FITTED["cores"]) else ""
    return f"CPU only ({threads} thread{'s' * (threads != 1)}{busy})"


def cpu_ticks(stat: str = "/proc/stat") -> tuple[int, int, int]:
    """(busy, total, cpus): the machine's CPU time since boot in ticks, and its number of CPUs."""
    with open(stat) as f:
        lines = f.read().splitlines()
    fields = [int(v) for v in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
    idle = fields[3] + fields[4]
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu") and line[3:4].isdigit())
    return sum(fields) - idle, sum(fields), cpus


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup", own: str = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's control group in cores (``docker run --cpus 2``, a Kubernetes
    CPU limit, a systemd slice's CPUQuota), or None where there is none or it cannot be read.

    cgroup v2: the smallest ``cpu.max`` ("QUOTA PERIOD", or "max PERIOD" for none) of the process's
    own group and every group above it, up to the root (inside a container the group is usually the
    root); v1: ``cpu.cfs_quota_us`` (-1: none) over ``cpu.cfs_period_us``. A container sees the host's
    cores in its affinity mask and /proc/stat, so without this a torch kernel in a 2-core container
    on a 64-core host would run 64 threads."""

    def cores(quota: str, period: str) -> float | None:
        try:
            quota_us, period_us = int(quota), int(period)
        except ValueError:  # "max", or unreadable
            return None
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None

    base = Path(root)
    group = None
    try:
        lines = Path(own).read_text().splitlines()
        group = next((line[3:].strip("/") for line in lines if line.startswith("0::")), None)
    except OSError:
        pass
    limits = []
    folder = base / group if group else base
    while True:  # the own group, then each parent up to the root
        try:
            limits.append(cores(*(folder / "cpu.max").read_text().split()[:2]))
        except (OSError, TypeError):  # no such file, or not two fields
            pass
        if folder == base or base not in folder.parents:
            break
        folder = folder.parent
    limits = [limit for limit in limits if limit is not None]
    if limits:
        return min(limits)
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        try:
            return cores((base / name / "cpu.cfs_quota_us").read_text(), (base / name / "cpu.cfs_period_us").read_text())
        except OSError:
            continue
    return None


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, capped by its control group's CPU
    quota rounded up (1.5 cores of quota: 2 threads, which the quota throttles together)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return cores


def free_cores(sample_s: float = 0.1, ticks=cpu_ticks, sleep=time.sleep) -> int:
    """How many cores other work leaves this process now (at least 1): the machine's idle cores over
    ``sample_s`` seconds, at most the cores it may run on. Where /proc/stat cannot be read, all of those."""
    available = usable_cores()
    try:
        busy0, total0, cpus = ticks()
        sleep(sample_s)
        busy1, total1, _ = ticks()
    except (OSError, ValueError, IndexError):
        return available
    if total1 <= total0:
        return available
    cpus = max(cpus, 1)
    busy_cores = (busy1 - busy0) / (total1 - total0) * cpus
    return max(1, min(available, int(cpus - busy_cores + 0.5)))


# What `fit_threads` decided in this process: {"threads": n, "cores": available}, or None.
FITTED: dict[str, int] | None = None


def fit_threads() -> int | None:
    """Give torch as many CPU threads as there are free cores, unless the thread count was set.

    torch's OpenMP runs one thread per core and makes every thread wait for the others at the end of
    each operation. When other work holds a core, the waits take a scheduler slice each: notebook 03
    took 10 min instead of 38 s on 2 cores with one busy, and 51 s with one thread. So a kernel that starts on a busy machine uses only the free cores. An explicit
    ``OMP_NUM_THREADS`` (the grader sets one per worker) is left alone. Returns the count set, or None.
    """
    global FITTED
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return None
    import torch  # the setup cell imports it next anyway (`print_versions`)

    threads = free_cores()
    torch.set_num_threads(threads)
    FITTED = {"threads": threads, "cores": usable_cores()}
    return threads


def thread_cap() -> int | None:
    """The thread count set in ``OMP_NUM_THREADS`` (a positive integer), else None."""
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value > 0 else None


def print_versions() -> None:
    """Print Python, the course's packages and the device, so a bug report has them."""
    where = "Google Colab" if in_colab() else platform.platform(terse=True)
    print(f"Python {platform.python_version()} on {where}")
    for name, version in package_versions().items():
        print(f"  {name:<13} {version or 'not installed'}")
    print(f"  device        {device_summary()}")


def cache_dir() -> Path:
    """Folder for converted models: ``$PEFTLAB_CACHE`` or ``~/.cache/peftlab``."""
    return Path(os.environ.get("PEFTLAB_CACHE") or Path.home() / ".cache" / "peftlab")


SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
SMOLLM2_COMPLETE_MARKER = "peftlab-conversion.json"


def smollm2_cached() -> bool:
    """Whether SmolLM2 has been converted into the cache (without importing torch)."""
    return (cache_dir() / SMOLLM2_CACHE_NAME / SMOLLM2_COMPLETE_MARKER).is_file()

"""Where the notebook runs: versions, Colab detection, available accelerators."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
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
    return f"CPU only ({torch.get_num_threads()} threads)"


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

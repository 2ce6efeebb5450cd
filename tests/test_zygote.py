"""Warm kernels (`autograder/zygote.py`): forked from a process that imported the course's libraries
once, they must look to the student's code exactly like a kernel started from nothing, in the same
sandbox, and carry nothing of another submission."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from notebooks import ROOT

sys.path.insert(0, str(ROOT))
from autograder import kernel as kernel_module  # noqa: E402
from autograder import sandbox  # noqa: E402
from autograder.kernel import Kernel, Limits, close_zygotes, zygote_for  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="warm kernels need Linux's fork")
SANDBOX = sandbox.available()

LOOK = r'''
import json as _json, os as _os, resource as _resource, sys as _sys, random as _random
print(_json.dumps({
    "path": _sys.path, "cwd": _os.getcwd(), "uid": _os.getuid(), "gid": _os.getgid(), "argv0": _sys.argv[0],
    "env": {k: v for k, v in _os.environ.items() if k != "JUPYTER_RUNTIME_DIR"},
    "limits": {name: _resource.getrlimit(getattr(_resource, name)) for name in ("RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_CORE")},
    "random": _random.random(), "executable": _sys.executable, "dont_write_bytecode": _sys.dont_write_bytecode,
    "grader_modules": sorted(m for m in _sys.modules if m.split(".")[0] in ("autograder", "nbgrader") or m == "peftlab.reference"),
    "threads": __import__("torch").get_num_threads(), "pid1": _os.getpid() == 1 or not _os.path.exists("/proc/1/cmdline"),
    "mpl_config": __import__("matplotlib").get_configdir(),
    "prompt": get_ipython().execution_count}))
'''


def started(tmp_path: Path, name: str, *, warm: bool, limits: Limits | None = None) -> Kernel:
    kernel = Kernel(tmp_path / name / "k", limits or Limits(), use_sandbox=SANDBOX, warm=warm)
    kernel.start()
    return kernel


def look(kernel: Kernel) -> dict:
    run = kernel.run(LOOK)
    assert run.status == "ok", run.outputs
    return json.loads("".join(o.get("text", "") for o in run.outputs))


@pytest.fixture()
def fresh_zygotes():
    close_zygotes()
    kernel_module._FAILED.clear()
    yield
    close_zygotes()
    kernel_module._FAILED.clear()


def test_a_warm_kernel_looks_like_a_cold_one_and_starts_in_a_second(tmp_path, fresh_zygotes):
    seen, timing = {}, {}
    for name, warm in (("cold", False), ("warm-1", True), ("warm-2", True)):
        kernel = started(tmp_path, name, warm=warm)
        try:
            assert kernel.warm == warm
            clock = time.monotonic()
            assert kernel.run("import torch, matplotlib.pyplot\nfrom transformers import LlamaForCausalLM").status == "ok"
            timing[name] = time.monotonic() - clock
            seen[name] = look(kernel)
        finally:
            kernel.shutdown()
    cold, warm = seen["cold"], seen["warm-1"]
    for key in cold:
        if key != "random":
            assert warm[key] == cold[key], f"{key}: warm {warm[key]!r} / cold {cold[key]!r}"
    assert cold["grader_modules"] == [], "neither kernel holds the grader's code or the tests' reference"
    assert len({seen[n]["random"] for n in seen}) == 3, "each warm kernel reseeds Python's generator"
    assert timing["warm-2"] < 1.0 < timing["cold"], timing  # the imports were done once, in the zygote


def _memory_holds(pid: int, needle: bytes) -> bool:
    """Whether any readable private mapping of process ``pid`` contains ``needle``."""
    found = False
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if not fields[1].startswith("r") or (len(fields) > 5 and fields[5].startswith("[v")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            if needle in chunk:
                found = True
                break
    return found


def test_no_kernel_carries_another_students_job(tmp_path, fresh_zygotes):
    marker = f"s{uuid.uuid4().hex[:15]}"  # short: the socket path has a length limit
    first = started(tmp_path, marker, warm=True)  # the marker is in its folder, its sandbox's paths and env
    try:
        assert first.warm
        zygote = next(iter(kernel_module._ZYGOTES.values()))
        assert _memory_holds(first.pid, marker.encode()), "the scan finds the marker where it is"
        assert not _memory_holds(zygote.proc.pid, marker.encode()), "the zygote never reads a request"
    finally:
        first.shutdown()
    second = started(tmp_path, "next-student", warm=True)
    try:
        run = second.run("import re\n"
                         f"needle = {marker[:8]!r} + {marker[8:]!r}\n"
                         "found = False\n"
                         "with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb', buffering=0) as mem:\n"
                         "    for line in maps:\n"
                         "        f = line.split()\n"
                         "        if not f[1].startswith('r') or (len(f) > 5 and f[5].startswith('[v')):\n"
                         "            continue\n"
                         "        a, b = (int(x, 16) for x in f[0].split('-'))\n"
                         "        try:\n"
                         "            mem.seek(a); chunk = mem.read(b - a)\n"
                         "        except (OSError, ValueError, OverflowError):\n"
                         "            continue\n"
                         "        found = found or chunk.count(needle.encode()) > 1\n"  # the needle itself is once in this cell
                         "print('FOUND' if found else 'CLEAN')")
        assert run.status == "ok" and "CLEAN" in "".join(o.get("text", "") for o in run.outputs), run.outputs
    finally:
        second.shutdown()


def test_limits_stop_a_warm_kernel_and_the_next_one_starts_warm(tmp_path, fresh_zygotes):
    limits = Limits(cell_cpu_seconds=2, cell_wall_seconds=20, memory_mb=3000)
    spinner = started(tmp_path, "spin", warm=True, limits=limits)
    try:
        run = spinner.run("while True:\n    pass")
        assert run.status == "timeout" and "CPU time" in run.reason, (run.status, run.reason)
        assert spinner.run("print('still here')").status == "ok", "an interrupted kernel answers again"
    finally:
        spinner.shutdown()
    hoarder = started(tmp_path, "hoard", warm=True, limits=limits)
    try:
        run = hoarder.run("import torch\nhoard = [torch.ones(2**25) for _ in range(100)]")  # 12.8 GB
        errors = [o.get("ename") for o in run.outputs if o.get("output_type") == "error"]
        assert (run.status == "dead" and "memory limit" in run.reason) or "MemoryError" in errors or "RuntimeError" in errors, \
            (run.status, run.reason, errors)
    finally:
        hoarder.shutdown()
    assert not hoarder.alive()
    again = started(tmp_path, "after", warm=True)
    try:
        assert again.warm and again.run("print(1)").status == "ok"
    finally:
        again.shutdown()


def test_warm_kernels_keep_the_reference_hidden(tmp_path, fresh_zygotes):
    if not SANDBOX:
        pytest.skip("the reference is hidden by the sandbox's mounts")
    kernel = started(tmp_path, "ref", warm=True)
    try:
        run = kernel.run("import sys\nprint('preloaded' if 'peftlab.reference' in sys.modules else 'absent')\n"
                         "import peftlab.reference as r\n"
                         "try:\n    r.peft_lora_count(None)\nexcept r.ReferenceUnavailable:\n    print('stub')")
        text = "".join(o.get("text", "") for o in run.outputs)
        assert run.status == "ok" and "absent" in text and "stub" in text, run.outputs
    finally:
        kernel.shutdown()


def test_a_zygote_that_would_carry_the_reference_refuses_to_serve(tmp_path):
    code = ("import sys, peftlab.reference\n"
            "from autograder import zygote\n"
            f"sys.exit(zygote.serve({str(tmp_path / 'z.sock')!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and "REFUSED" in done.stdout and "peftlab.reference" in done.stdout, done.stdout


def test_without_a_zygote_kernels_start_cold(tmp_path, fresh_zygotes, monkeypatch):
    def broken(env, timeout=180):
        raise RuntimeError("the zygote did not start: no answer")

    monkeypatch.setattr(kernel_module, "Zygote", broken)
    kernel = started(tmp_path, "cold", warm=True)
    try:
        assert not kernel.warm and kernel.run("print(1)").status == "ok"
    finally:
        kernel.shutdown()
    assert zygote_for({"HOME": "/x"}) is None, "a failed environment is not tried again for every job"

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
from autograder import launch  # noqa: E402
from autograder import sandbox  # noqa: E402
from autograder.kernel import Kernel, Limits  # noqa: E402
from autograder.launch import close_zygotes, zygote_for  # noqa: E402

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
    "prompt": get_ipython().execution_count,
    # what libraries set up for the running shell when they are imported
    "events": {e: sorted(f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', '?')}" for f in fs)
               for e, fs in get_ipython().events.callbacks.items()},
    "comm_targets": sorted(__import__("comm").get_comm_manager().targets),
    "tqdm_auto": [c.__module__ for c in __import__("tqdm.auto").auto.tqdm.__mro__],
    "mpl_repl_hook": str(__import__("matplotlib.pyplot").pyplot._REPL_DISPLAYHOOK)}))
'''


def started(tmp_path: Path, name: str, *, warm: bool, limits: Limits | None = None, left_out=()) -> Kernel:
    kernel = Kernel(tmp_path / name / "k", limits or Limits(), use_sandbox=SANDBOX, warm=warm, left_out=left_out)
    kernel.start()
    return kernel


def look(kernel: Kernel) -> dict:
    run = kernel.run(LOOK)
    assert run.status == "ok", run.outputs
    return json.loads("".join(o.get("text", "") for o in run.outputs))


@pytest.fixture()
def fresh_zygotes():
    close_zygotes()
    launch._FAILED.clear()
    yield
    close_zygotes()
    launch._FAILED.clear()


def test_a_warm_kernel_looks_like_a_cold_one_and_starts_in_a_second(tmp_path, fresh_zygotes):
    seen, timing = {}, {}
    for name, warm in (("cold", False), ("warm-1", True), ("warm-2", True)):
        kernel = started(tmp_path, name, warm=warm)
        try:
            assert kernel.warm == warm
            clock = time.monotonic()
            assert kernel.run("import torch, matplotlib.pyplot\nfrom transformers import LlamaForCausalLM").status == "ok"
            timing[name] = time.monotonic() - clock
            assert kernel.run("import ipywidgets, tqdm.auto, peftlab.checks, peftlab.widgets").status == "ok"
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
        zygote = next(iter(launch._ZYGOTES.values()))
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
    # Its own CPU limit: touching 2.4 GB of fresh pages takes about 5.4 s of CPU on 2 cores.
    hoarder = started(tmp_path, "hoard", warm=True, limits=Limits(cell_cpu_seconds=60, cell_wall_seconds=120, memory_mb=3000))
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


LEFT_OUT = r'''
import importlib, importlib.util, json, os, sys, types
import transformers.utils
out = {"loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("peft", "bitsandbytes"))}
for name in ("peft", "bitsandbytes"):
    try:
        importlib.import_module("".join(name))
        out[name] = "imported"
    except ImportError as exc:
        out[name] = str(exc)
site = os.path.dirname(os.path.dirname(transformers.__file__))
out["files"] = sorted(os.listdir(os.path.join(site, "peft")))
fake = types.ModuleType("peft")  # a package made by hand over the real folder: nothing there to find
fake.__path__ = [os.path.join(site, "peft")]
sys.modules["peft"] = fake
try:
    importlib.import_module("peft.tuners.lora.layer")
    out["by_hand"] = "imported"
except ImportError as exc:
    out["by_hand"] = type(exc).__name__
del sys.modules["peft"]
out["transformers_sees_peft"] = transformers.utils.is_peft_available()
from transformers import AutoModelForCausalLM  # from_pretrained asks whether the folder holds an adapter
from peftlab.models import tiny_llama
tiny_llama(seed=0).save_pretrained("/tmp/tiny")
out["model"] = type(AutoModelForCausalLM.from_pretrained("/tmp/tiny")).__name__
print(json.dumps(out))
'''


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
def test_a_notebook_can_run_without_the_libraries_it_rebuilds(tmp_path, fresh_zygotes, warm):
    """Notebooks 02-05 are graded with peft and bitsandbytes left out of the kernel: no import, by any
    name or path, reaches their files, while transformers still loads the real model; a kernel that
    needs them (06, 08) imports them."""
    if not SANDBOX:
        pytest.skip("the libraries are left out by the sandbox's mounts")
    kernel = started(tmp_path, "without", warm=warm, left_out=["bitsandbytes", "peft"])
    try:
        run = kernel.run(LEFT_OUT)
        assert run.status == "ok", run.outputs
        out = json.loads("".join(o.get("text", "") for o in run.outputs if o.get("output_type") == "stream"))
    finally:
        kernel.shutdown()
    assert kernel.warm == warm and out["loaded"] == [], out
    for name in ("peft", "bitsandbytes"):
        assert out[name].startswith(f"{name} is not available while this notebook is graded"), out
    assert out["files"] == ["__init__.py"] and out["by_hand"] == "ModuleNotFoundError", out
    assert out["transformers_sees_peft"] is True and out["model"] == "LlamaForCausalLM", out
    kernel = started(tmp_path, "with", warm=warm)
    try:
        run = kernel.run("import peft, bitsandbytes\nprint(peft.__version__)")
        assert run.status == "ok", run.outputs
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

    monkeypatch.setattr(launch, "Zygote", broken)
    kernel = started(tmp_path, "cold", warm=True)
    try:
        assert not kernel.warm and kernel.run("print(1)").status == "ok"
    finally:
        kernel.shutdown()
    assert zygote_for({"HOME": "/x"}) is None, "a failed environment is not tried again for every job"


@pytest.mark.parametrize("failure", ["the spawn fails", "the child dies before its kernel answers"])
def test_a_warm_start_that_fails_costs_a_cold_start_not_the_submission(tmp_path, fresh_zygotes, monkeypatch, failure):
    original = launch.Zygote.spawn

    def spawn(self, argv, env, cwd):
        if failure == "the spawn fails":
            raise OSError(12, "Cannot allocate memory")
        # The sandbox runs as asked, but what it launches has no connection file: the child exits.
        return original(self, argv[:argv.index("--") + 1] + [sys.executable, "-m", "no_such_module"], env, cwd)

    monkeypatch.setattr(launch.Zygote, "spawn", spawn)
    clock = time.monotonic()
    kernel = started(tmp_path, "fallback", warm=True)
    try:
        assert not kernel.warm, "the kernel that runs is the cold one"
        assert any("warm kernel did not start" in n and "started cold" in n for n in kernel.notes), kernel.notes
        assert kernel.run("print(6 * 7)").status == "ok"
        assert time.monotonic() - clock < 60, "a dead child is noticed at once, not after the 120 s start timeout"
    finally:
        kernel.shutdown()
    assert not kernel.alive()


def test_the_zygotes_answer_to_a_refused_fork_is_an_error_not_a_pid():
    import socket

    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(b"FAILED fork: [Errno 12] Cannot allocate memory\n")
        with pytest.raises(RuntimeError, match="could not fork") as refused:
            launch.WarmProcess(ours, timeout=5)
        assert refused.value.answer.startswith("fork:")
    finally:
        ours.close()
        theirs.close()


def test_whatever_the_preload_asks_of_the_shell_is_asked_again_in_each_kernel():
    """A module that looks for the running shell when imported (ipywidgets registers its comm targets)
    finds none in the zygote: each one that asks must be set up again after the kernel's shell exists
    (`AFTER_SHELL`), or only read something that is the same without a shell (tqdm picks its notebook
    bars from which of ipykernel's modules are loaded, and rules out only Qt and Spyder consoles)."""
    code = r'''
import importlib, json, sys, warnings
import IPython.core.getipython as g
asked = []
def tracer(frame, event, arg):
    if event == "call" and frame.f_code is g.get_ipython.__code__:
        asked.append(frame.f_back.f_globals.get("__name__"))
from autograder import zygote
warnings.simplefilter("ignore")
sys.setprofile(tracer)
for name in zygote.PRELOAD:
    importlib.import_module(name)
sys.setprofile(None)
print(json.dumps({"asked": sorted(set(asked)), "unsafe": zygote.unsafe_modules(),
                  "tqdm": sys.modules["tqdm.auto"].tqdm.__mro__[1].__module__ if "tqdm.auto" in sys.modules else None}))
'''
    env = {**__import__("os").environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    from autograder.zygote import AFTER_SHELL

    unexplained = [m for m in seen["asked"] if m not in AFTER_SHELL and m != "tqdm.autonotebook"]
    assert not unexplained, f"preloaded modules ask for the shell at import and are not set up again: {unexplained}"
    assert seen["unsafe"] == []
    assert seen["tqdm"] in (None, "tqdm.notebook"), "transformers' progress bars are the notebook's, as in a cold kernel"

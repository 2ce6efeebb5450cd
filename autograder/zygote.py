"""A warm start for students' kernels: a process that has imported the course's libraries once and
forks a fresh kernel for each submission.

    python -m autograder.zygote SOCKET     # started by `autograder.kernel.Zygote`, one per grading worker

A kernel started from nothing spends most of a short notebook importing torch, transformers, peft
and matplotlib (7 to 9 s of the 11 s that notebook 01 takes to grade on 2 cores). This process does
those imports once, with the environment every kernel gets, and then only waits: for each connection
on ``SOCKET`` it forks, and the child (not this process) reads the request, builds the same sandbox as
a cold start (`autograder.sandbox.main`, unchanged: new namespaces, a root built from nothing, the
dropped id and the limits) and runs ipykernel in it, as ``python -m ipykernel_launcher`` would.

What a kernel inherits is this process's memory, so it holds nothing a student may not see:

- only public libraries and the student-facing helper modules are imported (`PRELOAD`); the tests'
  reference code and the grader's judge never are (`NEVER`, checked before the first fork);
- modules that set themselves up for a running shell when imported (`AFTER_SHELL`: ipywidgets'
  comm targets) do it again in each kernel once its shell exists;
- it never reads a request: each child reads its own, so no kernel can find another student's name,
  folder or job in its memory;
- it runs no computation (no thread pool is started: it forks only while it has a single thread),
  and each child reseeds the generators a fresh process would seed from the system's entropy.

To the grader a warm kernel's launcher is the child: its process group and tree are watched and
killed as a cold kernel's are. The zygote writes ``PID <pid>`` on the connection after the fork and
``EXIT <code>`` when the child ends, then closes it.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import sys

from autograder import sandbox

# What the notebooks import (their imports cells), public code only. A module missing here is simply
# imported by the kernel itself, as a cold kernel does. ipykernel comes first: libraries look at which
# of its modules are loaded when they are imported (tqdm.auto picks its notebook bars that way), and
# in a cold kernel they always are.
PRELOAD = ("ipykernel.kernelapp", "ipykernel.zmqshell", "torch", "transformers",
           "transformers.models.llama.modeling_llama", "safetensors.torch", "matplotlib", "matplotlib.pyplot", "IPython.display", "peftlab.hardware",
           "peftlab.models", "peftlab.plots", "peftlab.probe", "peftlab.quant", "peftlab.task", "peftlab.training")
# peft and bitsandbytes are not preloaded: notebooks 02-05 leave them out of the kernel altogether
# (`autograder.oracles.left_out`), which a library already in a forked kernel's memory would defeat;
# the notebooks that use them (06, 08) import them themselves, about 1.2 s.
# Never in a kernel's memory: the tests' reference code (hidden in the sandbox), the grader's own code.
NEVER = ("peftlab.reference", "autograder.judge", "autograder.oracles", "autograder.execute", "autograder.grade",
         "autograder.kernel", "autograder.launch", "autograder.prepare", "autograder.dispatch", "autograder.score",
         "nbgrader")
# Modules that set themselves up for the running shell when they are imported, and the function that
# does it. Imported here (ipywidgets comes with transformers, for tqdm's notebook bars) they find no
# shell, so each kernel runs that function once its shell exists (`_after_shell`), as a cold kernel's
# import would have. `tests/test_zygote.py` fails when a preloaded module asks for the shell and is not
# here. peftlab.checks and peftlab.widgets are not preloaded at all: each kernel imports them itself.
AFTER_SHELL = {"ipywidgets": "_handle_ipython", "peftlab.checks": "_watch"}
MAX_REQUEST = 1 << 20


def _die_with_parent() -> None:
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def preload() -> list[str]:
    """Import `PRELOAD`; the names that could not be imported."""
    import warnings

    missing = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - bitsandbytes may be absent or broken: the kernel tries itself
                missing.append(name)
    return missing


def unsafe_modules() -> list[str]:
    return sorted(m for m in sys.modules if any(m == n or m.startswith(n + ".") for n in NEVER))


def threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def _read_request(conn: socket.socket) -> dict:
    data = b""
    conn.settimeout(30)
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk or len(data) + len(chunk) > MAX_REQUEST:
            raise ValueError("no complete request")
        data += chunk
    return json.loads(data)


def _launch(command: list[str]) -> None:
    """Inside the sandbox, in place of ``exec(command)``: what ``python -m ipykernel_launcher -f FILE``
    does, in this already warm interpreter."""
    import random
    import runpy

    connection = command[command.index("-f") + 1]
    sys.argv = [command[0], "-f", connection]
    sys.path[:] = [os.getcwd()] + BASE_PATH  # as the interpreter starts `-m`: the launcher removes it again
    sys.path_importer_cache.clear()  # the folders' listings cached by the zygote's imports: found again
    importlib.invalidate_caches()
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "matplotlib" in sys.modules:  # its folders were found with the zygote's environment: look again
        import matplotlib

        for name, log in (("get_configdir", "CONFIGDIR=%s"), ("get_cachedir", "CACHEDIR=%s")):
            found = getattr(matplotlib, name)  # memoised by matplotlib._logged_cached: a fresh memo
            if hasattr(found, "__wrapped__") and hasattr(matplotlib, "_logged_cached"):
                setattr(matplotlib, name, matplotlib._logged_cached(log, found.__wrapped__))
    if "torch" in sys.modules:  # its OpenMP pool and, in builds with MKL, MKL's: the kernel's count
        sys.modules["torch"].set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or 1)))
    # numpy's BLAS read its thread count at the zygote's import (one): a warm kernel's numpy matrix
    # products use one thread, which only makes them slower; the graded work runs in torch.
    _after_shell()
    for name in [m for m in sys.modules if m == "autograder" or m.startswith("autograder.")]:
        del sys.modules[name]  # as in a cold kernel (this code keeps what it uses)
    runpy.run_module("ipykernel_launcher", run_name="__main__", alter_sys=True)


def _answer(conn: socket.socket, line: str) -> None:
    try:
        conn.sendall(line.encode() + b"\n")
    except OSError:
        pass


def _after_shell() -> None:
    """Have the kernel's app, once it has made the shell, run `AFTER_SHELL`'s set-ups; the app's class
    is restored at its first call, so the student's kernel sees ipykernel's own method."""
    from ipykernel.kernelapp import IPKernelApp

    original = IPKernelApp.__dict__["init_shell"]

    def init_shell(app):
        IPKernelApp.init_shell = original
        original(app)
        for name, setup in AFTER_SHELL.items():
            module = sys.modules.get(name)
            if module is not None and callable(getattr(module, setup, None)):
                getattr(module, setup)()

    IPKernelApp.init_shell = init_shell


def _child(conn: socket.socket, listener: socket.socket) -> int:
    listener.close()
    os.setsid()  # its own process group, which the grader signals and kills, as a cold launcher's
    request = _read_request(conn)
    conn.close()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 4096)
    os.environ.clear()
    os.environ.update({**IMPORT_ENV, **request["env"]})
    os.chdir(request["cwd"])
    return sandbox.main(request["argv"], run=_launch)


BASE_PATH: list[str] = []
IMPORT_ENV: dict[str, str] = {}  # what the imports set in the environment (torch: TORCHINDUCTOR_CACHE_DIR)


def serve(path: str) -> int:
    global BASE_PATH, IMPORT_ENV
    _die_with_parent()
    BASE_PATH = [p for p in sys.path[1:]]  # without this process's own first entry (its working folder)
    before = dict(os.environ)
    missing = preload()
    IMPORT_ENV = {k: v for k, v in os.environ.items() if before.get(k) != v and k != "MPLCONFIGDIR"}
    del before  # what a kernel inherits holds as little of this process as it can
    unsafe = unsafe_modules()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(16)
    if unsafe or threads() != 1:
        print(f"REFUSED unsafe={unsafe} threads={threads()}", flush=True)
        return 1
    print(f"READY {json.dumps(missing)}", flush=True)
    children: dict[int, socket.socket] = {}
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [], 0.1)
        if sys.stdin in readable and not sys.stdin.buffer.read1(1):
            break  # the worker closed our stdin (or died): stop, which stops every kernel too
        if listener in readable:
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            if threads() != 1:  # a fork with other threads alive copies locks held mid-operation
                _answer(conn, f"FAILED threads={threads()}")
                conn.close()
                continue
            try:
                pid = os.fork()
            except OSError as exc:  # no memory or no process left for a fork: this kernel starts cold
                _answer(conn, f"FAILED fork: {exc}")
                conn.close()
                continue
            if pid == 0:
                code = 127
                children.clear()  # other kernels' pids and connections (closed by the child anyway)
                try:
                    code = _child(conn, listener)
                except BaseException:  # noqa: BLE001 - the grader sees the exit code
                    pass
                os._exit(code)
            children[pid] = conn
            _answer(conn, f"PID {pid}")
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                _answer(conn, f"EXIT {os.waitstatus_to_exitcode(status)}")
                conn.close()
    for pid in children:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))

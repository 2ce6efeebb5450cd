"""How a grading kernel is launched: its sandbox (what it may read, what is covered: the tests'
reference code, the libraries a notebook leaves out), its environment, and the warm `Zygote` it can
be forked from instead of starting a fresh interpreter. `autograder.kernel.Kernel` uses these."""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from autograder import sandbox

ROOT = Path(__file__).resolve().parent.parent


def kernel_spec(folder: Path, limits, *, use_sandbox: bool, expose: list[str], threads: int,
                left_out: list[str]) -> tuple[str, dict, str]:
    """A kernel spec in ``folder`` whose command runs ipykernel through `autograder/sandbox.py` under
    ``limits`` (`autograder.kernel.Limits`), and the kernel's environment and working folder:
    (kernel spec folder, env, cwd)."""
    runtime = folder / "runtime"
    runtime.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    launcher = [python, str(ROOT / "autograder" / "sandbox.py")]
    if use_sandbox:
        root = folder / "root"
        root.mkdir(exist_ok=True)
        home = "/home/student"
        runtime.chmod(0o777)  # the kernel creates its sockets here; closed to writing once it is ready
        launcher += ["--root", str(root), "--rw", str(runtime), "--readable", str(runtime / "connection.json"),
                     "--cwd", f"{home}/work",
                     "--max-tasks", str(4 * limits.max_procs + 2 * threads + 64)]
        for path in sandbox_read_only(expose):
            launcher += ["--ro", path]
        covers = reference_covers(folder / "covers") + library_covers(folder / "covers", left_out)
        for replacement, path in covers:
            launcher += ["--cover", replacement, path]
    else:
        home = str(folder / "home")
        launcher += ["--no-namespaces"]
    launcher += ["--memory-mb", str(limits.memory_mb)]
    argv = launcher + ["--", python, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = folder / "kernels" / "peftlab-grader"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "grader", "language": "python"}))
    env = {
        "HOME": home, "IPYTHONDIR": f"{home}/.ipython", "MPLCONFIGDIR": f"{home}/.mpl",
        "JUPYTER_RUNTIME_DIR": str(runtime), "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
        "PATH": os.pathsep.join([str(Path(python).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PEFTLAB_GRADING": "1",
        "TOKENIZERS_PARALLELISM": "false", "USER": "student", "LOGNAME": "student",
    }
    from peftlab.env import cache_dir  # the grader's converted models, shown read-only

    env["PEFTLAB_CACHE"] = str(cache_dir().resolve())
    if os.environ.get("VIRTUAL_ENV"):
        env["VIRTUAL_ENV"] = os.environ["VIRTUAL_ENV"]
    if not use_sandbox:
        Path(home, "work").mkdir(parents=True, exist_ok=True)
    return str(folder / "kernels"), env, f"{home}/work"


def sandbox_read_only(extra: list[str] = ()) -> list[str]:
    """The host paths a kernel may read: the system's libraries, the Python installation and the
    course's helper package (asked of the interpreter), the model cache, and ``extra``."""
    paths = [p for p in sandbox.SYSTEM_PATHS if os.path.exists(p) and not os.path.islink(p)]
    paths += _python_paths()
    from peftlab.env import SMOLLM2_CACHE_NAME, cache_dir  # not peftlab.models: that would import torch

    paths.append(str(cache_dir() / SMOLLM2_CACHE_NAME))  # the folder itself: its parents may be private
    paths += list(extra)
    root = str(ROOT)
    # Never the course root itself (solutions, gradebook): only the environment and the package inside it.
    return [p for p in dict.fromkeys(paths) if p != root and not _contains(p, root)]


REFERENCE_STUB = '''"""peftlab.reference while work is graded: the tests' reference code is not here.

The tests run in the grader; this stub stands in for the module in the student's sandbox, so that no
answer can call what the tests compare it with (see peftlab.reference and autograder.oracles)."""


class ReferenceUnavailable(RuntimeError):
    """The tests' reference code was called from the student's side while graded."""


def _unavailable(name):
    def unavailable(*args, **kwargs):
        raise ReferenceUnavailable(f"peftlab.reference.{name} is the tests' reference code: it is not "
                                   "available while work is graded, and an answer cannot use it")

    unavailable.__name__ = unavailable.__qualname__ = name
    return unavailable


__all__ = {names!r}
for _name in __all__:
    globals()[_name] = _unavailable(_name)
'''


def reference_covers(folder: Path) -> list[tuple[str, str]]:
    """``(replacement, file)`` pairs that hide the tests' reference code in the sandbox: a stub in
    place of ``peftlab/reference.py``, and an empty file in place of each of its compiled copies (so
    that a student cannot load the real bytecode either). Made once per kernel, in ``folder``."""
    import importlib.util

    spec = importlib.util.find_spec("peftlab.reference")
    if spec is None or not spec.origin:
        return []
    from peftlab import reference

    folder.mkdir(parents=True, exist_ok=True)
    stub, empty = folder / "reference.py", folder / "empty"
    stub.write_text(REFERENCE_STUB.replace("{names!r}", repr(sorted(reference.__all__))))
    empty.write_bytes(b"")
    origin = os.path.realpath(spec.origin)
    pairs = [(str(stub), origin)]
    cache = Path(origin).parent / "__pycache__"
    for compiled in sorted(cache.glob("reference.*.pyc")) if cache.is_dir() else []:
        pairs.append((str(empty), str(compiled.resolve())))
    return pairs


LIBRARY_STUB = '''"""{name} while this notebook is graded: left out of the sandbox."""

raise ImportError("{name} is not available while this notebook is graded: its exercises ask for your own "
                  "implementation, and the tests compare your answers with {name} in the grader")
'''


def library_covers(folder: Path, names: list[str]) -> list[tuple[str, str]]:
    """``(replacement, path)`` pairs that leave the libraries ``names`` out of the sandbox: each one's
    package folder (or single-file module) is shown as a package whose import raises ImportError, so
    no file of the real library can be opened, whatever name or path the student's code builds. Its
    installed metadata stays: transformers then takes the library for present, and only imports it
    to load adapters (`transformers.integrations.peft`), which no graded cell does."""
    import importlib.util

    pairs = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin and not spec.submodule_search_locations:
            continue
        stub = folder / "left-out" / name
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "__init__.py").write_text(LIBRARY_STUB.replace("{name}", name))
        if spec.submodule_search_locations:
            pairs += [(str(stub), os.path.realpath(path)) for path in spec.submodule_search_locations]
        else:
            pairs.append((str(stub / "__init__.py"), os.path.realpath(spec.origin)))
    return pairs


def _contains(outer: str, inner: str) -> bool:
    return inner.startswith(outer.rstrip("/") + "/")


_PY_PATHS: list[str] | None = None


def _python_paths() -> list[str]:
    global _PY_PATHS
    if _PY_PATHS is None:
        _PY_PATHS = sandbox.python_paths(sys.executable)
    return list(_PY_PATHS)


# -- warm starts -----------------------------------------------------------------------------------


class ForkRefused(RuntimeError):
    """The zygote's answer in place of a pid: why it did not fork (``threads=N`` or ``fork: ERROR``)."""

    def __init__(self, answer: str):
        super().__init__(f"the zygote could not fork ({answer})")
        self.answer = answer


class WarmProcess:
    """A kernel's launcher forked by the `Zygote`: its pid, and whether it still runs."""

    def __init__(self, conn, timeout: float = 60):
        self.conn, self.exit_code = conn, None
        self._buffer = b""
        conn.settimeout(timeout)
        while b"\n" not in self._buffer:
            chunk = conn.recv(4096)
            if not chunk:
                raise RuntimeError("the zygote closed the connection before the fork")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        if line.startswith(b"FAILED "):
            raise ForkRefused(line[7:200].decode(errors="replace"))
        if not line.startswith(b"PID "):
            raise RuntimeError(f"unexpected answer from the zygote: {line[:80]!r}")
        self.pid = int(line[4:])
        conn.setblocking(False)

    def alive(self) -> bool:
        if self.exit_code is None and self.conn is not None:
            try:
                chunk = self.conn.recv(4096)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                chunk = b""
            self._buffer += chunk
            if chunk and b"\n" not in self._buffer:
                return True
            line = self._buffer.partition(b"\n")[0]
            self.exit_code = int(line[5:]) if line.startswith(b"EXIT ") else -1
        return self.exit_code is None

    def close(self) -> None:
        """After the kernel's process group was killed: it no longer runs."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.exit_code is None:
            self.exit_code = -signal.SIGKILL


class Zygote:
    """A `autograder.zygote` process for one kernel environment: the course's libraries imported
    once; `spawn` forks a sandboxed kernel from it. Started with the kernel's own environment (paths
    that libraries read at import, such as HOME's, are the kernel's), except a private matplotlib
    folder for the font list it builds once."""

    def __init__(self, env: dict, timeout: float = 180):
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix="peftlab-zygote-"))  # 0700: only the grader's user
        self.socket = str(self.folder / "zygote.sock")
        self.broken = False
        # One thread: torch started with OMP_NUM_THREADS > 1 starts OpenMP's pool at import, and a fork
        # must not copy threads. Each kernel sets its own count (`autograder.zygote._launch`).
        zenv = {**env, "MPLCONFIGDIR": str(self.folder / "mpl"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        zenv.pop("JUPYTER_RUNTIME_DIR", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "autograder.zygote", self.socket], cwd=ROOT,
                                     env=zenv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        ready: list = []
        reader = threading.Thread(target=lambda: ready.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = ready[0].decode(errors="replace") if ready else ""
        if not line.startswith("READY"):
            self.close()
            raise RuntimeError(f"the zygote did not start: {line.strip()[:200] or 'no answer'}")
        self.missing = json.loads(line[6:] or "[]")

    def alive(self) -> bool:
        return self.proc.poll() is None and not self.broken

    def spawn(self, argv: list[str], env: dict, cwd: str) -> WarmProcess:
        import socket

        conn = socket.socket(socket.AF_UNIX)
        conn.settimeout(30)
        conn.connect(self.socket)
        env = {**env, "JPY_PARENT_PID": str(os.getpid())}  # as jupyter_client sets it for a cold kernel
        try:
            conn.sendall(json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode() + b"\n")
            return WarmProcess(conn)
        except Exception as exc:
            conn.close()
            if isinstance(exc, ForkRefused) and exc.answer.startswith("threads="):
                self.broken = True  # it will not fork again: the next kernel gets a new zygote
            raise

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


PER_KERNEL = ("JUPYTER_RUNTIME_DIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")  # set by each kernel, not its zygote
_ZYGOTES: dict[str, Zygote] = {}
_FAILED: set[str] = set()  # environments whose zygote did not start: their kernels start cold


def zygote_for(env: dict) -> Zygote | None:
    """This process's zygote for kernels with ``env`` (one at a time: another environment replaces
    it), started on first use; None where warm starts are unavailable (no fork, or it failed to start,
    in which case the kernel starts cold)."""
    if not hasattr(os, "fork") or not sys.platform.startswith("linux"):
        return None
    key = json.dumps({k: v for k, v in sorted(env.items()) if k not in PER_KERNEL})
    zygote = _ZYGOTES.get(key)
    if key in _FAILED:
        return None
    if zygote is not None and zygote.alive():
        return zygote
    for old in _ZYGOTES.values():
        old.close()
    _ZYGOTES.clear()
    try:
        _ZYGOTES[key] = Zygote(env)
    except (OSError, RuntimeError):
        _FAILED.add(key)
        return None
    return _ZYGOTES[key]


def close_zygotes() -> None:
    for zygote in _ZYGOTES.values():
        zygote.close()
    _ZYGOTES.clear()


atexit.register(close_zygotes)

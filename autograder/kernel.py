"""One student's Jupyter kernel, in the sandbox, under limits a crash or a hostile cell cannot lift.

`Kernel` starts ipykernel through `autograder/sandbox.py`, runs code in it and collects what comes
back (outputs, and the reports of ``@observe`` calls), and watches the whole process tree from
outside: when the tree's total resident memory passes the limit, or it holds too many processes, or
a cell's CPU time (or its generous wall-clock cap) runs out, the sandbox is killed or interrupted
and the reason is kept. Nothing the kernel sends is trusted: outputs are capped as they arrive and
reports are only text for `peftlab.probe.read_report` to check.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from autograder import sandbox

ROOT = Path(__file__).resolve().parent.parent
PROBE_MIME = "application/vnd.peftlab.probe+json"
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Limits:
    cell_cpu_seconds: float = 120.0      # CPU time of the kernel's process tree for one cell
    cell_wall_seconds: float = 600.0     # a cap for code that sleeps or waits
    memory_mb: int = 4096                # the whole tree's resident memory
    max_procs: int = 64
    max_output_bytes: int = 1 << 20      # per cell
    max_report_bytes: int = 64 << 20
    max_runtime_bytes: int = 16 << 20    # what the kernel may write in its (host) socket folder


@dataclass
class Run:
    status: str = "ok"                   # ok | error | timeout | dead
    outputs: list = field(default_factory=list)
    reports: list = field(default_factory=list)  # the last report of a test's call (kept only for those)
    report_count: int = 0
    reason: str = ""
    capped: bool = False
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0


def _tree(root_pid: int) -> list[tuple[int, int, float]]:
    """(pid, resident bytes, CPU seconds incl. waited-for children) of ``root_pid`` and its descendants."""
    stats, children = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2:].split()
        pid, ppid = int(entry), int(fields[1])
        cpu = sum(int(v) for v in fields[11:15]) / TICKS  # utime, stime, cutime, cstime
        stats[pid] = (int(fields[21]) * PAGE, cpu)
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out.append((pid, *stats[pid]))
            todo.extend(children.get(pid, []))
    return out


def _folder_bytes(folder: Path, max_entries: int = 1000) -> float:
    """Disk space the entries of ``folder`` take (allocated blocks, so preallocated files count); a
    folder with more than ``max_entries`` entries counts as full."""
    total = 0
    try:
        with os.scandir(folder) as entries:
            for n, entry in enumerate(entries):
                if n >= max_entries:
                    return float("inf")
                try:
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
                except OSError:
                    continue
    except OSError:
        return 0
    return total


def _pss(pids) -> int:
    """Proportional set size of the processes together: shared pages divided among their sharers."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            continue
    return total


class Kernel:
    """A sandboxed ipykernel for one submission; ``folder`` is the job's private folder."""

    def __init__(self, folder: Path, limits: Limits, *, use_sandbox: bool, expose: list[str] = (),
                 threads: int = 1):
        self.folder, self.limits, self.use_sandbox = folder, limits, use_sandbox
        self.expose, self.threads = list(expose), threads
        self.km = self.kc = None
        self.dead: str | None = None     # why the kernel can no longer be used
        self.killed: str | None = None   # set by the watcher
        self.flags: list[str] = []
        self._stop = threading.Event()
        self._cell_start_cpu = 0.0
        self._cell_running = False
        self.peak_bytes = 0

    # -- start and stop -------------------------------------------------------------------------

    def _spec(self) -> tuple[str, dict, str]:
        runtime = self.folder / "runtime"
        runtime.mkdir(parents=True, exist_ok=True)
        python = sys.executable
        launcher = [python, str(ROOT / "autograder" / "sandbox.py")]
        if self.use_sandbox:
            root = self.folder / "root"
            root.mkdir(exist_ok=True)
            home = "/home/student"
            runtime.chmod(0o777)  # the kernel creates its sockets here; closed to writing once it is ready
            launcher += ["--root", str(root), "--rw", str(runtime), "--readable", str(runtime / "connection.json"),
                         "--cwd", f"{home}/work",
                         "--max-tasks", str(4 * self.limits.max_procs + 2 * self.threads + 64)]
            for path in sandbox_read_only(self.expose):
                launcher += ["--ro", path]
            for replacement, path in reference_covers(self.folder / "covers"):
                launcher += ["--cover", replacement, path]
        else:
            home = str(self.folder / "home")
            launcher += ["--no-namespaces"]
        launcher += ["--memory-mb", str(self.limits.memory_mb)]
        argv = launcher + ["--", python, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        spec = self.folder / "kernels" / "peftlab-grader"
        spec.mkdir(parents=True, exist_ok=True)
        (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "grader", "language": "python"}))
        env = {
            "HOME": home, "IPYTHONDIR": f"{home}/.ipython", "MPLCONFIGDIR": f"{home}/.mpl",
            "JUPYTER_RUNTIME_DIR": str(runtime), "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
            "PATH": os.pathsep.join([str(Path(python).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
            "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads), "PEFTLAB_GRADING": "1",
            "TOKENIZERS_PARALLELISM": "false", "USER": "student", "LOGNAME": "student",
        }
        from peftlab.env import cache_dir  # the grader's converted models, shown read-only

        env["PEFTLAB_CACHE"] = str(cache_dir().resolve())
        if os.environ.get("VIRTUAL_ENV"):
            env["VIRTUAL_ENV"] = os.environ["VIRTUAL_ENV"]
        if not self.use_sandbox:
            Path(home, "work").mkdir(parents=True, exist_ok=True)
        return str(self.folder / "kernels"), env, f"{home}/work"

    def start(self, timeout: float = 120) -> None:
        from jupyter_client.kernelspec import KernelSpecManager
        from jupyter_client.manager import KernelManager

        import zmq

        kernel_dirs, env, cwd = self._spec()
        runtime = self.folder / "runtime"
        context = zmq.Context()
        context.setsockopt(zmq.MAXMSGSIZE, self.limits.max_report_bytes + (16 << 20))  # a bigger message drops the peer
        self.km = KernelManager(kernel_name="peftlab-grader", transport="ipc", ip=str(runtime / "k"), context=context,
                                connection_file=str(runtime / "connection.json"),
                                kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dirs]))
        self.km.start_kernel(env=env, cwd=str(runtime) if self.use_sandbox else cwd,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self.pid = self.km.provisioner.process.pid
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=timeout)
        except RuntimeError as exc:
            self.dead = f"the kernel did not start ({exc})"
            raise
        if self.use_sandbox:  # its sockets exist: from now on nothing can be written there (it is not the owner)
            runtime.chmod(0o555)

    def shutdown(self) -> None:
        self._stop.set()
        try:
            if self.kc is not None:
                self.kc.stop_channels()
            if self.km is not None and self.km.has_kernel:
                self.km.shutdown_kernel(now=True)
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
        try:
            if self.km is not None:
                self.km.context.destroy(linger=0)
        except Exception:  # noqa: BLE001
            pass

    # -- the watcher ----------------------------------------------------------------------------

    def tree_cpu(self) -> float:
        return sum(cpu for _, _, cpu in _tree(self.pid))

    def _watch(self) -> None:
        limit = self.limits.memory_mb << 20
        while not self._stop.wait(0.2):
            tree = _tree(self.pid)
            if not tree:
                return
            rss = sum(r for _, r, _ in tree)
            if rss > limit:  # resident sizes count shared pages once per process: confirm with PSS
                rss = _pss(pid for pid, _, _ in tree)
            self.peak_bytes = max(self.peak_bytes, rss)
            if rss > limit:
                self._kill(f"memory limit reached: the kernel's processes held {rss / 2**20:,.0f} MB together "
                           f"(limit {self.limits.memory_mb:,} MB)")
                return
            used = _folder_bytes(self.folder / "runtime")
            if used > self.limits.max_runtime_bytes:
                self._kill(f"disk limit reached: {used / 2**20:,.0f} MB written in the kernel's socket folder")
                return
            if len(tree) > self.limits.max_procs + 3:  # + the launcher, setup and kernel processes
                self._kill(f"too many processes: {len(tree) - 3} (limit {self.limits.max_procs})")
                return
            if self._cell_running and sum(c for _, _, c in tree) - self._cell_start_cpu > self.limits.cell_cpu_seconds:
                self._cell_running = False
                self._over_time = True
                try:
                    self.km.interrupt_kernel()
                except Exception:  # noqa: BLE001
                    pass

    def _kill(self, reason: str) -> None:
        self.killed = reason
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass

    # -- running code ---------------------------------------------------------------------------

    def run(self, code: str, *, store_history: bool = True, keep_outputs: bool = True, expect_report: bool = False) -> Run:
        """Execute ``code``; collect outputs (capped) until the kernel is idle, and, for a test's call
        (``expect_report``), its report: the last one sent (any number of them costs no memory)."""
        result = Run()
        if self.dead or self.killed:
            result.status, result.reason = "dead", self.dead or self.killed
            return result
        start = time.monotonic()
        self._over_time = False
        self._cell_start_cpu = self.tree_cpu()
        self._cell_running = True
        msg_id = self.kc.execute(code, store_history=store_history, allow_stdin=False, stop_on_error=False)
        size, interrupted_at = 0, None
        deadline = start + self.limits.cell_wall_seconds
        idle = False
        while not idle:
            if self.killed:
                break
            now = time.monotonic()
            if interrupted_at is None and (self._over_time or now > deadline):
                interrupted_at = now
                if now > deadline:
                    try:
                        self.km.interrupt_kernel()
                    except Exception:  # noqa: BLE001
                        pass
            if interrupted_at is not None and now - interrupted_at > 15:
                self.dead = "the kernel stopped answering after a time limit"
                self._kill(self.dead)
                break
            try:
                msg = self.kc.get_iopub_msg(timeout=0.5)
            except Exception:  # noqa: BLE001 - queue.Empty: keep waiting
                if not self.km.is_alive():
                    self.dead = "the kernel died"
                    break
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg.get("msg_type"), msg.get("content", {})
            if kind == "status" and content.get("execution_state") == "idle":
                idle = True
            elif kind == "display_data" and isinstance(content.get("data"), dict) and PROBE_MIME in content["data"]:
                if expect_report:
                    report = content["data"][PROBE_MIME]
                    result.report_count += 1
                    ok = isinstance(report, str) and len(report) <= self.limits.max_report_bytes
                    result.reports = [report if ok else None]
            elif kind in ("stream", "display_data", "execute_result", "error"):
                if kind == "error":
                    result.status = "error"
                if not keep_outputs:
                    continue
                try:
                    output = nbformat.v4.output_from_msg(msg)
                except (KeyError, ValueError, TypeError):
                    continue
                n = len(json.dumps(output))
                if size + n > self.limits.max_output_bytes:
                    if not result.capped:
                        result.capped = True
                        result.outputs.append(nbformat.v4.new_output(
                            "stream", name="stdout", text=f"[output cut by the grader at {self.limits.max_output_bytes // 1024} KB]\n"))
                    continue
                size += n
                result.outputs.append(output)
            elif kind == "clear_output" and keep_outputs:
                result.outputs.clear()
                size = 0
        self._cell_running = False
        result.wall_seconds = time.monotonic() - start
        if self.killed:
            result.status, result.reason = "dead", self.killed
            self.dead = self.killed
        elif self.dead:
            result.status, result.reason = "dead", self.dead
        elif interrupted_at is not None:
            result.status = "timeout"
            result.reason = (f"the cell used more than {self.limits.cell_cpu_seconds:.0f} s of CPU time" if self._over_time
                             else f"the cell ran longer than {self.limits.cell_wall_seconds:.0f} s (wall clock)")
        else:
            try:
                reply = self.kc.get_shell_msg(timeout=10)
                if reply.get("parent_header", {}).get("msg_id") == msg_id and reply["content"].get("status") == "error":
                    result.status = "error"
            except Exception:  # noqa: BLE001
                pass
        return result


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


def _contains(outer: str, inner: str) -> bool:
    return inner.startswith(outer.rstrip("/") + "/")


_PY_PATHS: list[str] | None = None


def _python_paths() -> list[str]:
    global _PY_PATHS
    if _PY_PATHS is None:
        _PY_PATHS = sandbox.python_paths(sys.executable)
    return list(_PY_PATHS)

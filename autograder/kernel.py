"""One student's Jupyter kernel, in the sandbox, under limits a crash or a hostile cell cannot lift.

`Kernel` starts ipykernel through `autograder/sandbox.py`, runs code in it and collects what comes
back (outputs, and the reports of ``@observe`` calls), and watches the whole process tree from
outside: when the tree's total resident memory passes the limit, or it holds too many processes, or
a cell's CPU time (or its generous wall-clock cap) runs out, the sandbox is killed or interrupted
and the reason is kept. Nothing the kernel sends is trusted: outputs are capped as they arrive and
reports are only text for `peftlab.probe.read_report` to check.
"""

from __future__ import annotations

import atexit
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
from autograder.relay import RelayClient

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
    max_report_bytes: int = 16 << 20     # one test call's report (peftlab.probe.MAX_BYTES)
    # What the kernel can make the grader hold (`autograder.relay`): one message, all its parts, at
    # most this large (a report and its envelope), and twice that waiting to be read.
    max_message_bytes: int = (16 << 20) + (1 << 20)
    max_runtime_bytes: int = 16 << 20    # what the kernel may write in its (host) socket folder


@dataclass
class Run:
    status: str = "ok"                   # ok | error | timeout | dead
    outputs: list = field(default_factory=list)
    reports: list = field(default_factory=list)  # the last report of a test's call (kept only for those)
    report_count: int = 0
    reason: str = ""
    capped: bool = False
    refused: int = 0                     # messages over the size limit, dropped
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
                 threads: int = 1, warm: bool = False, left_out: list[str] = ()):
        self.folder, self.limits, self.use_sandbox = folder, limits, use_sandbox
        self.expose, self.threads, self.warm, self.left_out = list(expose), threads, warm, list(left_out)
        self.km = self.kc = self.process = self._context = self.pid = None
        self.dead: str | None = None     # why the kernel can no longer be used
        self.killed: str | None = None   # set by the watcher
        self.notes: list[str] = []       # for the report: what the grader did differently (a cold start)
        self._stop = threading.Event()
        self._cell_start_cpu = 0.0
        self._cell_running = False
        self._disconnects = {"iopub": 0, "shell": 0}  # connections lost that the last look counted
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
            covers = reference_covers(self.folder / "covers") + library_covers(self.folder / "covers", self.left_out)
            for replacement, path in covers:
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
        """Start the kernel: forked from this worker's `Zygote` when there is one (``warm``), else a
        fresh interpreter started by jupyter_client. Both run the same sandbox and limits. A warm start
        that fails for any reason (the zygote gone, a fork refused, a child that died before its kernel
        answered) costs a cold start, noted in `notes`, never the submission."""
        kernel_dirs, env, cwd = self._spec()
        zygote = zygote_for(env) if self.warm else None
        self.warm = False
        if zygote is not None:
            try:
                self._start_warm(zygote, kernel_dirs, env, cwd, timeout)
                self.warm = True
                return
            except Exception as exc:  # noqa: BLE001 - any failure here falls back to the cold start
                self.notes.append(f"the warm kernel did not start ({type(exc).__name__}: {str(exc)[:200]}): started cold")
                self._discard()
        self._start_cold(kernel_dirs, env, cwd, timeout)

    def _start_warm(self, zygote: "Zygote", kernel_dirs: str, env: dict, cwd: str, timeout: float) -> None:
        from jupyter_client.connect import write_connection_file

        runtime = self.folder / "runtime"
        connection = str(runtime / "connection.json")
        write_connection_file(connection, transport="ipc", ip=str(runtime / "k"))
        argv = json.loads((Path(kernel_dirs) / "peftlab-grader" / "kernel.json").read_text())["argv"]
        argv = [connection if a == "{connection_file}" else a for a in argv]
        if len(argv) < 3 or Path(argv[1]).name != "sandbox.py":  # the spec's launcher: python sandbox.py ARGS
            raise RuntimeError(f"unexpected kernel command {argv[:2]}")
        self.process = zygote.spawn(argv[2:], env, str(runtime) if self.use_sandbox else cwd)  # the launcher's arguments
        self.pid = self.process.pid
        self.kc = RelayClient(connection, self.limits.max_message_bytes, 2 * self.limits.max_message_bytes)
        self._ready(timeout)

    def _start_cold(self, kernel_dirs: str, env: dict, cwd: str, timeout: float) -> None:
        from jupyter_client.kernelspec import KernelSpecManager
        from jupyter_client.manager import KernelManager

        runtime = self.folder / "runtime"
        import zmq

        self._context = zmq.Context()
        self.km = KernelManager(kernel_name="peftlab-grader", transport="ipc", ip=str(runtime / "k"), context=self._context,
                                connection_file=str(runtime / "connection.json"),
                                kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dirs]))
        self.km.start_kernel(env=env, cwd=str(runtime) if self.use_sandbox else cwd,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self.pid = self.km.provisioner.process.pid
        self.km._close_control_socket()  # no socket to the kernel in this process (`autograder.relay`)
        self.kc = RelayClient(self.km.connection_file, self.limits.max_message_bytes, 2 * self.limits.max_message_bytes)
        self._ready(timeout)

    def _ready(self, timeout: float) -> None:
        """Watch the kernel's processes and wait for its first answer; a kernel that dies meanwhile
        fails at once (not after ``timeout``)."""
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(self._stop,), daemon=True)
        self._watcher.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.kc.wait_for_ready(timeout=max(1.0, min(5.0, deadline - time.monotonic())))
                break
            except RuntimeError as exc:
                if not self.alive() or self.killed:
                    self.dead = f"the kernel died before it answered ({self.killed or 'its process ended'})"
                    raise RuntimeError(self.dead) from None
                if time.monotonic() >= deadline:
                    self.dead = f"the kernel did not start ({exc})"
                    raise
        if self.use_sandbox:  # its sockets exist: from now on nothing can be written there (it is not the owner)
            (self.folder / "runtime").chmod(0o555)

    def _discard(self) -> None:
        """After a failed warm start: stop what it left (its processes, client and sockets)."""
        self.shutdown()
        self.km = self.kc = self.process = self._context = self.pid = None
        self.dead = self.killed = None
        self.peak_bytes = 0
        runtime = self.folder / "runtime"
        for path in runtime.iterdir() if runtime.is_dir() else ():
            if path.is_file() or path.is_socket():
                path.unlink(missing_ok=True)

    def shutdown(self) -> None:
        self._stop.set()
        try:
            if self.kc is not None:
                self.kc.close()
            if self.km is not None and self.km.has_kernel:
                self.km.shutdown_kernel(now=True)
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        try:
            if self.pid is not None:
                os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass
        if self.process is not None:
            self.process.close()
        try:
            if self._context is not None:
                self._context.destroy(linger=0)
        except Exception:  # noqa: BLE001
            pass

    def interrupt(self) -> None:
        """SIGINT to the kernel's process group (its launcher and setup ignore it), as jupyter_client does."""
        try:
            if self.km is not None:
                self.km.interrupt_kernel()
            else:
                os.killpg(self.pid, signal.SIGINT)
        except Exception:  # noqa: BLE001 - it may be gone already
            pass

    def alive(self) -> bool:
        if self.km is not None:
            return self.km.is_alive()
        return self.process is not None and self.process.alive()

    # -- the watcher ----------------------------------------------------------------------------

    def tree_cpu(self) -> float:
        return sum(cpu for _, _, cpu in _tree(self.pid))

    def _watch(self, stop: threading.Event) -> None:
        limit = self.limits.memory_mb << 20
        while not stop.wait(0.2):
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
                self.interrupt()

    def _kill(self, reason: str) -> None:
        self.killed = reason
        try:
            if self.pid is not None:
                os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass

    # -- running code ---------------------------------------------------------------------------

    def run(self, code: str, *, store_history: bool = True, keep_outputs: bool = True, expect_report: bool = False) -> Run:
        """Execute ``code``; collect outputs (capped) until the kernel is idle, and, for a test's call
        (``expect_report``), its report: the last one sent (any number of them costs no memory).
        Messages over the size limit are dropped and counted (`Run.refused`)."""
        result = Run()
        if self.dead or self.killed:
            result.status, result.reason = "dead", self.dead or self.killed
            return result
        start = time.monotonic()
        self._over_time = False
        self._cell_start_cpu = self.tree_cpu()
        self._cell_running = True
        self._disconnects = dict(self.kc.disconnects)  # connections lost before this run are not this run's
        refused = self.kc.refused
        msg_id = self.kc.execute(code, store_history=store_history, allow_stdin=False, stop_on_error=False)
        collected = _Collected(result, msg_id, keep_outputs, expect_report, self.limits)
        interrupted_at, reply = self._wait(collected, start)
        if expect_report and not result.report_count:  # a report refused as too large: the relay may say so a moment later
            self._settle(result)
        result.refused += self.kc.refused - refused
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
            if reply is None and not self._lost("shell", result):
                reply = self._reply(msg_id, timeout=10)
            if reply is not None and reply["content"].get("status") == "error":
                result.status = "error"
        return result

    def _wait(self, collected: "_Collected", start: float):
        """Read the kernel's messages until it is idle (or stopped, or its idle status was lost with a
        connection zmq dropped): (when it was interrupted, the shell's reply if it came meanwhile)."""
        deadline = start + self.limits.cell_wall_seconds
        interrupted_at = reply = replied_at = None
        lost = False
        while not collected.idle:
            if self.kc.gone and not self.killed:  # the kernel made the relay pass its memory: stopped here
                self._kill(self.kc.gone)
            if self.killed:
                break
            now = time.monotonic()
            if interrupted_at is None and (self._over_time or now > deadline):
                interrupted_at = now
                if now > deadline:
                    self.interrupt()
            if interrupted_at is not None and now - interrupted_at > 15:
                self.dead = "the kernel stopped answering after a time limit"
                self._kill(self.dead)
                break
            lost = self._lost("iopub", collected.result) or lost
            if lost and replied_at is not None and now - replied_at > 2:
                break  # the idle status went with a dropped connection: the reply says the cell is done
            try:
                msg = self.kc.get_iopub_msg(timeout=0.2)
            except Exception:  # noqa: BLE001 - queue.Empty: keep waiting
                if not self.alive():
                    self.dead = "the kernel died"
                    break
                if reply is None:
                    reply = self._reply(collected.msg_id, timeout=0)
                    replied_at = time.monotonic() if reply is not None else None
                continue
            collected.take(msg)
        return interrupted_at, reply

    def refused_in_all(self) -> int:
        """Messages the relay dropped, and connections it lost, since the kernel started."""
        return (self.kc.refused + sum(self.kc.disconnects.values())) if isinstance(self.kc, RelayClient) else 0

    def _settle(self, result: Run, seconds: float = 1.0) -> None:
        """Wait up to ``seconds`` for the relay's word on a message it dropped (counted in ``result``)."""
        end = time.monotonic() + seconds
        refused = self.kc.refused
        while time.monotonic() < end:
            if self.kc.refused != refused or self._lost("iopub", result) or self._lost("shell", result):
                return
            time.sleep(0.05)

    def _lost(self, channel: str, result: Run) -> bool:
        """Whether ``channel`` lost its connection since the last look (counted as a refused message:
        the relay's zmq drops a connection that sent a part over the size limit)."""
        now = self.kc.disconnects[channel]
        n, self._disconnects[channel] = now - self._disconnects[channel], now
        result.refused += n
        return n > 0

    def _reply(self, msg_id: str, timeout: float):
        """The shell's reply to ``msg_id`` if it comes within ``timeout`` (others are dropped)."""
        end = time.monotonic() + timeout
        while True:
            try:
                reply = self.kc.get_shell_msg(timeout=max(0.0, end - time.monotonic()))
            except Exception:  # noqa: BLE001 - queue.Empty
                return None
            if reply.get("parent_header", {}).get("msg_id") == msg_id:
                return reply


class _Collected:
    """What one execution sent: outputs (capped), the probe's reports, whether the kernel went idle."""

    def __init__(self, result: Run, msg_id: str, keep_outputs: bool, expect_report: bool, limits: Limits):
        self.result, self.msg_id, self.keep, self.expect_report, self.limits = result, msg_id, keep_outputs, expect_report, limits
        self.size, self.idle = 0, False

    def take(self, msg: dict) -> None:
        if msg.get("parent_header", {}).get("msg_id") != self.msg_id:
            return
        result, kind, content = self.result, msg.get("msg_type"), msg.get("content", {})
        if kind == "status" and content.get("execution_state") == "idle":
            self.idle = True
        elif kind == "display_data" and isinstance(content.get("data"), dict) and PROBE_MIME in content["data"]:
            if self.expect_report:
                report = content["data"][PROBE_MIME]
                result.report_count += 1
                ok = isinstance(report, str) and len(report) <= self.limits.max_report_bytes
                result.reports = [report if ok else None]
        elif kind in ("stream", "display_data", "execute_result", "error"):
            if kind == "error":
                result.status = "error"
            if self.keep:
                self._keep(msg)
        elif kind == "clear_output" and self.keep:
            result.outputs.clear()
            self.size = 0

    def _keep(self, msg: dict) -> None:
        result, limit = self.result, self.limits.max_output_bytes
        try:
            output = nbformat.v4.output_from_msg(msg)
        except (KeyError, ValueError, TypeError):
            return
        n = len(json.dumps(output))
        if self.size + n > limit:
            if not result.capped:
                result.capped = True
                result.outputs.append(nbformat.v4.new_output(
                    "stream", name="stdout", text=f"[output cut by the grader at {limit // 1024} KB]\n"))
            return
        self.size += n
        result.outputs.append(output)


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

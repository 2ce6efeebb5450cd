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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from autograder.launch import Zygote, kernel_spec, zygote_for
from autograder.relay import RelayClient

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

    def start(self, timeout: float = 120) -> None:
        """Start the kernel: forked from this worker's `Zygote` when there is one (``warm``), else a
        fresh interpreter started by jupyter_client. Both run the same sandbox and limits. A warm start
        that fails for any reason (the zygote gone, a fork refused, a child that died before its kernel
        answered) costs a cold start, noted in `notes`, never the submission."""
        kernel_dirs, env, cwd = kernel_spec(self.folder, self.limits, use_sandbox=self.use_sandbox,
                                            expose=self.expose, threads=self.threads, left_out=self.left_out)
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

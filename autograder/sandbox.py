"""Start a command (a student's Jupyter kernel) in a sandbox: no network, hidden folders, a memory cap.

    python autograder/sandbox.py --hide DIR ... --expose DIR ... --memory-mb N -- CMD ...

Linux only, and only where unprivileged user namespaces are allowed (most distributions, and these
machines; some container runtimes forbid them: `available()` says so). Inside the sandbox:

- a new network namespace with no interface up: no connection can be opened, not even to localhost
  (talk to the kernel over IPC transport: Unix sockets in a folder it can see);
- every ``--hide`` folder is covered by an empty in-memory file system, then each ``--expose`` folder
  (which may lie inside a hidden one) is mounted back; the covering mounts are then locked by a
  second, nested user namespace, so code inside cannot unmount them;
- a new PID namespace with its own /proc, so other processes' views of the file system
  (/proc/PID/root) are out of reach;
- an address-space limit (RLIMIT_AS): an allocation beyond it fails inside the student's code with
  MemoryError or a RuntimeError instead of exhausting the machine.

The command runs as root *inside* the namespaces, which maps to the grader's own user outside: it
gains no privilege on the machine.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import signal
import subprocess
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else str(s).encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _map_ids(uid: int, gid: int) -> None:
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


def _syscall(number: int, *args) -> int:
    result = _libc.syscall(number, *args)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


# Linux's detached-mount calls (5.2+; the same numbers on x86-64 and arm64).
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429
OPEN_TREE_CLONE, AT_RECURSIVE, MOVE_MOUNT_F_EMPTY_PATH, AT_FDCWD = 1, 0x8000, 0x4, -100


def enter(hide: list[str], expose: list[str]) -> None:
    """Move this process into new user, mount, network and PID namespaces with ``hide`` covered and
    ``expose`` mounted back. The PID namespace takes effect for children: fork, then call
    `_lock_and_exec` in the child."""
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare")
    _map_ids(uid, gid)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    kept = []
    for path in expose:  # detached copies of the exposed folders, taken before anything is covered
        if os.path.isdir(path):
            fd = _syscall(SYS_OPEN_TREE, AT_FDCWD, os.path.realpath(path).encode(),
                          OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC)
            kept.append((os.path.realpath(path), fd))
    covered: list[str] = []
    for path in sorted({os.path.realpath(p) for p in hide if os.path.isdir(p)}, key=len):
        if not any(path == c or path.startswith(c.rstrip("/") + "/") for c in covered):  # else already out of sight
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
            covered.append(path)
    for path, fd in sorted(kept, key=lambda item: len(item[0])):
        os.makedirs(path, exist_ok=True)
        _syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, path.encode(), MOVE_MOUNT_F_EMPTY_PATH)
        os.close(fd)


def _lock_and_exec(command: list[str], memory_mb: int | None) -> None:
    """In the forked child (PID 1 of the new PID namespace): fresh /proc, nested user namespace to lock
    the mounts, memory limit, then exec."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare lock")  # mounts copied here are locked
    _map_ids(0, 0)
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.execvp(command[0], command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hide", action="append", default=[])
    parser.add_argument("--expose", action="append", default=[])
    parser.add_argument("--memory-mb", type=int, default=None)
    parser.add_argument("--no-namespaces", action="store_true", help="only the memory limit (no sandbox)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    if args.no_namespaces:
        if args.memory_mb:
            resource.setrlimit(resource.RLIMIT_AS, (args.memory_mb << 20, args.memory_mb << 20))
        os.execvp(command[0], command)
    enter(args.hide, args.expose)
    pid = os.fork()
    if pid == 0:
        try:
            _lock_and_exec(command, args.memory_mb)
        except BaseException as exc:  # noqa: BLE001 - report and leave the child, whatever happened
            print(f"sandbox: {exc}", file=sys.stderr)
        os._exit(127)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the kernel manager signals this process
        signal.signal(sig, lambda s, _f: os.kill(pid, s))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    return os.waitstatus_to_exitcode(status)


_AVAILABLE: bool | None = None


def available() -> bool:
    """Whether this machine lets an unprivileged process build the sandbox (tried once, in a child)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        if not sys.platform.startswith("linux"):
            _AVAILABLE = False
        else:
            try:
                done = subprocess.run([sys.executable, __file__, "--hide", "/tmp", "--", "true"],
                                      capture_output=True, timeout=30)
                _AVAILABLE = done.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                _AVAILABLE = False
    return _AVAILABLE


if __name__ == "__main__":
    sys.exit(main())

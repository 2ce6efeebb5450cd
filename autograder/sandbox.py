"""Start a command (a student's Jupyter kernel) in a closed sandbox.

    python autograder/sandbox.py --root EMPTY_DIR --ro PATH ... --rw PATH ... [--memory-mb N]
                                 [--max-tasks N] [--cwd DIR] -- CMD ...

Linux only, where unprivileged user namespaces are allowed (most distributions, and these machines;
some container runtimes forbid them, and `available()` says so). The command sees a file system built
from nothing:

- an empty in-memory root holding only what ``--ro`` names (the Python installation, the course's
  helper package, the model cache, the system's libraries), mounted **read-only**, plus the ``--rw``
  folders (the kernel's socket folder) and private in-memory ``/tmp``, ``/dev/shm`` and ``/home``;
  everything else (the course, its solutions and gradebook, the submissions, other checkouts, other
  students' jobs, the home folders, ``/run``'s sockets) does not exist inside. The old root is
  detached after ``pivot_root``; a nested user namespace then locks every mount, so the read-only
  flags cannot be lifted;
- a minimal ``/dev`` (null, zero, full, random, urandom) and ``/etc`` (a one-line ``passwd``, the
  dynamic linker's cache): no device and no host configuration beyond those;
- new network, IPC and UTS namespaces: no network interface is up, not even loopback, so no TCP or
  UDP connection can be made; abstract Unix sockets belong to the network namespace and so are
  unreachable; no path-based socket exists in the visible tree except the kernel's own in ``--rw``;
- a new PID namespace with its own ``/proc``: no other process can be seen or signalled;
- when the grader runs as root, the command runs as a dedicated unprivileged user id (outside the
  namespace: 1,500,000,000 + the launcher's pid), so host permissions, not only the mounts, stop it
  writing anything, and RLIMIT_NPROC counts exactly this sandbox's processes. Run as another user,
  the command keeps that user's id (unprivileged anyway) and RLIMIT_NPROC is left alone (it would
  count every process of that user);
- limits on every process: address space (``--memory-mb``, RLIMIT_AS, so one huge allocation fails
  with MemoryError), file size (RLIMIT_FSIZE), no core dumps, ``no_new_privs``. The limits for the
  whole process tree (total memory, number of processes) are enforced from outside by the grader's
  watcher (`autograder.kernel`), which kills the sandbox when they are passed;
- every process of the sandbox dies with the grader (``PR_SET_PDEATHSIG`` down the chain).

Process chain: this launcher (outside every namespace) forks the *setup* process, which unshares the
namespaces, is given its id maps by the launcher, builds the new root, and forks the *kernel* process,
PID 1 of the new PID namespace, which pivots into the new root, drops privileges, locks the mounts,
applies the limits and execs the command.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import resource
import signal
import subprocess
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
# Linux's mount API (5.12+; these numbers are the same on x86-64 and arm64).
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine())
OPEN_TREE_CLONE, AT_RECURSIVE, AT_EMPTY_PATH, MOVE_MOUNT_F_EMPTY_PATH, AT_FDCWD = 1, 0x8000, 0x1000, 0x4, -100
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4

INSIDE_USER = 1000               # the unprivileged id the command runs as, inside the namespace
OUTSIDE_BASE = 1_500_000_000     # + launcher pid: the id it has outside, when the grader is root
DEVICES = ("null", "zero", "full", "random", "urandom")
FILE_SIZE_LIMIT = 1 << 30

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def _enc(value):
    return None if value is None else str(value).encode()


def _mount(source, target, fstype, flags, data=None) -> None:
    _check(_libc.mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data)), f"mount {target}")


def _syscall(number: int, *args) -> int:
    return _check(_libc.syscall(number, *args), f"syscall {number}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl {option}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _clone_tree(path: str, read_only: bool, devices: bool = False) -> int:
    """A detached copy of the mount tree at ``path`` (a file or a folder), read-only if asked."""
    fd = _syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC)
    attr = _MountAttr(attr_set=(MOUNT_ATTR_RDONLY if read_only else 0) | MOUNT_ATTR_NOSUID
                      | (0 if devices else MOUNT_ATTR_NODEV))
    _syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH | AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr))
    return fd


def _place(root: str, path: str, fd: int) -> None:
    target = root + path
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH)
    os.close(fd)


def build_root(root: str, ro: list[str], rw: list[str], covers: list[tuple[str, str]] = ()) -> None:
    """In the new mount namespace: an empty tmpfs at ``root`` holding only the allowed paths, with
    each ``(replacement, path)`` of ``covers`` shown read-only in place of the file or folder at ``path``
    (a folder replaces the whole folder: nothing of the original is left to open)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    wanted = [(os.path.realpath(p), True) for p in ro] + [(os.path.realpath(p), False) for p in rw]
    clones = []  # taken before anything is covered: the sources may lie anywhere, /tmp included
    for path, read_only in sorted(set(wanted), key=lambda item: (len(item[0]), item)):
        inside = [p for p, ro in clones if path.startswith(p.rstrip("/") + "/") and ro == read_only]
        if os.path.exists(path) and not inside:  # a folder inside one already shown comes with it
            clones.append((path, read_only))
    clones = [(path, _clone_tree(path, read_only)) for path, read_only in clones]
    devices = [(f"/dev/{d}", _clone_tree(f"/dev/{d}", False, devices=True)) for d in DEVICES if os.path.exists(f"/dev/{d}")]
    etc = [(p, _clone_tree(p, True)) for p in ("/etc/ld.so.cache",) if os.path.isfile(p)]
    covered = [(os.path.realpath(path), _clone_tree(replacement, True)) for replacement, path in covers
               if os.path.exists(path) and os.path.isdir(replacement) == os.path.isdir(path)]
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=0755")
    # /bin, /lib, ... are symlinks into /usr on most distributions: the same links in the new root.
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            os.symlink(os.readlink(top), root + top)
    for private in ("/tmp", "/home"):  # before the clones: a --rw folder may lie inside /tmp
        os.makedirs(root + private, exist_ok=True)
        _mount("tmpfs", root + private, "tmpfs", MS_NOSUID | MS_NODEV, "size=128m,mode=1777")
    for path, fd in sorted(clones, key=lambda item: len(item[0])):
        _place(root, path, fd)
    for path, fd in covered:  # over what the clones brought; the mounts are locked like the others
        if os.path.exists(root + path):
            _syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, (root + path).encode(), MOVE_MOUNT_F_EMPTY_PATH)
        os.close(fd)
    os.makedirs(root + "/dev", exist_ok=True)
    for path, fd in devices:
        _place(root, path, fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    os.makedirs(root + "/etc", exist_ok=True)
    for path, fd in etc:
        _place(root, path, fd)
    _write(root + "/etc/passwd", "student:x:0:0:student:/home/student:/bin/false\n")
    _write(root + "/etc/group", "student:x:0:\n")
    _write(root + "/etc/hosts", "127.0.0.1 localhost\n")
    os.makedirs(root + "/dev/shm", exist_ok=True)
    _mount("tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=128m,mode=1777")
    os.makedirs(root + "/proc", exist_ok=True)
    os.makedirs(root + "/.old", exist_ok=True)


def _map_own_ids(uid: int, gid: int) -> None:
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")


def _exec(command: list[str], run) -> None:
    """Become ``command``: exec it, or with ``run`` (a warm start, `autograder.zygote`) call
    ``run(command)`` in this process instead and exit."""
    if run is None:
        os.execvp(command[0], command)
    code = 0
    try:
        run(command)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001
        code = 1
    os._exit(code)


def _kernel(args, command: list[str], drop: bool, run=None) -> None:
    """PID 1 of the new PID namespace: enter the new root, drop privileges, lock, limit, exec."""
    root = args.root
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _syscall(SYS_PIVOT_ROOT, root.encode(), (root + "/.old").encode())
    os.chdir("/")
    _check(_libc.umount2(b"/.old", MNT_DETACH), "umount old root")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    if drop:  # inside id 1000 is the dedicated unprivileged id outside
        os.setgroups([])
        os.setresgid(INSIDE_USER, INSIDE_USER, INSIDE_USER)
        os.setresuid(INSIDE_USER, INSIDE_USER, INSIDE_USER)
        _prctl(PR_SET_DUMPABLE, 1)  # an id change makes /proc/self root's; the maps below need it ours
    uid, gid = os.getuid(), os.getgid()
    # A nested user namespace owns a copy of the mounts: every mount now carries the "locked" flags,
    # so the read-only binds cannot be remounted writable nor the covering mounts removed.
    _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare (lock)")
    _map_own_ids(uid, gid)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if args.memory_mb:
        limit = args.memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if drop and args.max_tasks:  # counts threads too; only meaningful for the dedicated id
        resource.setrlimit(resource.RLIMIT_NPROC, (args.max_tasks, args.max_tasks))
    os.makedirs(args.cwd, exist_ok=True)
    os.chdir(args.cwd)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the id changes, which clear it
    _exec(command, run)


def _setup(args, command: list[str], ready_w: int, go_r: int, run=None) -> int:
    """The setup process: new namespaces, id maps (from the launcher when it is root), the new root."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID),
           "unshare")
    drop = uid == 0
    if drop:
        os.write(ready_w, b"r")           # the launcher writes our maps: 0 -> root, 1000 -> unprivileged
        if os.read(go_r, 1) != b"g":
            return 126
    else:
        _map_own_ids(uid, gid)
    os.close(ready_w)
    os.close(go_r)
    build_root(args.root, args.ro, args.rw, [tuple(pair) for pair in args.cover])
    pid = os.fork()
    if pid == 0:
        try:
            _kernel(args, command, drop, run)
        except BaseException as exc:  # noqa: BLE001 - report and leave the child, whatever happened
            print(f"sandbox: {exc}", file=sys.stderr, flush=True)
        os._exit(127)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the kernel manager signals the whole process group
    return _wait(pid)


def _wait(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)
        except InterruptedError:
            continue


def main(argv: list[str] | None = None, run=None) -> int:
    """The launcher. ``run``: a callable that stands in for exec'ing the command (see `_exec`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="an empty folder to build the new root on")
    parser.add_argument("--ro", action="append", default=[], help="a path to show read-only (repeatable)")
    parser.add_argument("--rw", action="append", default=[], help="a path to show writable (repeatable)")
    parser.add_argument("--readable", action="append", default=[], help="a file the sandbox's user must read")
    parser.add_argument("--cover", action="append", nargs=2, default=[], metavar=("REPLACEMENT", "PATH"),
                        help="show REPLACEMENT (a file, or a folder) in place of PATH, read-only (repeatable)")
    parser.add_argument("--cwd", default="/home/student/work")
    parser.add_argument("--memory-mb", type=int, default=None)
    parser.add_argument("--max-tasks", type=int, default=None, help="RLIMIT_NPROC (processes and threads)")
    parser.add_argument("--no-namespaces", action="store_true", help="only the limits (no sandbox)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the grader
    if args.no_namespaces:
        if args.memory_mb:
            resource.setrlimit(resource.RLIMIT_AS, (args.memory_mb << 20, args.memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _exec(command, run)
    if SYS_PIVOT_ROOT is None or not args.root:
        parser.error("the sandbox needs --root and an x86-64 or arm64 Linux")
    outside = OUTSIDE_BASE + os.getpid()
    for path in args.readable:  # the connection file, for the unprivileged id (its folder is private)
        os.chmod(path, 0o444)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        code = 127
        try:
            code = _setup(args, command, ready_w, go_r, run)
        except BaseException as exc:  # noqa: BLE001
            print(f"sandbox: {exc}", file=sys.stderr, flush=True)
        os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    if os.getuid() == 0 and os.read(ready_r, 1) == b"r":
        try:
            _write(f"/proc/{pid}/uid_map", f"0 0 1\n{INSIDE_USER} {outside} 1")
            _write(f"/proc/{pid}/gid_map", f"0 0 1\n{INSIDE_USER} {outside} 1")
            os.write(go_w, b"g")
        except OSError as exc:
            print(f"sandbox: cannot map ids: {exc}", file=sys.stderr, flush=True)
    os.close(go_w)
    os.close(ready_r)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the kernel gets SIGINT from the process group itself
    return _wait(pid)


def python_paths(python: str = sys.executable) -> list[str]:
    """What a kernel started with ``python`` needs to read: its installation, its environment, its
    import path (the course's helper package included), asked of that interpreter itself."""
    code = ("import json, sys, importlib.util\n"
            "paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]\n"
            "paths += [p for p in sys.path if p]\n"
            "spec = importlib.util.find_spec('peftlab')\n"
            "paths += list(spec.submodule_search_locations or []) if spec else []\n"
            "print(json.dumps(paths))")
    import json

    done = subprocess.run([os.path.abspath(python), "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    paths = json.loads(done.stdout) if done.returncode == 0 else [sys.prefix, sys.base_prefix]
    executable = os.path.realpath(os.path.abspath(python))
    paths.append(os.path.dirname(executable))
    return sorted({os.path.realpath(p) for p in paths if os.path.exists(p)})


SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/sys/devices/system/cpu")


_AVAILABLE: bool | None = None


def available() -> bool:
    """Whether this machine lets the grader build the sandbox (tried once, in a child process)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        if not sys.platform.startswith("linux") or SYS_PIVOT_ROOT is None:
            _AVAILABLE = False
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as root:
                ro = [p for p in SYSTEM_PATHS if os.path.exists(p) and not os.path.islink(p)] + python_paths()
                argv = [sys.executable, __file__, "--root", root, "--cwd", "/tmp"]
                for path in ro:
                    argv += ["--ro", path]
                try:
                    done = subprocess.run(argv + ["--", sys.executable, "-c", "pass"], capture_output=True, timeout=60)
                    _AVAILABLE = done.returncode == 0
                except (OSError, subprocess.TimeoutExpired):
                    _AVAILABLE = False
    return _AVAILABLE


if __name__ == "__main__":
    sys.exit(main())

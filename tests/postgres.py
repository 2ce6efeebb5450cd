"""A throwaway PostgreSQL server for the tests and benchmarks: made with the system's own binaries
(Debian's ``postgresql`` package: /usr/lib/postgresql/<version>/bin, or initdb on the PATH), in a new
folder, listening on 127.0.0.1 only, with trust authentication; stopped and deleted afterwards.

    with throwaway_server() as url:      # postgresql+psycopg://peftlab@127.0.0.1:PORT/peftlab
        ...

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user (which the Debian
package creates), in a folder that user owns."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def binaries() -> Path | None:
    """The folder of initdb, pg_ctl and postgres, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user():
    """Run as ``postgres`` when this process is root (``preexec_fn``); None otherwise."""
    if os.geteuid() != 0:
        return None, None
    user = pwd.getpwnam("postgres")

    def demote():
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return demote, user


@contextlib.contextmanager
def throwaway_server(database: str = "peftlab"):
    """A running server with an empty ``database``; yields its SQLAlchemy URL."""
    bin_dir = binaries()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    demote, user = _as_server_user()
    folder = Path(tempfile.mkdtemp(prefix="peftlab-pg-"))
    data = folder / "data"
    if user is not None:
        os.chown(folder, user.pw_uid, user.pw_gid)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC"}
    port = _free_port()

    def run(*args, **kw):
        return subprocess.run([str(bin_dir / args[0]), *args[1:]], env=env, preexec_fn=demote, cwd=folder,
                              capture_output=True, text=True, **kw)

    try:
        done = run("initdb", "-D", str(data), "-U", "peftlab", "--auth=trust", "-E", "UTF8", "--no-sync", timeout=120)
        if done.returncode:
            raise RuntimeError(f"initdb failed: {done.stderr[-1500:]}")
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={folder} -c fsync=off " \
                  f"-c max_connections=200"
        done = run("pg_ctl", "-D", str(data), "-o", options, "-l", str(folder / "server.log"), "-w", "-t", "60",
                   "start", timeout=90)
        if done.returncode:
            log = (folder / "server.log").read_text(errors="replace") if (folder / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stderr[-800:]} {log[-800:]}")
        deadline = time.monotonic() + 30
        while run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "peftlab", database, timeout=30).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not accept connections")
            time.sleep(0.3)
        yield f"postgresql+psycopg://peftlab@127.0.0.1:{port}/{database}"
    finally:
        if (data / "postmaster.pid").exists():
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(folder, ignore_errors=True)

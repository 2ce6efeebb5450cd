"""The kernel's sandbox (`autograder/sandbox.py`) from outside: what a process inside can read, write,
reach and see. Skipped where the machine forbids user namespaces (the grader then says so)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from notebooks import ROOT

sys.path.insert(0, str(ROOT))
from autograder import sandbox  # noqa: E402
from autograder.launch import sandbox_read_only  # noqa: E402

pytestmark = pytest.mark.skipif(not sandbox.available(), reason="user namespaces are not available here")

PROBE = r'''
import json, os, socket, subprocess, sys
secret, scratch, unix, abstract, port = sys.argv[1:6]
out = {"uid": os.getuid(), "cwd": os.getcwd(), "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}
out["sees"] = {path: os.path.exists(path) for path in
               [secret, os.path.join(sys.argv[6], "solutions"), os.path.join(sys.argv[6], "autograder"),
                os.path.join(sys.argv[6], "README.md"), "/etc/shadow", "/run", "/root/.bashrc"]}
out["tmp"] = os.listdir("/tmp")
writes = {}
for path in [os.path.join(sys.prefix, "evil.pth"), os.path.join(sys.argv[6], "src", "peftlab", "evil.py"),
             os.path.join(sys.argv[6], "evil.txt"), "/usr/evil", "/evil", os.path.join(scratch, "ok.txt"),
             "/tmp/ok.txt", os.path.join(os.environ.get("HOME", "/home/student"), "ok.txt")]:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("x")
        writes[path] = True
    except OSError:
        writes[path] = False
out["writes"] = writes
reach = {}
for label, family, address in [("tcp", socket.AF_INET, ("127.0.0.1", int(port))), ("unix", socket.AF_UNIX, unix),
                               ("abstract", socket.AF_UNIX, "\0" + abstract)]:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(address)
            reach[label] = True
    except OSError:
        reach[label] = False
out["reach"] = reach
out["remount"] = subprocess.run(["mount", "-o", "remount,rw", "/usr"], capture_output=True).returncode
out["umount"] = subprocess.run(["umount", "-l", "/usr"], capture_output=True).returncode
import peftlab, torch  # the course's helper package and the libraries are there, read-only
out["imports"] = bool(peftlab.__file__) and torch.__version__ is not None
print(json.dumps(out))
'''


@pytest.fixture()
def inside(tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "answers.txt").write_text("42")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    unix = str(tmp_path / "outside.sock")
    unix_server = socket.socket(socket.AF_UNIX)
    unix_server.bind(unix)
    unix_server.listen()
    abstract = f"peftlab-{uuid.uuid4().hex[:8]}"
    abstract_server = socket.socket(socket.AF_UNIX)
    abstract_server.bind("\0" + abstract)
    abstract_server.listen()
    accepted = []
    for s in (server, unix_server, abstract_server):
        threading.Thread(target=lambda s=s: accepted.append(s.accept()), daemon=True).start()
    scratch.chmod(0o777)  # as the grader leaves the kernel's socket folder while it starts
    argv = [sys.executable, str(ROOT / "autograder" / "sandbox.py"), "--root", str(root), "--rw", str(scratch),
            "--memory-mb", "4000", "--cwd", "/home/student/work"]
    for path in sandbox_read_only():
        argv += ["--ro", path]
    argv += ["--", sys.executable, "-c", PROBE, str(secret / "answers.txt"), str(scratch), unix, abstract,
             str(server.getsockname()[1]), str(ROOT)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": "/home/student"})
    for s in (server, unix_server, abstract_server):
        s.close()
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), scratch, accepted


def test_nothing_of_the_course_or_the_host_is_visible(inside):
    out, scratch, _ = inside
    assert not any(out["sees"].values()), out["sees"]
    # /tmp is private: it holds only the way to the kernel's own scratch folder and to the read-only
    # paths it is given (the environment, when the checkout itself lies in /tmp)
    expected = sorted({Path(p).relative_to("/tmp").parts[0] for p in [str(scratch), *sandbox_read_only()]
                       if p.startswith("/tmp/")})
    assert sorted(out["tmp"]) == expected and out["pids"] == [1] and out["imports"]


def test_only_scratch_space_is_writable(inside):
    out, scratch, _ = inside
    writable = {path for path, ok in out["writes"].items() if ok}
    assert writable == {str(scratch / "ok.txt"), "/tmp/ok.txt", "/home/student/ok.txt"}, out["writes"]
    assert not (ROOT / "evil.txt").exists() and not (ROOT / "src" / "peftlab" / "evil.py").exists()
    assert out["remount"] != 0 and out["umount"] != 0, "the read-only mounts must stay locked"


def test_no_connection_leaves_the_sandbox(inside):
    out, _, accepted = inside
    assert out["reach"] == {"tcp": False, "unix": False, "abstract": False}
    assert accepted == []


def test_a_root_grader_runs_kernels_as_an_unprivileged_user(inside):
    out, scratch, _ = inside
    assert out["uid"] == 0  # root inside its own namespaces only
    if os.getuid() == 0:
        owner = (scratch / "ok.txt").stat().st_uid
        assert owner >= sandbox.OUTSIDE_BASE, f"the file a kernel wrote belongs to uid {owner} outside"


REFERENCE_PROBE = r'''
import glob, importlib.util, json, os, subprocess
import peftlab.reference as reference
out = {"file": reference.__file__, "stub": "while work is graded" in open(reference.__file__).read()}
try:
    reference.peft_lora_count(None, 8, ["q_proj"])
    out["call"] = "returned"
except Exception as exc:
    out["call"] = type(exc).__name__
cache = os.path.join(os.path.dirname(reference.__file__), "__pycache__")
out["compiled"] = {path: os.path.getsize(path) for path in glob.glob(os.path.join(cache, "reference.*.pyc"))}
out["umount"] = subprocess.run(["umount", "-l", reference.__file__], capture_output=True).returncode
out["names"] = sorted(reference.__all__)
print(json.dumps(out))
'''


def test_the_tests_reference_code_is_not_in_the_sandbox(tmp_path):
    """While work is graded, peftlab.reference is a stub that raises, its compiled copies are empty,
    and neither can be uncovered from inside."""
    import py_compile

    from autograder.launch import reference_covers
    from peftlab import reference

    py_compile.compile(reference.__file__, doraise=True)  # a real compiled copy to hide, as a fresh checkout has
    root = tmp_path / "root"
    root.mkdir()
    argv = [sys.executable, str(ROOT / "autograder" / "sandbox.py"), "--root", str(root), "--memory-mb", "4000",
            "--cwd", "/home/student/work"]
    for path in sandbox_read_only():
        argv += ["--ro", path]
    covers = reference_covers(tmp_path / "covers")
    assert len(covers) >= 2, covers
    for replacement, path in covers:
        argv += ["--cover", replacement, path]
    done = subprocess.run(argv + ["--", sys.executable, "-c", REFERENCE_PROBE], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HOME": "/home/student", "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["stub"] and out["call"] == "ReferenceUnavailable", out
    assert out["compiled"] and not any(out["compiled"].values()), out["compiled"]
    assert out["umount"] != 0 and out["names"] == sorted(reference.__all__)
    assert "def peft_lora_count" in Path(reference.__file__).read_text(), "outside, the real module is untouched"

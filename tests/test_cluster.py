"""Grading on a Dask cluster (`autograder.cluster`, ``--scheduler``) gives the grades the local path
gives, and a worker lost in the middle of the run costs a retry, not a grade. The cluster is a
LocalCluster on the loopback interface, started by the test and closed after it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import nbformat
import pytest

from notebooks import ROOT, SOLUTIONS, isolated_env, seeded_cache
from test_autograder import NAME, SLOPPY, student

pytest.importorskip("distributed")
pytestmark = pytest.mark.slow

@pytest.fixture(autouse=True)
def _environment_kept():
    """A LocalCluster made here writes OMP_NUM_THREADS=1 (and more) into this process's environment
    whenever it starts a worker: without this, every kernel the rest of the suite starts would run on
    one thread (it made notebooks 07 and 08 take 1.5-2 times as long)."""
    from autograder.cluster import kept_environ

    with kept_environ():
        yield


CLASS = {"honest": student(), "sloppy": student(answers=SLOPPY), "stub": None}


def _grade(tmp, label, extra=(), during=None):
    root, inbox = tmp / label / "course-root", tmp / label / "inbox"
    shutil.copytree(SOLUTIONS / NAME, root / "solutions" / NAME)
    release = (ROOT / "course" / NAME / f"{NAME}.ipynb").read_text()
    for name, nb in CLASS.items():
        (inbox / name).mkdir(parents=True)
        (inbox / name / f"{NAME}.ipynb").write_text(release if nb is None else nbformat.writes(nb))
    cache = tmp / "cache"
    if not cache.exists():
        seeded_cache(cache)
    env = {**os.environ, **isolated_env(tmp / label / "home", cache), "PEFTLAB_COURSE_ROOT": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "autograder.grade", str(inbox), "--workers", "2", "--cell-timeout", "30",
                             "--quiet", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if during is not None:
        during()
    out, err = proc.communicate(timeout=1500)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    report = json.loads((root / "autograder" / "reports" / "report.json").read_text())
    return {s["name"]: (s["status"], s["score"]) for s in report["submissions"]}, out


def test_a_cluster_grades_as_the_local_path_does_even_when_a_worker_dies(tmp_path):
    from dask.distributed import Client, LocalCluster

    local, _ = _grade(tmp_path, "local")
    assert local["honest"][1] > local["sloppy"][1] > local["stub"][1] == 0, local

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None)
    client = Client(cluster)
    killed = []

    def kill_a_busy_worker():  # once a task runs, kill the process of the worker running it
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            busy = [w for w, keys in client.processing().items() if keys]
            if busy:
                time.sleep(2)  # inside its task, past the start
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, 9)
                killed.append(busy[0])
            time.sleep(0.2)

    try:
        watcher = threading.Thread(target=kill_a_busy_worker)
        remote, out = _grade(tmp_path, "cluster", ["--scheduler", cluster.scheduler_address], during=watcher.start)
        watcher.join(timeout=5)
    finally:
        client.close()
        cluster.close()
    assert killed, "the test killed no worker"
    assert remote == local, f"local {local}, cluster {remote}"


def test_grading_on_a_local_cluster_leaves_the_environment_alone():
    from autograder.cluster import Cluster

    before = dict(os.environ)
    Cluster("local:1", 60).run([], lambda job, error: None)
    assert dict(os.environ) == before, {k: v for k, v in os.environ.items() if before.get(k) != v}


def test_a_local_cluster_by_name(tmp_path):
    remote, out = _grade(tmp_path, "named", ["--scheduler", "local:2"])
    assert remote["honest"][0] == "graded" and remote["stub"][1] == 0, remote

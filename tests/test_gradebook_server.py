"""The gradebook on a PostgreSQL server (`autograder.gradebook`): a class graded on a LocalCluster,
each grading process scoring into the server, gives the grades, reports, feedback and item analysis
of the local path with its SQLite file, even when a worker dies mid-run; two grading runs at once on
one server lose nothing. The server is a throwaway one (`tests/postgres.py`) on 127.0.0.1."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import nbformat
import pytest

from notebooks import ROOT, SOLUTIONS, isolated_env, seeded_cache
from postgres import binaries, throwaway_server
from test_autograder import NAME, SLOPPY, _completed, student

pytest.importorskip("distributed")
pytest.importorskip("psycopg")
pytestmark = pytest.mark.slow
if binaries() is None:  # CI installs PostgreSQL (.ci/run): there a missing server is a failure, not a skip
    if os.environ.get("CI"):
        raise RuntimeError("PostgreSQL is not installed: .ci/run installs Debian's postgresql package")
    pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)", allow_module_level=True)

sys.path.insert(0, str(ROOT))
from autograder import gradebook  # noqa: E402

OTHER = "05_quantization"
CLASS = {"honest": student(), "sloppy": student(answers=SLOPPY), "stub": None}


@pytest.fixture(autouse=True)
def _environment_kept():
    from autograder.cluster import kept_environ  # a LocalCluster's nanny changes this process's environment

    with kept_environ():
        yield


@pytest.fixture(scope="module")
def server():
    with throwaway_server() as url:
        yield url


def _fresh_database(url: str, name: str) -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"create database {name}"))
    engine.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"


def _inbox(folder, assignment: str, students: dict):
    release = (ROOT / "course" / assignment / f"{assignment}.ipynb").read_text()
    for name, nb in students.items():
        (folder / name).mkdir(parents=True)
        (folder / name / f"{assignment}.ipynb").write_text(release if nb is None else nbformat.writes(nb))
    return folder


def _start(tmp, label, inbox, assignments, extra=()):
    root = tmp / label / "course-root"
    for assignment in assignments:
        shutil.copytree(SOLUTIONS / assignment, root / "solutions" / assignment)
    cache = tmp / "cache"
    if not cache.exists():
        seeded_cache(cache)
    env = {**os.environ, **isolated_env(tmp / label / "home", cache), "PEFTLAB_COURSE_ROOT": str(root)}
    env.pop(gradebook.ENV, None)
    proc = subprocess.Popen([sys.executable, "-m", "autograder.grade", str(inbox), "--cell-timeout", "30", "--quiet",
                             *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return root, proc


def _finish(root, proc) -> dict:
    out, err = proc.communicate(timeout=1500)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    autograder = root / "autograder"
    report = json.loads((autograder / "reports" / "report.json").read_text())
    feedback = {p.relative_to(autograder / "feedback").as_posix(): _steady(p.read_text())
                for p in (autograder / "feedback").rglob("*.html")}
    items = json.loads((autograder / "reports" / "items.json").read_text())
    return {"rows": {(s["name"], s["assignment"]): (s["status"], s["score"], s["max_score"], s["flags"])
                     for s in report["submissions"]},
            "grades": sorted(map(tuple, csv.reader(io.StringIO((autograder / "grades.csv").read_text())))),
            "feedback": feedback, "items": items, "phases": report["phases"], "out": out}


def _steady(page: str) -> str:
    """A feedback page without what differs from run to run: nbgrader's time stamps."""
    return re.sub(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?", "<time>", page)


def test_a_class_on_a_cluster_scored_into_postgres_matches_the_local_sqlite_path(tmp_path, server):
    from dask.distributed import Client, LocalCluster

    inbox = _inbox(tmp_path / "inbox", NAME, CLASS)
    local = _finish(*_start(tmp_path, "local", inbox, [NAME], ["--workers", "2"]))
    assert local["rows"][("honest", NAME)][1] > local["rows"][("sloppy", NAME)][1] > local["rows"][("stub", NAME)][1] == 0

    url = _fresh_database(server, "cluster_class")
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None)
    client = Client(cluster)
    killed = []

    def kill_a_busy_worker():  # once a task runs, kill the Dask worker running it
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            busy = [w for w, keys in client.processing().items() if keys]
            if busy:
                time.sleep(2)
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, 9)
                killed.append(busy[0])
            time.sleep(0.2)

    try:
        root, proc = _start(tmp_path, "cluster", inbox, [NAME], ["--scheduler", cluster.scheduler_address,
                                                                 "--gradebook", url])
        watcher = threading.Thread(target=kill_a_busy_worker)
        watcher.start()
        remote = _finish(root, proc)
        watcher.join(timeout=5)
    finally:
        client.close()
        cluster.close()
    assert killed, "the test killed no worker"
    assert remote["rows"] == local["rows"]
    assert remote["grades"] == local["grades"]
    assert remote["feedback"] == local["feedback"] and len(local["feedback"]) == len(CLASS)
    assert remote["items"] == local["items"]
    assert "execute and score" in remote["phases"] and "gather and export" in remote["phases"]
    assert not (root / "autograder" / "gradebook.db").exists(), "nothing was written to a SQLite gradebook"
    scores = gradebook.scores(url, [(name, NAME) for name in CLASS])
    assert {name: scores[(name, NAME)][0] for name in CLASS} == {name: local["rows"][(name, NAME)][1] for name in CLASS}


def test_two_runs_at_once_on_one_postgres_gradebook_lose_nothing(tmp_path, server):
    """Two grading runs (two assignments, the same students, two course folders: two teaching
    assistants) start together on an empty database."""
    url = _fresh_database(server, "two_runs")
    first = _inbox(tmp_path / "inbox-a", NAME, {"alice": student(), "bob": None})
    second = _inbox(tmp_path / "inbox-b", OTHER, {"alice": _completed(OTHER), "bob": None})
    runs = [_start(tmp_path, "a", first, [NAME], ["--workers", "1", "--gradebook", url]),
            _start(tmp_path, "b", second, [OTHER], ["--workers", "1", "--gradebook", url])]
    a, b = (_finish(*run) for run in runs)
    assert a["rows"][("alice", NAME)][1] > 0 == a["rows"][("bob", NAME)][1], a["rows"]
    assert b["rows"][("alice", OTHER)][1] == b["rows"][("alice", OTHER)][2] > 0 == b["rows"][("bob", OTHER)][1], b["rows"]
    kept = gradebook.scores(url, [(s, n) for s in ("alice", "bob") for n in (NAME, OTHER)])
    assert {key: points for key, (points, _) in kept.items()} == {
        (s, n): run["rows"][(s, n)][1] for run, n in ((a, NAME), (b, OTHER)) for s in ("alice", "bob")}
    exported = {(row[0], row[3]) for row in b["grades"] + a["grades"] if row[0] in (NAME, OTHER)}
    assert {(n, s) for n in (NAME, OTHER) for s in ("alice", "bob")} <= exported, "each export holds the whole gradebook"

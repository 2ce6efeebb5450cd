"""Choosing the gradebook (`autograder.gradebook`): the SQLite file by default, a server when
$PEFTLAB_GRADEBOOK_URL names one; a password never shown; an unreachable server stops the run before
any notebook is graded; the students' kernels never see the URL. The server itself is exercised in
tests/test_gradebook_server.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from notebooks import ROOT

sys.path.insert(0, str(ROOT))
from autograder import gradebook  # noqa: E402

SERVER = "postgresql+psycopg://grader:s3cret@db.example:5432/peftlab"


def test_sqlite_by_default_and_a_server_when_named(tmp_path, monkeypatch):
    monkeypatch.delenv(gradebook.ENV, raising=False)
    url = gradebook.url_for(tmp_path)
    assert url == f"sqlite:///{tmp_path / 'autograder' / 'gradebook.db'}" and not gradebook.is_server(url)
    monkeypatch.setenv(gradebook.ENV, SERVER)
    assert gradebook.url_for(tmp_path) == SERVER and gradebook.is_server(SERVER)
    assert "s3cret" not in gradebook.shown(SERVER) and "db.example" in gradebook.shown(SERVER)


def test_nbgrader_reads_the_same_gradebook(tmp_path):
    """Every nbgrader command (formgrader, export) sees the gradebook the grader uses."""
    code = ("import os; from traitlets.config.loader import PyFileConfigLoader\n"
            "for url in ('', os.environ['SERVER']):\n"
            f"    os.environ['{gradebook.ENV}'] = url\n"
            "    print(PyFileConfigLoader('nbgrader_config.py', path='.').load_config().CourseDirectory.db_url)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PEFTLAB_COURSE_ROOT": str(tmp_path), "SERVER": SERVER})
    assert done.stdout.split() == [f"sqlite:///{tmp_path / 'autograder' / 'gradebook.db'}", SERVER], done.stderr[-1500:]


def test_asking_a_missing_sqlite_gradebook_does_not_make_one(tmp_path):
    url = f"sqlite:///{tmp_path / 'gradebook.db'}"
    assert not gradebook.has_assignment(url, "01_memory_math") and not (tmp_path / "gradebook.db").exists()


@pytest.mark.parametrize("url, says", [("postgresql+psycopg://grader@127.0.0.1:9/peftlab", "cannot reach the gradebook"),
                                       ("nosuchdb://x/y", "is not usable")])
def test_an_unusable_gradebook_stops_the_run_with_a_clear_message(url, says):
    with pytest.raises(SystemExit) as stop:
        gradebook.check(url)
    assert says in str(stop.value)


def test_kernels_never_see_the_gradebook_url(tmp_path, monkeypatch):
    from autograder.kernel import Limits
    from autograder.launch import kernel_spec

    monkeypatch.setenv(gradebook.ENV, SERVER)
    _, env, _ = kernel_spec(Path(tmp_path), Limits(), use_sandbox=False, expose=[], threads=1, left_out=[])
    assert gradebook.ENV not in env and not any("s3cret" in value for value in env.values())

"""The instructor's grading command against a class of broken, Colab-rewritten and hostile submissions.

One grading run (notebook 01, two workers) over twenty kinds of submission; each test then checks
one submission's automatic score and flags. Scores are derived from notebook 01's points: 14
automatic points in all; `training_memory_bytes` 3, the compute section 4, `llama_param_count` 3,
the quiz 4.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import uuid
import zipfile
from pathlib import Path

import nbformat
import pytest

from notebooks import COURSE, ROOT, SOLUTIONS, isolated_env

sys.path.insert(0, str(ROOT))
from autograder import sandbox  # noqa: E402
from autograder.feedback import failing_line, hidden_lines  # noqa: E402

NAME = "01_memory_math"
FULL = 14
SANDBOX = sandbox.available()


def _answers() -> dict[str, str]:
    """The solution's answer cells as a student would write them (without nbgrader's markers)."""
    nb = nbformat.read(SOLUTIONS / NAME / f"{NAME}.ipynb", as_version=4)
    answers = {}
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            answers[meta["grade_id"]] = "\n".join(line for line in cell.source.splitlines()
                                                  if "### BEGIN SOLUTION" not in line and "### END SOLUTION" not in line)
    return answers


def student(edit=None, answers: dict | None = None):
    """The release notebook with every answer filled in (as a student would submit it), then ``edit``."""
    nb = nbformat.read(COURSE / NAME / f"{NAME}.ipynb", as_version=4)
    answers = {**_answers(), **(answers or {})}
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in answers and cell.metadata["nbgrader"].get("solution"):
            cell.source = answers[gid]
    if edit:
        edit(nb)
    return nb


def index(nb, grade_id: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)


def _delete(grade_id):
    return lambda nb: nb.cells.pop(index(nb, grade_id))


def _replace_test(nb):
    nb.cells[index(nb, "quiz_q4")].source = "pass"


def _move_answer_to_end(nb):
    cell = nb.cells.pop(index(nb, "llama_param_count"))
    nb.cells.append(nbformat.v4.new_code_cell(cell.source))


def _reorder(nb):
    cell = nb.cells.pop(index(nb, "quiz_answers"))
    nb.cells.insert(index(nb, "quiz_q4") + 1, cell)


def _duplicate(nb):
    i = index(nb, "quiz_answers")
    copy = nbformat.from_dict(json.loads(json.dumps(nb.cells[i])))
    copy.id = "copy-of-quiz"
    copy.source = 'q1_answer = "z"'
    nb.cells.insert(i + 1, copy)


def _colab(nb):
    for cell in nb.cells:
        cell.metadata.pop("nbgrader", None)
        cell.id = uuid.uuid4().hex[:12]
        cell.metadata["id"] = cell.id
        if cell.cell_type == "code":
            cell.metadata["colab"] = {"base_uri": "https://localhost:8080/"}
            cell.metadata["outputId"] = uuid.uuid4().hex
    nb.metadata = {"colab": {"provenance": [], "name": f"{NAME}.ipynb"},
                   "kernelspec": {"name": "python3", "display_name": "Python 3"}, "language_info": {"name": "python"},
                   "accelerator": "GPU"}


def _huge_stored_output(nb):
    cell = nb.cells[index(nb, "quiz_answers")]
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="x" * 30_000_000)]


MONKEYPATCH = '''
import builtins, torch
from peftlab import checks
checks.assert_close = lambda *a, **k: None
torch.allclose = lambda *a, **k: True
assert_close = lambda *a, **k: None
get_ipython().showtraceback = lambda *a, **k: None
def training_memory_bytes(n_params, n_trainable=None, weight_bytes=2, grad_bytes=2, optimizer_bytes=8):
    return 0
'''

STEAL = '''
import glob, json
found = glob.glob("{root}/solutions/**/01_memory_math.ipynb", recursive=True)
for path in found:
    for cell in json.load(open(path))["cells"]:
        if cell["metadata"].get("nbgrader", {{}}).get("grade_id") == "training_memory_bytes":
            exec("".join(cell["source"]))
if not found:
    raise FileNotFoundError("no solutions to copy")
'''

LEAK = '''
import socket
try:
    with socket.create_connection(("127.0.0.1", {port}), timeout=3) as connection:
        connection.sendall(b"leaked answers")
except OSError:
    pass
'''


class Listener:
    """A TCP server on 127.0.0.1 that records whatever reaches it."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.port = self.server.getsockname()[1]
        self.received = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            with connection:
                self.received.append(connection.recv(1000))

    def close(self):
        self.server.close()


# name -> (how the file is made, automatic points expected, flag expected (regex) or None)
def cases(root: Path, port: int) -> dict:
    memory = _answers()["training_memory_bytes"]
    return {
        "honest": (student(), FULL, None),
        "invalid_json": ("{ this is not json", 0, None),
        "truncated": (lambda: nbformat.writes(student())[:5000], 0, None),
        "empty_notebook": (nbformat.v4.new_notebook(), 0, "empty notebook"),
        "test_deleted": (student(_delete("quiz_q1")), FULL, "test cell quiz_q1 was deleted"),
        "test_replaced_by_pass": (student(_replace_test, answers={"quiz_answers": _answers()["quiz_answers"] + "\nq4_answer = 'z'"}),
                                  FULL - 1, "test cell quiz_q4 was modified"),
        "answer_moved_to_the_end": (student(_move_answer_to_end), FULL - 3, "answer cell llama_param_count was deleted"),
        "cells_reordered": (student(_reorder), FULL, "moved out of the release's order"),
        "answer_duplicated": (student(_duplicate), FULL - 1, "appears 2 times"),  # both copies run; the second is wrong
        "infinite_loop": (student(answers={"training_flops": "while True:\n    pass\n" + _answers()["training_flops"]}),
                          FULL - 4, "ran past the 10 s limit"),
        "memory_bomb": (student(answers={"training_flops": "hoard = []\nwhile True:\n    hoard.append(bytearray(10**8))\n"
                                                           + _answers()["training_flops"]}), FULL - 4, "memory limit"),
        "sys_exit": (student(answers={"quiz_answers": "import sys\nsys.exit()\n" + _answers()["quiz_answers"]}),
                     FULL - 4, r"suspicious code \(exits the kernel\)"),
        "os_exit": (student(answers={"quiz_answers": "import os\nos._exit(1)\n" + _answers()["quiz_answers"]}),
                    FULL - 4, "kernel died"),
        "monkeypatch": (student(answers={"training_memory_bytes": MONKEYPATCH}), FULL - 3, "test machinery changed"),
        "reads_solutions": (student(answers={"training_memory_bytes": STEAL.format(root=root)}),
                            FULL - 3 if SANDBOX else FULL, r"suspicious code \(reads grading files\)"),
        "network": (student(answers={"training_memory_bytes": LEAK.format(port=port) + memory}), FULL,
                    r"suspicious code \(network\)"),
        "colab_rewrite": (student(_colab), FULL, None),
        "nbformat_v3": (lambda: nbformat.writes(nbformat.convert(student(), 3), version=3), FULL, None),
        "huge_stored_output": (student(_huge_stored_output), FULL, None),
        "huge_printed_output": (student(answers={"quiz_answers": "print('y' * 3_000_000)\n" + _answers()["quiz_answers"]}),
                                FULL, None),
    }


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grading")
    root, inbox = tmp / "course-root", tmp / "inbox"
    shutil.copytree(SOLUTIONS / NAME, root / "solutions" / NAME)
    inbox.mkdir()
    listener = Listener()
    expected = {}
    for name, (made, points, flag) in cases(root, listener.port).items():
        content = made() if callable(made) else made
        if not isinstance(content, str):
            content = nbformat.writes(content)
        folder = inbox / name  # one folder per student, as learning platforms export them
        folder.mkdir()
        (folder / f"{NAME}.ipynb").write_text(content)
        expected[name] = (points, flag)
    archive = tmp / "submissions.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in inbox.rglob("*.ipynb"):
            z.write(path, path.relative_to(inbox))
    env = {**os.environ, **isolated_env(tmp / "home", tmp / "cache"), "PEFTLAB_COURSE_ROOT": str(root)}
    done = subprocess.run([sys.executable, "-m", "autograder.grade", str(archive), "--workers", "2",
                           "--cell-timeout", "10", "--memory-gb", "3", "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    listener.close()
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((root / "autograder" / "reports" / "report.json").read_text())
    return {"root": root, "report": {s["student"]: s for s in report["submissions"]}, "expected": expected,
            "received": listener.received, "stdout": done.stdout, "env": env, "archive": archive}


def _auto_score(root: Path, student_id: str) -> float:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{root / 'autograder' / 'gradebook.db'}") as gb:
        return gb.find_submission(NAME, student_id).code_score


CASES = list(cases(Path("/x"), 1))


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_each_bad_submission_is_graded_as_expected(graded, name):
    points, flag = graded["expected"][name]
    row = graded["report"][name]
    assert _auto_score(graded["root"], name) == points, (name, row)
    flags = " | ".join(row["flags"])
    if flag:
        assert re.search(flag, flags), f"{name}: expected a flag matching {flag!r}, got {flags!r}"
    elif name not in ("empty_notebook",):
        assert not row["flags"], f"{name} should not be flagged: {flags}"
    if name in ("invalid_json", "truncated", "empty_notebook"):
        assert row["status"] == "failed" and row["reason"], row
    else:
        assert row["status"] == "graded", row


@pytest.mark.slow
def test_the_run_reports_repairs_and_conversions(graded):
    notes = {name: " | ".join(row["notes"]) for name, row in graded["report"].items()}
    assert "nbgrader metadata missing" in notes["colab_rewrite"]
    assert "converted from nbformat 3" in notes["nbformat_v3"]
    assert "output of cell" in notes["huge_printed_output"]
    assert "graded" in graded["stdout"] and "failed" in graded["stdout"] and "flagged" in graded["stdout"]


@pytest.mark.slow
def test_no_network_from_student_code(graded):
    if not SANDBOX:
        pytest.skip("user namespaces are not available here: the grader says the sandbox is off")
    assert graded["received"] == [], "a student's kernel reached a server on this machine"


@pytest.mark.slow
def test_grades_are_exported_for_every_student(graded):
    import csv

    rows = list(csv.DictReader(open(graded["root"] / "autograder" / "grades.csv")))
    assert {r["student_id"] for r in rows} == set(CASES)
    assert float(next(r for r in rows if r["student_id"] == "honest")["raw_score"]) == FULL


@pytest.mark.slow
def test_feedback_never_shows_hidden_tests(graded):
    source = nbformat.read(SOLUTIONS / NAME / f"{NAME}.ipynb", as_version=4)
    release = nbformat.reads((COURSE / NAME / f"{NAME}.ipynb").read_text(), as_version=4)
    visible = "\n".join(cell.source for cell in release.cells)
    hidden = [line.strip() for cell in source.cells for n, line in enumerate(cell.source.splitlines(), 1)
              if n in hidden_lines(cell.source) and len(line.strip()) > 12 and "HIDDEN TESTS" not in line
              and line.strip() not in visible]  # lines that also appear in the release give nothing away
    assert hidden
    pages = list((graded["root"] / "autograder" / "feedback").rglob("*.html"))
    assert len(pages) >= len(CASES) - 3  # unreadable files get no feedback page
    for page in pages:
        text = page.read_text()
        leaked = [line for line in hidden if line in text]
        assert not leaked, f"{page} shows hidden test lines: {leaked[:2]}"
    wrong = (graded["root"] / "autograder" / "feedback" / "monkeypatch" / NAME / f"{NAME}.html").read_text()
    assert "a visible test failed" in wrong or "a hidden test failed" in wrong


def test_traceback_line_parsing():
    tb = ["\x1b[0;31mAssertionError\x1b[0m  Traceback", "Cell \x1b[0;32mIn[12], line 7\x1b[0m\n  assert x"]
    assert failing_line(tb) == 7
    assert hidden_lines("a\n### BEGIN HIDDEN TESTS\nb\n### END HIDDEN TESTS\nc") == {2, 3, 4}


@pytest.mark.slow
def test_regrading_gives_the_same_grades(graded):
    before = (graded["root"] / "autograder" / "grades.csv").read_text()
    subset = graded["archive"].parent / "again"
    with zipfile.ZipFile(graded["archive"]) as z:
        for name in ("honest", "os_exit", "invalid_json"):
            z.extract(f"{name}/{NAME}.ipynb", subset)
    done = subprocess.run([sys.executable, "-m", "autograder.grade", str(subset), "--workers", "2", "--quiet"],
                          cwd=ROOT, env=graded["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (graded["root"] / "autograder" / "grades.csv").read_text() == before
    assert list((graded["root"] / "autograder" / "backups").glob("gradebook-*.db")), "the gradebook is backed up first"


def test_sandbox_hides_folders_and_the_network(tmp_path):
    if not SANDBOX:
        pytest.skip("user namespaces are not available here")
    secret, job = tmp_path / "secret", tmp_path / "job"
    secret.mkdir()
    job.mkdir()
    (secret / "answers.txt").write_text("42")
    probe = ("import os, socket\n"
             f"print(os.path.exists({str(secret / 'answers.txt')!r}), os.listdir({str(job)!r}))\n"
             "try:\n    socket.create_connection(('127.0.0.1', 22), timeout=2)\nexcept OSError as e:\n    print('net', e.errno)\n"
             f"open({str(job / 'out.txt')!r}, 'w').write('ok')\n")
    done = subprocess.run([sys.executable, str(ROOT / "autograder" / "sandbox.py"), "--hide", str(tmp_path),
                           "--expose", str(job), "--memory-mb", "2000", "--", sys.executable, "-c", probe],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False []"), done.stdout
    assert "net " in done.stdout and (job / "out.txt").read_text() == "ok"

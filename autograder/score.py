"""Stage 4, score: nbgrader scores the judged notebooks (without running them again: Execute and
ClearOutput off), writes feedback that hides hidden tests, and exports the grades, all in one nbgrader
process (`autograder.nbgrader_batch`); the gradebook is copied before every run. A submission that could
not be graded is scored as a stand-in: the release with every test failed and the reason."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import nbformat

from autograder.execute import _error_output, _is_test
from autograder.records import Submission
from autograder.release import nbgrader_batch


def stand_in(release_nb, reason: str):
    """A stand-in for a file that cannot be graded: the release with every test failed, not run."""
    nb = nbformat.from_dict(json.loads(json.dumps(release_nb)))
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [_error_output("NotGraded", f"the submission could not be graded: {reason}")] if _is_test(cell) else []
    return nb


def _plan(root: Path, submissions: list[Submission]) -> list[list[str]]:
    """nbgrader's commands: autograde and feedback per assignment, then the export."""
    plan = []
    for name in sorted({s.assignment for s in submissions}):
        # Students graded before and not in this run are left alone: nbgrader would score (and write
        # feedback for) every submission of the assignment again, so regrading a few cost the class.
        earlier = {p.parent.name for p in (root / "autograder" / "submitted").glob(f"*/{name}")}
        others = sorted(earlier - {s.student for s in submissions if s.assignment == name})
        keep = [f"--CourseDirectory.student_id_exclude={','.join(others)}"] if others else []
        plan += [["autograde", name, "--force", "--Execute.enabled=False", "--ClearOutput.enabled=False",
                  "--Autograde.create_student=True", *keep], ["generate_feedback", name, "--force", *keep]]
    plan.append(["export", "--to", str(root / "autograder" / "grades.csv")])
    return plan


def scores(root: Path, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[float, float]]:
    """(score, max score) of each (student, assignment) the gradebook holds."""
    from nbgrader.api import Gradebook, MissingEntry

    out = {}
    with Gradebook(f"sqlite:///{root / 'autograder' / 'gradebook.db'}") as gb:
        for student, assignment in pairs:
            try:
                sub = gb.find_submission(assignment, student)
            except MissingEntry:
                continue
            out[(student, assignment)] = (sub.score, sub.max_score)
    return out


def score(root: Path, submissions: list[Submission], executed: dict, releases: dict, work: Path) -> list[str]:
    """Score every submission (``executed``: the judged notebooks; a failed submission's stand-in is
    made from ``releases``) and set its score and status; notes on what nbgrader reported."""
    gradebook = root / "autograder" / "gradebook.db"
    if gradebook.exists():
        backups = root / "autograder" / "backups"
        backups.mkdir(exist_ok=True)
        shutil.copy2(gradebook, backups / f"gradebook-{time.strftime('%Y%m%d-%H%M%S')}.db")
    for sub in submissions:
        target = root / "autograder" / "submitted" / sub.student / sub.assignment
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        nb = stand_in(releases[sub.assignment], sub.reason) if sub.status == "failed" else executed[sub]
        nbformat.write(nb, target / f"{sub.assignment}.ipynb")
    notes = []
    for step in nbgrader_batch(root, _plan(root, submissions), work):  # one nbgrader process for the whole run
        if step["returncode"] != 0:
            notes.append(f"nbgrader {' '.join(step['args'][:2])} reported problems:\n{step['log'][-2000:]}")
    graded = scores(root, [(s.student, s.assignment) for s in submissions])
    for s in submissions:
        if (s.student, s.assignment) in graded:
            s.score, s.max_score = graded[(s.student, s.assignment)]
            if s.status == "pending":
                s.status = "graded"
        else:
            s.status, s.reason = "failed", s.reason or "nbgrader could not score it"
    return notes

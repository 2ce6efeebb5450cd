"""Stage 4, score: nbgrader scores the judged notebooks (without running them again: Execute and
ClearOutput off), writes feedback that hides hidden tests, and exports the grades.

Where the scoring runs depends on the gradebook (`autograder.gradebook`):
- a SQLite file (one machine): here, after every notebook was judged, all in one nbgrader process
  (`autograder.nbgrader_batch`); the gradebook is copied before every run;
- a database server: in the grading process that judged the notebook, on whichever machine that is
  (`score_here`), which writes the scores to the gradebook and hands back nbgrader's autograded notebook
  and feedback; here the run only gathers those files, scores what no grading process could, and
  exports the grades.

A submission that could not be graded is scored as a stand-in: the release with every test failed and
the reason."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import nbformat

from autograder import gradebook
from autograder.execute import _error_output, _is_test
from autograder.records import Job, Submission
from autograder.release import nbgrader_batch


def stand_in(release_nb, reason: str):
    """A stand-in for a file that cannot be graded: the release with every test failed, not run."""
    nb = nbformat.from_dict(json.loads(json.dumps(release_nb)))
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [_error_output("NotGraded", f"the submission could not be graded: {reason}")] if _is_test(cell) else []
    return nb


def _autograde(name: str, *options: str) -> list[list[str]]:
    """nbgrader's commands that score the judged notebooks of ``name`` and write their feedback."""
    return [["autograde", name, "--force", "--Execute.enabled=False", "--ClearOutput.enabled=False",
             "--Autograde.create_student=True", *options], ["generate_feedback", name, "--force", *options]]


def _scored_files(root: Path, student: str, assignment: str) -> tuple[Path, Path]:
    """Where nbgrader keeps one submission's autograded notebook and its feedback under ``root``."""
    autograder = Path(root) / "autograder"
    return (autograder / "autograded" / student / assignment / f"{assignment}.ipynb",
            autograder / "feedback" / student / assignment / f"{assignment}.html")


def _plan(root: Path, submissions: list[Submission]) -> list[list[str]]:
    """nbgrader's commands: autograde and feedback per assignment, then the export."""
    plan = []
    for name in sorted({s.assignment for s in submissions}):
        # Students graded before and not in this run are left alone: nbgrader would score (and write
        # feedback for) every submission of the assignment again, so regrading a few cost the class.
        earlier = {p.parent.name for p in (root / "autograder" / "submitted").glob(f"*/{name}")}
        others = sorted(earlier - {s.student for s in submissions if s.assignment == name})
        plan += _autograde(name, *([f"--CourseDirectory.student_id_exclude={','.join(others)}"] if others else []))
    plan.append(["export", "--to", str(root / "autograder" / "grades.csv")])
    return plan


def score_here(job: Job, url: str, attempts: int = 3) -> dict:
    """In a grading process: nbgrader scores the notebook ``job`` judged into the gradebook at ``url``
    (a server that other processes write to at the same time) and writes its feedback, in a course
    folder of its own; both files are put beside the job (`Job.scored_files`). Returns the `Result`
    fields it sets: the score and the maximum, or why it could not score (the run then scores it)."""
    from autograder.nbgrader_batch import run_one

    with tempfile.TemporaryDirectory(prefix="peftlab-score-") as tmp:
        course = Path(tmp)
        (course / "solutions" / job.assignment).mkdir(parents=True)
        target = course / "autograder" / "submitted" / job.student / job.assignment
        target.mkdir(parents=True)
        shutil.copyfile(job.output, target / f"{job.assignment}.ipynb")
        options = [f"--CourseDirectory.root={course}", f"--CourseDirectory.db_url={url}",
                   f"--CourseDirectory.student_id={job.student}"]
        problem = ""
        for attempt in range(attempts):  # another writer can take a row in between: score again
            for command in _autograde(job.assignment, *options):
                step = run_one(command)
                if step["returncode"]:
                    problem = f"nbgrader {command[0]}: {step['log'][-600:]}"
                    break
            else:
                problem = ""
                break
            time.sleep(0.5 * (attempt + 1))
        graded = gradebook.scores(url, [(job.student, job.assignment)]) if not problem else {}
        if (job.student, job.assignment) not in graded:
            return {"score_error": problem or "nbgrader left no score in the gradebook"}
        for made, kept in zip(_scored_files(course, job.student, job.assignment), job.scored_files(), strict=True):
            shutil.copyfile(made, kept)
    points, most = graded[(job.student, job.assignment)]
    return {"score": points, "max_score": most}


def _write(root: Path, sub: Submission, nb, scored: tuple[str, str] | None) -> None:
    """The judged notebook where nbgrader keeps submissions, and a grading process's autograded
    notebook and feedback where nbgrader would have written them."""
    target = root / "autograder" / "submitted" / sub.student / sub.assignment
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    nbformat.write(nb, target / f"{sub.assignment}.ipynb")
    if scored is not None:
        for path, text in zip(_scored_files(root, sub.student, sub.assignment), scored, strict=True):
            shutil.rmtree(path.parent, ignore_errors=True)
            path.parent.mkdir(parents=True)
            path.write_text(text)


class Gather:
    """Writes each submission a grading process scored as it comes back (`dispatch.execute`'s
    ``gather``), and counts the time this machine spends on it."""

    def __init__(self, root: Path):
        self.root, self.done, self.seconds = Path(root), set(), 0.0

    def __call__(self, sub: Submission, nb, files: tuple[str, str]) -> None:
        start = time.monotonic()
        _write(self.root, sub, nb, files)
        self.done.add(sub)
        self.seconds += time.monotonic() - start


def _backup(root: Path, url: str) -> None:
    source = root / "autograder" / "gradebook.db"
    if not gradebook.is_server(url) and source.exists():
        backups = root / "autograder" / "backups"
        backups.mkdir(exist_ok=True)
        shutil.copy2(source, backups / f"gradebook-{time.strftime('%Y%m%d-%H%M%S')}.db")


def score(root: Path, submissions: list[Submission], executed: dict, gathered: set, releases: dict, work: Path,
          url: str) -> list[str]:
    """Score every submission and set its score and status; notes on what nbgrader reported.
    ``executed``: the judged notebooks to score here; ``gathered``: the submissions a grading process
    scored (their files written and scores set already, `Gather`); a failed submission's stand-in is
    made from ``releases``. ``url``: the gradebook."""
    _backup(root, url)
    todo = [sub for sub in submissions if sub not in gathered]
    for sub in todo:
        nb = stand_in(releases[sub.assignment], sub.reason) if sub.status == "failed" else executed[sub]
        _write(root, sub, nb, None)
    notes = []
    for step in nbgrader_batch(root, _plan(root, todo), work):  # one nbgrader process for the whole run
        if step["returncode"] != 0:
            notes.append(f"nbgrader {' '.join(step['args'][:2])} reported problems:\n{step['log'][-2000:]}")
    graded = gradebook.scores(url, [(s.student, s.assignment) for s in todo])
    for s in todo:
        if (s.student, s.assignment) in graded:
            s.score, s.max_score = graded[(s.student, s.assignment)]
    for s in submissions:
        if s.score is not None and s.max_score is not None:
            if s.status == "pending":
                s.status = "graded"
        else:
            s.status, s.reason = "failed", s.reason or "nbgrader could not score it"
    return notes

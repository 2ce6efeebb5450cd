"""A real nbgrader round trip in a temporary course: release, submit, autograde, feedback, export.

One student submits the instructor's solution, another the untouched release: the first must get
every automatic point, the second none, and the feedback must not show hidden tests. Grading goes
through the course's grading command (`autograder.grade`); nbgrader's own autograde, which the
formgrader uses, is checked on notebook 01.
"""

import csv
import shutil
import subprocess
import sys

import nbformat
import pytest

from notebooks import COURSE, ROOT, SOLUTIONS, hidden_test_lines, notebooks

ASSIGNMENTS = [p.parent.name for p in notebooks(SOLUTIONS)]


def nbgrader(course, *args):
    env = {**__import__("os").environ, "PEFTLAB_COURSE_ROOT": str(course)}
    done = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def graded_course(tmp_path_factory):
    """Every assignment graded by the course's grading command, plus nbgrader's own autograde (which
    runs the demonstrations too) for notebook 01 on a third student."""
    course = tmp_path_factory.mktemp("course-root")
    shutil.copytree(SOLUTIONS, course / "solutions")
    inbox = course.parent / f"{course.name}-inbox"
    for assignment in ASSIGNMENTS:
        for student, source in (("alice", SOLUTIONS), ("bob", COURSE)):
            target = inbox / student / f"{assignment}.ipynb"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / assignment / f"{assignment}.ipynb", target)
    env = {**__import__("os").environ, "PEFTLAB_COURSE_ROOT": str(course)}
    done = subprocess.run([sys.executable, "-m", "autograder.grade", str(inbox), "--workers", "2", "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    carol = course / "autograder" / "submitted" / "carol" / "01_memory_math"
    shutil.copytree(SOLUTIONS / "01_memory_math", carol)
    nbgrader(course, "autograde", "01_memory_math", "--student", "carol", "--force")
    (course / "course").mkdir(exist_ok=True)
    shutil.copytree(course / "autograder" / ".releases", course / "course", dirs_exist_ok=True)
    shutil.copy(course / "autograder" / "grades.csv", course / "grades.csv")
    return course


@pytest.mark.slow
@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_solution_gets_full_automatic_points_and_release_gets_none(graded_course, assignment):
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{graded_course / 'autograder' / 'gradebook.db'}") as gb:
        alice = gb.find_submission(assignment, "alice")
        bob = gb.find_submission(assignment, "bob")
        max_auto = sum(n.max_code_score for n in gb.find_assignment(assignment).notebooks)
        assert max_auto > 0
        assert alice.code_score == max_auto, f"solution scored {alice.code_score} of {max_auto}"
        assert bob.code_score == 0, f"untouched release scored {bob.code_score}"
        manual = sum(n.max_written_score for n in gb.find_assignment(assignment).notebooks)
        assert alice.needs_manual_grade == (manual > 0), "written answers (and only they) await the instructor"


@pytest.mark.slow
@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_feedback_is_produced_without_hidden_tests(graded_course, assignment):
    solution = nbformat.read(next((SOLUTIONS / assignment).glob("*.ipynb")), as_version=4)
    release = nbformat.read(next((graded_course / "course" / assignment).glob("*.ipynb")), as_version=4)
    visible = {line.strip() for cell in release.cells for line in cell.source.splitlines()}
    # Lines only the hidden tests contain (a hidden test may repeat a visible line).
    hidden_lines = [line for line in hidden_test_lines(solution) if line not in visible]
    assert hidden_lines
    for student in ("alice", "bob"):
        pages = list((graded_course / "autograder" / "feedback" / student / assignment).glob("*.html"))
        assert pages, f"no feedback for {student}"
        html = pages[0].read_text()
        assert "Test cell" in html or "grade" in html.lower()
        leaked = [line for line in hidden_lines if len(line) > 25 and line in html]
        assert not leaked, f"feedback for {student} shows hidden tests: {leaked[:3]}"


@pytest.mark.slow
def test_grades_csv_lists_every_submission(graded_course):
    rows = list(csv.DictReader((graded_course / "grades.csv").open()))
    assert {(r["assignment"], r["student_id"]) for r in rows} == {
        (a, s) for a in ASSIGNMENTS for s in ("alice", "bob")}  # exported before carol was graded
    assert all(float(r["raw_score"]) == 0.0 for r in rows if r["student_id"] == "bob"), "the release scores zero"
    assert all(float(r["raw_score"]) > 0 for r in rows if r["student_id"] == "alice")


@pytest.mark.slow
def test_nbgrader_own_autograde_gives_the_solution_full_points(graded_course):
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{graded_course / 'autograder' / 'gradebook.db'}") as gb:
        carol = gb.find_submission("01_memory_math", "carol")
        alice = gb.find_submission("01_memory_math", "alice")
        assert carol.code_score == alice.code_score == carol.max_code_score > 0

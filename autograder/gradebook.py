"""The gradebook: nbgrader's database of assignments, students and scores, through SQLAlchemy.

On one machine it is a SQLite file, ``autograder/gradebook.db`` (the default). For a class graded on
many machines it is a PostgreSQL server, which many grading processes write to at once: set

    export PEFTLAB_GRADEBOOK_URL=postgresql+psycopg://grader:SECRET@db-host:5432/peftlab

(or pass ``--gradebook URL`` to `autograder.grade`). `nbgrader_config.py` reads the same variable, so
every nbgrader command (formgrader, export) sees the same gradebook. With a server, each grading
process scores the notebooks it judged (`autograder.score.score_here`), and the instructor's machine
only gathers; docs/instructor.md says how to start a server.

Writers that could collide are kept apart here: preparing the gradebook (tables, the course,
nbgrader's generate_assignment) runs under a PostgreSQL advisory lock, so two grading runs started at
once on an empty server do not both create it, and students are added before any grading process
scores them, retried when another run adds the same student at the same moment.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

ENV = "PEFTLAB_GRADEBOOK_URL"
COURSE_ID = "peft-lab"  # as `nbgrader_config.py` sets it
_LOCK_KEY = 0x7065_6674  # the advisory lock that serialises preparing the gradebook ("peft")


def url_for(root: Path) -> str:
    """The gradebook's SQLAlchemy URL: ``$PEFTLAB_GRADEBOOK_URL``, else the course's SQLite file."""
    return os.environ.get(ENV) or f"sqlite:///{Path(root) / 'autograder' / 'gradebook.db'}"


def is_server(url: str) -> bool:
    """Whether the gradebook is a database server (many writers) rather than a SQLite file."""
    return not url.startswith("sqlite")


def shown(url: str) -> str:
    """The URL with its password hidden, for logs and reports."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def check(url: str) -> None:
    """Stop with a clear message when the gradebook cannot be reached (before any notebook is graded)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        engine = create_engine(url)
    except (ArgumentError, ImportError) as exc:
        raise SystemExit(f"the gradebook URL {shown(url)!r} is not usable: {exc}") from None
    try:
        with engine.connect() as connection:
            connection.execute(text("select 1"))
    except SQLAlchemyError as exc:
        raise SystemExit(f"cannot reach the gradebook at {shown(url)}: {str(exc).splitlines()[0]}") from None
    finally:
        engine.dispose()


@contextlib.contextmanager
def serialised(url: str):
    """Only one holder at a time across every grading run on this gradebook (a PostgreSQL advisory
    lock, released when the block ends or the process dies); a SQLite gradebook has one writer anyway."""
    if not is_server(url):
        yield
        return
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(text("select pg_advisory_lock(:key)"), {"key": _LOCK_KEY})
            try:
                yield
            finally:
                connection.execute(text("select pg_advisory_unlock(:key)"), {"key": _LOCK_KEY})
    finally:
        engine.dispose()


def open_gradebook(url: str):
    """nbgrader's `Gradebook` on ``url``. Making a new one runs the ``alembic`` command, which lies
    beside this interpreter: that folder is put on the PATH first."""
    from nbgrader.api import Gradebook

    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    return Gradebook(url, COURSE_ID)


def _retried(action, attempts: int = 5):
    """Run ``action`` again when another writer got there first (a unique key taken in between)."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(attempts):
        try:
            return action()
        except (IntegrityError, OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def add_students(url: str, students: list[str]) -> None:
    """Every student in the gradebook before grading starts, so that no two grading processes create
    the same one at once."""
    def add():
        with open_gradebook(url) as gb:
            known = {s.id for s in gb.students}
            for student in sorted(set(students) - known):
                gb.add_student(student)

    _retried(add)


def has_assignment(url: str, name: str) -> bool:
    """Whether nbgrader's generate_assignment told the gradebook about ``name`` (a SQLite gradebook
    that does not exist yet is not made by asking)."""
    from nbgrader.api import MissingEntry

    if not is_server(url) and not Path(url.removeprefix("sqlite:///")).exists():
        return False
    with open_gradebook(url) as gb:
        try:
            gb.find_assignment(name)
        except MissingEntry:
            return False
    return True


def scores(url: str, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[float, float]]:
    """(score, max score) of each (student, assignment) the gradebook holds."""
    from nbgrader.api import MissingEntry

    out = {}
    with open_gradebook(url) as gb:
        for student, assignment in pairs:
            try:
                sub = gb.find_submission(assignment, student)
            except MissingEntry:
                continue
            out[(student, assignment)] = (sub.score, sub.max_score)
    return out


def test_scores(url: str, assignments: list[str]) -> dict[tuple[str, str], dict[str, tuple[float, float]]]:
    """Every submission of ``assignments`` the gradebook holds, from every run:
    (assignment, student) -> {test's grade_id: (score, max score)}; a score set by hand wins."""
    from nbgrader.api import Assignment, Grade, GradeCell, SubmittedAssignment, SubmittedNotebook

    out: dict = {}
    with open_gradebook(url) as gb:
        rows = (gb.db.query(Assignment.name, SubmittedAssignment.student_id, GradeCell.name, Grade.auto_score,
                            Grade.manual_score, GradeCell.max_score)
                .select_from(Grade)
                .join(SubmittedNotebook, Grade.notebook_id == SubmittedNotebook.id)
                .join(SubmittedAssignment, SubmittedNotebook.assignment_id == SubmittedAssignment.id)
                .join(Assignment, SubmittedAssignment.assignment_id == Assignment.id)
                .join(GradeCell, Grade.cell_id == GradeCell.id)
                .filter(Assignment.name.in_(list(assignments)))
                .all())
    for assignment, student, grade_id, auto, manual, max_score in rows:
        score = manual if manual is not None else (auto or 0.0)
        out.setdefault((assignment, student), {})[grade_id] = (float(score), float(max_score))
    return out

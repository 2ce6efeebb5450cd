"""What flows between the grading stages: a submission (one row of the report, from the input to its
score) and the job and result that cross to a grading process or a Dask worker, each with one
serialiser (JSON text, so that a job can be written to a file, piped or shipped as a Dask argument)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path


@dataclass(eq=False)  # hashed by identity: one object per submission
class Submission:
    student: str                       # the id in the gradebook: unique, safe as a folder name
    assignment: str
    file: str
    name: str = ""                     # the student's name as the export gave it
    status: str = "pending"            # graded | failed | skipped
    reason: str = ""
    score: float | None = None
    max_score: float | None = None
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timing: dict = field(default_factory=dict)  # the grading process's breakdown (`autograder.execute`)
    worker_peak_mb: float | None = None  # the grading process's peak resident memory during this job


class _Json:
    """One serialiser for a flat record of JSON values: lists come back as tuples, unknown keys are
    ignored and missing ones take their defaults."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str):
        data = json.loads(text)
        return cls(**{f.name: tuple(data[f.name]) if isinstance(data[f.name], list) else data[f.name]
                      for f in fields(cls) if f.name in data})


@dataclass(frozen=True)
class Job(_Json):
    """One prepared notebook to run in a sandboxed kernel and judge, with its limits."""

    folder: str                        # the job's private folder; the kernel's scratch is inside it
    notebook: str                      # the prepared notebook (`autograder.prepare`)
    output: str                        # where the judged notebook is written
    result: str                        # where its `Result` is written
    cell_timeout: int = 120            # CPU seconds of one cell (wall clock: five times as many)
    notebook_timeout: int = 900        # seconds of the whole notebook
    memory_mb: int = 4096              # the kernel's memory, all its processes
    sandbox: bool = True
    expose: tuple[str, ...] = ()       # extra paths the kernel may read
    max_procs: int = 64
    student_names: tuple[str, ...] = ()  # names the student's answers define (`prepare.student_names`)
    left_out: tuple[str, ...] = ()     # libraries the kernel must not import (`oracles.left_out`)
    threads: int = 1                   # the kernel's torch threads
    warm: bool = True                  # fork the kernel from a warm zygote
    student: str = ""                  # whose notebook it is (the gradebook's id) ...
    assignment: str = ""               # ... and of which assignment
    score_here: bool = False           # the grading process also scores it (`autograder.score.score_here`)

    def moved_to(self, folder: Path) -> "Job":
        """The same job with its files in ``folder`` (a Dask worker's own temporary folder)."""
        folder = Path(folder)
        return replace(self, folder=str(folder / "job"), notebook=str(folder / "grading.ipynb"),
                       output=str(folder / "executed.ipynb"), result=str(folder / "result.json"))

    def scored_files(self) -> tuple[Path, Path]:
        """Where a grading process that scores puts nbgrader's autograded notebook and the feedback."""
        return Path(self.folder) / "autograded.ipynb", Path(self.folder) / "feedback.html"


@dataclass(frozen=True)
class Result(_Json):
    """What grading one job found, besides the judged notebook."""

    completed: bool = False            # every cell ran and every test was judged
    seconds: float = 0.0
    timing: dict = field(default_factory=dict)  # seconds by part: kernel start, imports, cells, tests ...
    peak_mb: float | None = None       # the kernel's peak memory
    flags: tuple[str, ...] = ()        # for a person to review
    notes: tuple[str, ...] = ()        # repairs and cuts, for the report
    error: str | None = None           # why the grader could not finish, if it could not
    worker_peak_mb: float | None = None  # the grading process's own peak during the job
    score: float | None = None         # set when the grading process scored it (`Job.score_here`) ...
    max_score: float | None = None
    score_error: str | None = None     # ... or why it could not (the run scores it instead)

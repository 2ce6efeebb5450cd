"""Grade a class: one command from a folder or zip of submissions to grades, feedback and a report.

    python -m autograder.grade SUBMISSIONS [--workers 2] [--assignment 05_quantization] ...
    bash scripts/grade.sh SUBMISSIONS ...        # the same, after setting up the environment

SUBMISSIONS is a folder or a .zip, laid out as learning platforms export them: one notebook per
student (``alice.ipynb``, ``alice_05_quantization.ipynb``) or one folder per student
(``alice/05_quantization.ipynb``, ``alice/05_quantization/05_quantization.ipynb``). The assignment is
read from the file or folder name, or, failing that, from the notebook's content.

`grade` runs the stages in turn, one module each:
1. `autograder.ingest` reads the input and finds every student's submissions (`records.Submission`);
2. `autograder.prepare` rebuilds each from the instructor's notebook into a `records.Job`: locked
   cells and tests (with their hidden part) from `solutions/`, answers from the student, Colab's lost
   metadata repaired, demonstrations left out (they are never graded, and are most of the run time);
3. `autograder.dispatch` runs the jobs in grading processes (`autograder.worker`), here or on a Dask
   cluster (`autograder.cluster`): each runs the student's cells in a sandboxed kernel
   (`autograder.execute`, `kernel`, `sandbox`, `zygote`) and judges every test outside its reach
   (`autograder.judge`); the kernel only runs the tests' ``@observe`` calls and reports plain data;
4. `autograder.score` lets nbgrader score the judged notebooks (without running them again), write
   feedback that hides hidden tests, and export grades as CSV, in one nbgrader process; with the
   gradebook on a server (`autograder.gradebook`, ``--gradebook``), each grading process of stage 3
   has already scored its notebooks into it, and this stage only gathers and exports;
5. `autograder.report` writes the report and the item analysis of the whole class in the gradebook
   (`autograder.items`).

Reading never stops the run: every file of the input appears in the report, graded, failed (with the
reason) or skipped (with the reason). Every distinct student name gets its own id.

Results: ``autograder/grades.csv`` (nbgrader's export), ``autograder/reports/report.csv`` and ``.json``
(one row per input file: score, status, flags for a person to review, notes on repairs), the item
analysis in ``autograder/reports/items.html`` (per test: pass share, discrimination, common failures,
flags; score histograms; `autograder.items`), feedback in ``autograder/feedback/``, the files exactly as received in ``autograder/originals/``. Re-running the
command re-grades and gives the same grades; a copy of the gradebook is kept before every run.
"""


from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autograder import dispatch, gradebook, ingest, prepare, report, sandbox, score  # noqa: E402
from autograder.records import Job, Submission  # noqa: E402


def course_root() -> Path:
    return Path(os.environ.get("PEFTLAB_COURSE_ROOT") or ROOT)


def assignments(root: Path, only: list[str] | None = None) -> list[str]:
    """The course's assignments (folders of solutions/), or those of ``only`` (all must exist)."""
    names = sorted(p.name for p in (root / "solutions").iterdir() if p.is_dir() and p.name[:2].isdigit())
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise SystemExit(f"unknown assignment(s): {', '.join(unknown)}; the course has {', '.join(names)}")
    return list(only) if only else names


@dataclass
class Run:
    """What the run says about itself in the report: notes, and where its time went."""

    start: float
    notes: list[str]
    phases: dict

    def phase(self, name: str, clock: float) -> float:
        now = time.monotonic()
        self.phases[name] = now - clock
        return now


def grade(inputs: Path, *, workers: int = 2, only: list[str] | None = None, cell_timeout: int = 120,
          notebook_timeout: int = 900, memory_gb: float = 4.0, use_sandbox: bool = True,
          progress: bool = True, expose: list[str] | None = None, max_procs: int = 64,
          scheduler: str | None = None, warm: bool = True) -> list[Submission]:
    root = course_root()
    names = assignments(root, only)
    run = Run(time.monotonic(), [], {})
    (root / "autograder").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="peftlab-grade-"))
    try:
        folder, run.notes, broken = ingest.read_input(inputs, work)
        solutions = {name: nbformat.read(root / "solutions" / name / f"{name}.ipynb", as_version=4) for name in names}
        submissions, skipped, notes = ingest.discover(folder, names, solutions, broken)
        run.notes += notes
        if not submissions:
            print("no submissions found", file=sys.stderr)
            report.write_report(root, skipped, run.notes, time.monotonic() - run.start, workers, False)
            return skipped
        url = gradebook.url_for(root)
        server = gradebook.is_server(url)
        if server:
            gradebook.check(url)
        with gradebook.serialised(url):  # another run on the same server waits here, not in the middle
            releases = prepare.releases_of(root, sorted({s.assignment for s in submissions}), work, url)
            if server:
                gradebook.add_students(url, [s.student for s in submissions])
        sources = {name: (solutions[name], release) for name, release in releases.items()}
        use_sandbox = use_sandbox and sandbox.available()
        if not use_sandbox:
            run.notes.append("SANDBOX OFF: student code can use the network and read any file this user can "
                             "(solutions, gradebook; a gradebook server it could reach); only time and memory "
                             "limits apply")
        threads, busy = dispatch.kernel_threads(workers)
        run.notes += [busy] if busy else []
        limits = Job("", "", "", "", cell_timeout=cell_timeout, notebook_timeout=notebook_timeout,
                     memory_mb=int(memory_gb * 1024), sandbox=use_sandbox, expose=tuple(expose or ()),
                     max_procs=max_procs, threads=threads, warm=warm, score_here=server)
        jobs = prepare.jobs(root, submissions, sources, work, limits)
        clock = run.phase("ingest and prepare", run.start)
        gather = score.Gather(root)  # with a server: the files of each notebook scored where it was judged
        executed = dispatch.execute(jobs, workers=workers, scheduler=scheduler, progress=progress,
                                    gradebook=url if server else None, gather=gather)
        clock = run.phase("execute" + (" and score" if server else ""), clock)
        if server:
            run.phases["gather (while executing)"] = gather.seconds
        run.notes += score.score(root, submissions, executed, gather.done, releases, work, url)
        clock = run.phase("gather and export" if server else "score (nbgrader)", clock)
        note = report.item_analysis(root, url, assignments(root))
        run.notes += [note] if note else []
        run.phase("item analysis", clock)
        report.write_report(root, submissions + skipped, run.notes, time.monotonic() - run.start, workers,
                            use_sandbox, run.phases)
        return submissions + skipped
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("submissions", type=Path, help="a folder or .zip of submitted notebooks")
    parser.add_argument("--assignment", action="append", help="grade only this assignment (repeatable)")
    parser.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="parallel notebooks")
    parser.add_argument("--cell-timeout", type=int, default=120, help="CPU seconds one cell may use")
    parser.add_argument("--notebook-timeout", type=int, default=900, help="seconds one notebook may run")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="memory limit of one notebook's kernel (all its processes)")
    parser.add_argument("--max-procs", type=int, default=64, help="processes one notebook's kernel may start")
    parser.add_argument("--expose", action="append", default=[], help="an extra path kernels may read (repeatable)")
    parser.add_argument("--no-sandbox", action="store_true", help="run kernels without the namespace sandbox")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--scheduler", help="run the kernels on a Dask cluster: its scheduler's address "
                                            "(tcp://host:8786), or local:N for a LocalCluster of N workers")
    parser.add_argument("--gradebook", metavar="URL",
                        help="the gradebook on a database server (postgresql+psycopg://user:password@host/db); "
                             f"default: ${gradebook.ENV}, else the course's SQLite file")
    parser.add_argument("--cold-kernels", action="store_true",
                        help="start every kernel as a new interpreter, not forked from a warm one (slower)")
    args = parser.parse_args(argv)
    if args.gradebook:  # the variable nbgrader's configuration and every process this run starts read
        os.environ[gradebook.ENV] = args.gradebook
    grade(args.submissions, workers=args.workers, only=args.assignment, cell_timeout=args.cell_timeout,
          notebook_timeout=args.notebook_timeout, memory_gb=args.memory_gb, use_sandbox=not args.no_sandbox,
          progress=not args.quiet, expose=args.expose, max_procs=args.max_procs, scheduler=args.scheduler,
          warm=not args.cold_kernels)
    return 0


if __name__ == "__main__":
    sys.exit(main())

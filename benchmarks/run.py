"""Benchmarks (not tests): notebook run time and peak memory, grading time, the lab, the test suite.

    .venv/bin/python benchmarks/run.py --all --write   # everything, then rewrite docs/performance.md (~30 min)
    .venv/bin/python benchmarks/run.py                 # notebooks and nbgrader's own autograde of 04
    .venv/bin/python benchmarks/run.py --grading       # also the grading command (complete student, a class)
    .venv/bin/python benchmarks/run.py --only-grading
    .venv/bin/python benchmarks/run.py --gradebook     # also a class on a LocalCluster, SQLite vs PostgreSQL
    .venv/bin/python benchmarks/run.py --lab           # also LoRA vs QLoRA through the GPU lab's command
    .venv/bin/python benchmarks/run.py --suite         # also the test suite's quick tier and whole run
    .venv/bin/python benchmarks/run.py --install       # also a fresh `scripts/setup.sh` (minutes)
    .venv/bin/python benchmarks/run.py --notebooks 01,08 --no-plain-autograde   # some notebooks only

Prints a Markdown table, each figure beside its budget; ``--write`` also writes it, with the date, the
commit and the machine, to docs/performance.md. Each notebook runs in its own process and kernel with
the SmolLM2 cache already converted (what a student sees after the first run); the one-off conversion
is timed separately. Run on an otherwise idle machine: other work on the cores slows every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT / "tests"))
from notebooks import isolated_env as test_env  # noqa: E402 (one definition of the isolated environment)

# What each figure must keep to, and why: what a student, an instructor or CI waits for.
BUDGET = {
    "conversion": 60,       # s, once per machine, before the first notebook opens
    "notebook": 60,         # s, one notebook top to bottom: a student waits on each cell
    "long notebook": 120,   # s, 07 trains the lab and 08 four methods
    "course": 480,          # s, the eight notebooks in a row
    "student, 2 workers": 60,  # s, one complete student (8 notebooks) on 2 cores: a class of 60 in an hour
    "class of 8, 2 workers": 60,  # s, 8 submissions of 04 on 2 cores
    "prepare": 10,          # s, a submission of 20,000 cells (preparing must stay linear)
    "worker memory": 1024,  # MB, one grading process's peak: 8 of them on a 16 GB grading machine
    "lab memory ratio": 1.25,  # measured / predicted, each phase of the lab's memory
    "quick tier": 120,      # s, the tests a contributor runs before every commit
    "suite": 900,           # s, the whole suite on 2 cores (CI allows 90 min)
    "install": 300,         # s, scripts/setup.sh on a fresh machine
}


def budget(value: float, key: str, unit: str = "s") -> str:
    """The budget column: the limit, and whether ``value`` kept to it."""
    limit = BUDGET[key]
    return f"{limit:g} {unit}: {'met' if value <= limit else '**over**'}"


_EXECUTE = r"""
import json, resource, sys, time
import nbformat
from nbclient import NotebookClient
path = sys.argv[1]
nb = nbformat.read(path, as_version=4)
start = time.perf_counter()
NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}).execute()
seconds = time.perf_counter() - start
# The kernel was this process's child; its peak resident memory is reported once it has exited.
peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "kernel_peak_mb": peak_mb}))
"""


# The floor of grading one notebook: a plain kernel (no sandbox, judge, nbgrader or worker) running
# the graded cells, demonstrations left out, as the grader leaves them out.
_FLOOR = r"""
import json, sys, time
import nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
nb.cells = [c for c in nb.cells if "demo" not in c.get("metadata", {}).get("tags", [])]
client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}})
start = time.perf_counter()
with client.setup_kernel():
    client.wait_for_reply(client.kc.kernel_info())
    times = {"kernel_start": time.perf_counter() - start, "imports": 0.0, "cells": 0.0}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            clock = time.perf_counter()
            client.execute_cell(cell, index)
            times["imports" if cell.get("id") == "imports" else "cells"] += time.perf_counter() - clock
print(json.dumps(times))
"""


def isolated_env(home: Path, cache: Path) -> dict[str, str]:
    """The tests' isolated, offline environment, with this Python's scripts (nbgrader, alembic) on PATH."""
    return {**os.environ, **test_env(home, cache),
            "PATH": os.pathsep.join([str(Path(PY).parent), os.environ.get("PATH", "")])}


def timed(cmd, **kwargs) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def _grade(tmp: Path, env: dict, inbox: Path, workers: int, extra: tuple = (), report: dict | None = None,
           label: str = "") -> float:
    root = tmp / f"grade-root-{inbox.name}-{workers}{label or '-'.join(extra).replace(':', '')}"
    shutil.copytree(ROOT / "solutions", root / "solutions")
    (root / "autograder").mkdir()
    genv = {**env, "PEFTLAB_COURSE_ROOT": str(root)}
    names = sorted({p.stem for p in inbox.rglob("*.ipynb")})
    # The one-off generate_assignment per assignment is not part of the throughput.
    subprocess.run([PY, "-c", "import sys, tempfile; sys.path.insert(0, '.'); from autograder.prepare import releases_of; "
                    "from pathlib import Path; from autograder.gradebook import url_for; root = Path(sys.argv[1]); "
                    "releases_of(root, sys.argv[2:], Path(tempfile.mkdtemp()), url_for(root))",
                    str(root), *names], cwd=ROOT, env=genv, check=True)
    seconds = timed([PY, "-m", "autograder.grade", str(inbox), "--workers", str(workers), "--quiet", *extra], cwd=ROOT,
                    env=genv)
    if report is not None:
        report.update(json.loads((root / "autograder" / "reports" / "report.json").read_text()))
    return seconds


def floor_rows(env: dict, rows: list, graded: dict) -> None:
    """The floor of one complete student (each notebook's kernel start, imports and graded cells in a
    plain kernel) against the grading run's own breakdown (``graded``: its report.json, 1 worker)."""
    floor = {"kernel_start": 0.0, "imports": 0.0, "cells": 0.0}
    for path in sorted((ROOT / "solutions").glob("*/*.ipynb")):
        done = subprocess.run([PY, "-c", _FLOOR, str(path), str(path.parent)], env=env, capture_output=True, text=True,
                              check=True)
        for key, value in json.loads(done.stdout.strip().splitlines()[-1]).items():
            floor[key] += value
    total = sum(floor.values())
    rows.append(("floor of one complete student: a plain kernel per notebook, graded cells only",
                 f"{total:.1f} s (kernel starts {floor['kernel_start']:.1f}, imports {floor['imports']:.1f}, "
                 f"cells {floor['cells']:.1f})", "", ""))
    inside = {}
    for sub in graded["submissions"]:
        for key, value in sub.get("timing", {}).items():
            inside[key] = inside.get(key, 0.0) + value
    jobs = sum(sub.get("seconds", 0.0) for sub in graded["submissions"])
    phases = graded.get("phases", {})
    rows.append(("  where the grading run's time went (1 worker)",
                 f"{graded['seconds']:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()), "", ""))
    rows.append(("  inside its notebooks' grading",
                 f"{jobs:.1f} s: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in inside.items())
                 + f"; the rest {phases.get('execute', jobs) - sum(inside.values()):.1f} (worker start, judge imports, "
                 "sandbox set-up, kernel shutdown)", "", ""))


def prepare_row(rows: list) -> None:
    """Preparing a submission with 20,000 cells of the student's own: the matching must stay linear."""
    import nbformat

    sys.path.insert(0, str(ROOT))
    from autograder import prepare

    name = "01_memory_math"
    source = nbformat.read(ROOT / "solutions" / name / f"{name}.ipynb", as_version=4)
    release = nbformat.read(ROOT / "course" / name / f"{name}.ipynb", as_version=4)
    nb = nbformat.read(ROOT / "course" / name / f"{name}.ipynb", as_version=4)
    nb.cells += [nbformat.v4.new_code_cell(f"x{i} = {i}") for i in range(20_000)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "huge.ipynb"
        nbformat.write(nb, path)
        start = time.perf_counter()
        prepare.prepare(path, source, release)
        seconds = time.perf_counter() - start
        rows.append(("preparing a submission with 20,000 extra cells (read, match, rebuild)",
                     f"{seconds:.1f} s", "", budget(seconds, "prepare")))


def grading_rows(tmp: Path, env: dict, rows: list) -> list:
    """Time the grading command: one complete student (every notebook), and a class of eight
    submissions of notebook 04 with 1 and 2 workers."""
    prepare_row(rows)
    complete = tmp / "inbox-complete"
    for path in sorted((ROOT / "solutions").glob("*/*.ipynb")):
        (complete / "student").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, complete / "student" / path.name)
    graded = {}
    for workers in (1, 2):
        seconds = _grade(tmp, env, complete, workers, report=graded if workers == 1 else None)
        rows.append((f"grading command: one complete student ({len(list(complete.rglob('*.ipynb')))} notebooks), "
                     f"{workers} worker(s)", f"{seconds:.1f} s ({60 / seconds:.2f} students/min)", "",
                     budget(seconds, "student, 2 workers") if workers == 2 else ""))
    subs = graded.get("submissions", [])
    flags = sorted({flag for s in subs for flag in s.get("flags", [])})
    peaks = [s["worker_peak_mb"] for s in subs if s.get("worker_peak_mb")]
    rows.append(("  the complete student (1 worker): points, flags, the grading process's peak memory",
                 f"{sum(s.get('score') or 0 for s in subs):g} points, {len(flags)} flags{': ' + '; '.join(flags) if flags else ''}",
                 f"{max(peaks):,.0f} MB" if peaks else "", budget(max(peaks), "worker memory", "MB") if peaks else ""))
    floor_rows(env, rows, graded)
    klass = tmp / "inbox-class"
    for i in range(8):
        (klass / f"student{i}").mkdir(parents=True)
        shutil.copy(ROOT / "solutions" / "04_lora" / "04_lora.ipynb", klass / f"student{i}" / "04_lora.ipynb")
    for workers in (1, 2):
        seconds = _grade(tmp, env, klass, workers)
        rows.append((f"grading command: 8 submissions of 04_lora, {workers} worker(s)",
                     f"{seconds:.1f} s ({8 / seconds * 60:.1f} submissions/min)", "",
                     budget(seconds, "class of 8, 2 workers") if workers == 2 else ""))
    seconds = _grade(tmp, env, klass, 2, ("--scheduler", "local:2"))
    rows.append(("grading command: the same 8 on a Dask LocalCluster of 2 workers (--scheduler local:2, its start included)",
                 f"{seconds:.1f} s ({8 / seconds * 60:.1f} submissions/min)", "", budget(seconds, "class of 8, 2 workers")))
    return rows


def gradebook_rows(tmp: Path, env: dict, rows: list, students: int = 4) -> None:
    """A class of complete students on a LocalCluster of 2 workers, with the gradebook in SQLite (nbgrader
    scores on this machine at the end) and on a throwaway PostgreSQL server (each grading process scores
    what it judged): students a minute, and the seconds per notebook this machine spends on scoring,
    or on gathering and exporting."""
    from postgres import binaries, throwaway_server

    klass = tmp / "inbox-gradebook"
    for i in range(students):
        for path in sorted((ROOT / "solutions").glob("*/*.ipynb")):
            (klass / f"student{i}").mkdir(parents=True, exist_ok=True)
            shutil.copy(path, klass / f"student{i}" / path.name)
    notebooks = len(list(klass.rglob("*.ipynb")))
    kinds = [("SQLite", "score (nbgrader)", ())]
    server = throwaway_server() if binaries() else None
    with server or contextlib.nullcontext() as url:
        if url:
            kinds.append(("PostgreSQL", "gather and export", ("--gradebook", url)))
        for name, here, extra in kinds:
            report: dict = {}
            seconds = _grade(tmp, env, klass, 2, ("--scheduler", "local:2", *extra), report=report, label=name)
            phases = report.get("phases", {})
            mine = phases.get("gather (while executing)", phases.get(here, 0))  # what grows with each notebook
            workers = 2 * sum(v for k, v in phases.items() if k.startswith("execute")) / notebooks
            points = sum(s.get("score") or 0 for s in report.get("submissions", []))
            rows.append((f"grading command: {students} complete students ({notebooks} notebooks) on a LocalCluster of 2 "
                         f"workers, the gradebook in {name}", f"{seconds:.1f} s ({students / seconds * 60:.2f} students/min, "
                         f"{points:g} points)", "", ""))
            rows.append((f"  where its time went, gradebook in {name}",
                         ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()), "", ""))
            mine_is = "gathering, while the workers run" if name == "PostgreSQL" else f"{here}, after the last notebook"
            rows.append((f"  per notebook, gradebook in {name}: worker time (2 x the execute phase), this machine's "
                         f"time ({mine_is})", f"{workers:.2f} s, {mine / notebooks:.3f} s", "", ""))
            rows.append((f"  2,000 students x 8 notebooks on 100 workers at these rates, gradebook in {name}",
                         f"workers {16000 * workers / 100 / 60:.0f} min; this machine {16000 * mine / notebooks / 60:.0f} min "
                         f"({mine_is}{'; the export and item analysis: next row' if name == 'PostgreSQL' else ''})", "", ""))
        if url:
            scale_rows(tmp / f"grade-root-{klass.name}-2PostgreSQL", url, rows, copies=2000 // students)
    if server is None:
        rows.append(("grading with the gradebook on PostgreSQL", "not measured: PostgreSQL is not installed", "", ""))


_CLONE = [  # every submission again as (student)-cK, K = 1 .. :copies - 1, with ids derived from the originals'
    "insert into student (id) select s.id || '-c' || k from student s, generate_series(1, :copies - 1) k",
    "insert into submitted_assignment (id, assignment_id, student_id, timestamp, extension) select md5(a.id || ':' || k), "
    "a.assignment_id, a.student_id || '-c' || k, a.timestamp, a.extension from submitted_assignment a, generate_series(1, :copies - 1) k",
    "insert into submitted_notebook (id, assignment_id, notebook_id, flagged, late_submission_penalty) select md5(n.id || ':' || k), "
    "md5(n.assignment_id || ':' || k), n.notebook_id, n.flagged, n.late_submission_penalty from submitted_notebook n, "
    "generate_series(1, :copies - 1) k",
    "insert into grade (id, notebook_id, cell_id, auto_score, manual_score, extra_credit, needs_manual_grade) select "
    "md5(g.id || ':' || k), md5(g.notebook_id || ':' || k), g.cell_id, g.auto_score, g.manual_score, g.extra_credit, "
    "g.needs_manual_grade from grade g, generate_series(1, :copies - 1) k",
    "insert into comment (id, notebook_id, cell_id, auto_comment, manual_comment) select md5(c.id || ':' || k), "
    "md5(c.notebook_id || ':' || k), c.cell_id, c.auto_comment, c.manual_comment from comment c, generate_series(1, :copies - 1) k",
]


def scale_rows(root: Path, url: str, rows: list, copies: int) -> None:
    """The parts of a run that grow with the whole class, at MOOC size: the graded class copied in the
    PostgreSQL gradebook ``copies`` times (SQL, no grading), then nbgrader's export and the item analysis
    timed over all of it."""
    from sqlalchemy import create_engine, text

    sys.path.insert(0, str(ROOT))
    from autograder import gradebook, report
    from autograder.grade import assignments
    from autograder.release import nbgrader_batch

    engine = create_engine(url)
    with engine.begin() as connection:
        for statement in _CLONE:
            connection.execute(text(statement), {"copies": copies})
        students = connection.execute(text("select count(*) from student")).scalar()
        submissions = connection.execute(text("select count(*) from submitted_notebook")).scalar()
    engine.dispose()
    saved = os.environ.get(gradebook.ENV)
    os.environ[gradebook.ENV] = url
    try:
        with tempfile.TemporaryDirectory() as work:
            start = time.perf_counter()
            steps = nbgrader_batch(root, [["export", "--to", str(Path(work) / "grades.csv")]], Path(work))
            export = time.perf_counter() - start
            lines = len((Path(work) / "grades.csv").read_text().splitlines()) - 1 if steps[0]["returncode"] == 0 else 0
        start = time.perf_counter()
        note = report.item_analysis(root, url, assignments(root))
        items = time.perf_counter() - start
    finally:
        if saved is None:
            os.environ.pop(gradebook.ENV, None)
        else:
            os.environ[gradebook.ENV] = saved
    rows.append((f"the gradebook at {students:,} students ({submissions:,} graded notebooks, copied in SQL): nbgrader's export, "
                 f"the item analysis (every row of the gradebook; messages from the autograded notebooks on this machine)",
                 f"{export:.1f} s ({lines:,} rows), {items:.1f} s{' (' + note + ')' if note else ''}", "", ""))


def lab_rows(tmp: Path, env: dict, rows: list) -> None:
    """The GPU lab's command at its CPU settings: LoRA vs QLoRA on SmolLM2, with the memory prediction
    against the measurement phase by phase (measured / predicted)."""
    for label, extra in (("QLoRA (NF4)", []), ("LoRA (fp32 base)", ["--no-4bit"])):
        out = tmp / f"lab-{len(extra)}"
        timed([PY, "-m", "peftlab.lab", "--output-dir", str(out), "--quiet", *extra], env=env)
        r = json.loads((out / "results.json").read_text())
        t, m, a = r["timing"], r["memory"], r["accuracy"]
        phases = "; ".join(f"{name} {row['measured'] / 1e9:.2f} / {row['predicted'] / 1e9:.2f} GB ({row['ratio']:.2f})"
                           for name, row in m["comparison"].items())
        worst = max(row["ratio"] for row in m["comparison"].values())
        rows.append((f"lab on CPU, {label}: {r['config']['max_steps']} steps, batch {r['config']['batch_size']}, "
                     f"seq {r['config']['max_seq_len']}; accuracy {a['before']:.0%} -> {a['after']:.0%}",
                     f"{t['steps_per_second']:.2f} steps/s, {t['tokens_per_second']:.0f} tokens/s",
                     f"measured / predicted: {phases}", budget(worst, "lab memory ratio", "(largest ratio)")))


class Rows(list):
    """Table rows, each also printed the moment it is measured (a late failure loses nothing)."""

    def append(self, row) -> None:
        super().append(row)
        print("| " + " | ".join(row) + " |", file=sys.stderr, flush=True)

    def __iadd__(self, rows):
        for row in rows:
            self.append(row)
        return self


def notebook_rows(env: dict, rows: list, wanted: set) -> None:
    """Each notebook top to bottom in its own kernel, demonstrations included, and their sum."""
    total = 0.0
    for path in sorted((ROOT / "solutions").glob("*/*.ipynb")):
        if wanted and path.parent.name[:2] not in wanted:
            continue
        done = subprocess.run([PY, "-c", _EXECUTE, str(path), str(path.parent)], env=env,
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        total += result["seconds"]
        key = "long notebook" if path.parent.name[:2] in ("07", "08") else "notebook"
        rows.append((f"notebook {path.parent.name}, top to bottom", f"{result['seconds']:.1f} s",
                     f"{result['kernel_peak_mb']:,.0f} MB", budget(result["seconds"], key)))
    if not wanted:
        rows.append(("the whole course, top to bottom (the sum of the rows above)", f"{total:.0f} s ({total / 60:.1f} min)",
                     "", budget(total, "course")))


def plain_autograde_row(env: dict, tmp: Path, rows: list, name: str = "04_lora") -> None:
    """nbgrader's own autograde of one submission (it runs every cell, demonstrations included, in the
    student's kernel, with none of the grader's protections): the figure the grader is compared with."""
    course = tmp / "course-root"
    shutil.copytree(ROOT / "solutions" / name, course / "solutions" / name)
    (course / "autograder").mkdir(parents=True)
    genv = {**env, "PEFTLAB_COURSE_ROOT": str(course)}
    timed([PY, "-m", "nbgrader", "generate_assignment", name, "--force"], cwd=ROOT, env=genv)
    shutil.copytree(course / "solutions" / name, course / "autograder" / "submitted" / "student" / name)
    seconds = timed([PY, "-m", "nbgrader", "autograde", name, "--force"], cwd=ROOT, env=genv)
    rows.append((f"nbgrader's own autograde of one {name} submission (demonstrations run, no protections)",
                 f"{seconds:.1f} s", "", ""))


def _pytest_summary(output: str) -> str:
    """pytest's last line, ``== 560 passed, 8 skipped in 700.1s ==``, as ``560 passed, 8 skipped``."""
    lines = [line.strip("= ") for line in output.splitlines() if " in " in line and ("passed" in line or "failed" in line)]
    return lines[-1].rsplit(" in ", 1)[0] if lines else "no summary"


def suite_rows(rows: list) -> None:
    """The test suite as CI runs it (`scripts/test.sh`), quick tier and whole, from this checkout."""
    for label, extra, key in (("quick tier, scripts/test.sh -m 'not slow'", ["-m", "not slow"], "quick tier"),
                              ("whole suite, scripts/test.sh", [], "suite")):
        start = time.perf_counter()
        done = subprocess.run(["bash", "scripts/test.sh", "-q", *extra], cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        log = Path(tempfile.gettempdir()) / f"peftlab-benchmark-{key.replace(' ', '-')}.log"
        log.write_text(done.stdout + done.stderr)
        rows.append((f"{label}: {_pytest_summary(done.stdout)}", f"{seconds / 60:.1f} min", "", budget(seconds, key)))


def install_row(tmp: Path, rows: list) -> None:
    clone = tmp / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    seconds = timed(["bash", "scripts/setup.sh"], cwd=clone, env={**os.environ, "HOME": str(tmp / "home")})
    rows.append(("fresh install (scripts/setup.sh, pip cache empty)", f"{seconds:.0f} s", "", budget(seconds, "install")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="notebooks, grading, lab and suite (not --install)")
    parser.add_argument("--grading", action="store_true", help="also time the grading command (a few minutes)")
    parser.add_argument("--only-grading", action="store_true", help="time the grading command only")
    parser.add_argument("--gradebook", action="store_true",
                        help="also a class of 4 complete students on a LocalCluster, gradebook in SQLite and PostgreSQL")
    parser.add_argument("--only-gradebook", action="store_true", help="that class only")
    parser.add_argument("--lab", action="store_true", help="also run the GPU lab's command at CPU settings")
    parser.add_argument("--only-lab", action="store_true", help="the GPU lab's command only")
    parser.add_argument("--suite", action="store_true", help="also time the test suite (quick tier, then whole)")
    parser.add_argument("--install", action="store_true", help="also time a fresh setup.sh")
    parser.add_argument("--no-plain-autograde", action="store_true", help="skip nbgrader's own autograde of 04")
    parser.add_argument("--notebooks", default="", help="only these notebooks, by number (e.g. 01,08)")
    parser.add_argument("--write", action="store_true", help="write the table to docs/performance.md")
    args = parser.parse_args()
    wanted = {n.strip() for n in args.notebooks.split(",") if n.strip()}
    rows = Rows()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = isolated_env(tmp / "home", tmp / "cache")
        (tmp / "home").mkdir()
        seconds = timed([PY, "-m", "peftlab.models"], env=env)
        rows.append(("SmolLM2 one-off conversion (first run only)", f"{seconds:.1f} s", "", budget(seconds, "conversion")))
        only = args.only_grading or args.only_lab or args.only_gradebook
        if not only:
            notebook_rows(env, rows, wanted)
            if not args.no_plain_autograde and (not wanted or "04" in wanted):
                plain_autograde_row(env, tmp, rows)
        if args.grading or args.all or args.only_grading:
            grading_rows(tmp, env, rows)
        if args.gradebook or args.all or args.only_gradebook:
            gradebook_rows(tmp, env, rows)
        if args.lab or args.all or args.only_lab:
            lab_rows(tmp, env, rows)
        if (args.suite or args.all) and not only:
            suite_rows(rows)
        if args.install:
            install_row(tmp, rows)
    table = _table(rows)
    print("\n" + table)
    if args.write:
        (ROOT / "docs" / "performance.md").write_text(_page(table))


def _table(rows) -> str:
    lines = ["| what | time | peak memory | budget |", "|---|---:|---:|---|"]
    lines += [f"| {what} | {seconds} | {memory} | {limit} |" for what, seconds, memory, limit in rows]
    return "\n".join(lines) + "\n"


def machine() -> str:
    """The CPU, its cores, memory and any GPU, in words."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    memory = next((int(line.split()[1]) / 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0.0)
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB of memory, {gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def _commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"{git('rev-parse', '--short', 'HEAD')}{dirty}"


def _page(table: str) -> str:
    return f"""# Performance

Measured on {time.strftime('%Y-%m-%d')} at commit {_commit()}, on {machine()}, by
`python benchmarks/run.py --all --write`, which wrote this page; run it again on an idle machine to
bring it up to date (the figures of earlier runs are in this file's git history). Each figure stands
beside its budget: what a student, an instructor or CI should wait at most (`BUDGET` in
`benchmarks/run.py` says why each is what it is).

- **Notebooks**: each in its own kernel, top to bottom with the real-model demonstrations, the model
  already converted; memory is the kernel's peak.
- **Grading**: `python -m autograder.grade` on a fresh course root (its one-off release generation not
  counted): one complete student (all eight solution notebooks), then eight submissions of 04; the
  floor is what a plain kernel needs for the same graded cells, without sandbox, judge or nbgrader.
  The grading process's peak is its resident memory during one notebook.
- **Lab**: `python -m peftlab.lab` at its CPU settings; memory measured / predicted per phase.
- **Suite**: `bash scripts/test.sh` on this checkout, as CI runs it.

{table}"""


if __name__ == "__main__":
    main()

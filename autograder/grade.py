"""Grade a class: one command from a folder or zip of submissions to grades, feedback and a report.

    python -m autograder.grade SUBMISSIONS [--workers 2] [--assignment 05_quantization] ...
    bash scripts/grade.sh SUBMISSIONS ...        # the same, after setting up the environment

SUBMISSIONS is a folder or a .zip, laid out as learning platforms export them: one notebook per
student (``alice.ipynb``, ``alice_05_quantization.ipynb``) or one folder per student
(``alice/05_quantization.ipynb``, ``alice/05_quantization/05_quantization.ipynb``). The assignment is
read from the file or folder name, or, failing that, from the notebook's content.

For every submission the grader
1. reads it defensively and rebuilds it from the instructor's notebook (`autograder.prepare`): locked
   cells and tests (with their hidden part) from `solutions/`, answers from the student, Colab's lost
   metadata repaired, demonstrations left out (they are never graded, and are most of the run time);
2. runs it in a sandboxed kernel in one of ``--workers`` parallel processes (`autograder.execute`):
   per-cell and per-notebook time limits, a memory limit, no network, and the course's solutions,
   gradebook and other students' work out of sight (`autograder.sandbox`);
3. lets nbgrader score the executed notebooks (without running them again), generate feedback that
   hides hidden tests, and export grades as CSV.

Results: ``autograder/grades.csv`` (nbgrader's export), ``autograder/reports/report.csv`` and ``.json``
(one row per submission: score, status, flags for a person to review, notes on repairs), feedback in
``autograder/feedback/``, the files exactly as received in ``autograder/originals/``. Re-running the
command re-grades and gives the same grades; a copy of the gradebook is kept before every run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autograder import prepare as prep  # noqa: E402
from autograder import sandbox  # noqa: E402
from autograder.execute import _error_output, _is_test  # noqa: E402

ZIP_LIMIT_BYTES = 4 << 30
ZIP_LIMIT_FILES = 20_000


@dataclass(eq=False)  # hashed by identity: one object per submission
class Submission:
    student: str
    assignment: str
    file: str
    status: str = "pending"            # graded | failed
    reason: str = ""
    score: float | None = None
    max_score: float | None = None
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def course_root() -> Path:
    return Path(os.environ.get("PEFTLAB_COURSE_ROOT") or ROOT)


def assignments(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "solutions").iterdir() if p.is_dir() and p.name[:2].isdigit())


def _student_id(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.@-]+", "_", text).strip("._-")
    return cleaned[:64] or "unknown"


def extract_zip(path: Path, target: Path) -> list[str]:
    """Extract safely: no absolute paths, no '..', no links, bounded size and count. Returns notes."""
    notes = []
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        if len(members) > ZIP_LIMIT_FILES:
            raise ValueError(f"{path.name} holds {len(members):,} files (limit {ZIP_LIMIT_FILES:,})")
        if sum(m.file_size for m in members) > ZIP_LIMIT_BYTES:
            raise ValueError(f"{path.name} would unpack to more than {ZIP_LIMIT_BYTES >> 30} GB")
        for member in members:
            name = Path(member.filename)
            if member.is_dir():
                continue
            if name.is_absolute() or ".." in name.parts or (member.external_attr >> 16) & 0o170000 == 0o120000:
                notes.append(f"skipped unsafe archive entry {member.filename!r}")
                continue
            out = target / name
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return notes


def _content_assignment(path: Path, sources: dict) -> str | None:
    """Which assignment a notebook is, from its cells (grade ids, or sources when metadata was lost)."""
    nb, _, _ = prep.read_submission(path)
    if nb is None:
        return None
    ids = {prep._nbgrader(c).get("grade_id") for c in nb.cells}
    texts = {prep._norm(c.source) for c in nb.cells}
    best, best_score = None, 0
    for name, source in sources.items():  # locked cells read the same in the source and the release
        score = sum(1 for c in source.cells if prep._nbgrader(c).get("grade_id") in ids)
        score += sum(1 for c in source.cells if prep._kind(c) == "locked" and prep._norm(c.source) in texts)
        if score > best_score:
            best, best_score = name, score
    return best


def discover(folder: Path, names: list[str], sources: dict) -> tuple[list[Submission], list[str]]:
    """Find (student, assignment, file) in an export folder. Returns submissions and notes."""
    found: dict[tuple[str, str], list[Path]] = {}
    notes = []
    for path in sorted(folder.rglob("*.ipynb")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") or part in ("__MACOSX", ".ipynb_checkpoints") for part in rel.parts):
            continue
        text = rel.as_posix()
        named = [n for n in names if n in text]
        assignment = max(named, key=len) if named else None
        if assignment is None and len(names) == 1:
            assignment = names[0]
        if assignment is None:
            assignment = _content_assignment(path, sources)
        if len(rel.parts) > 1:
            student = rel.parts[0]
        else:
            student = path.stem.replace(assignment or "\0", "")
        student = _student_id(student if student.strip("_- .") else path.stem)
        if assignment is None:
            notes.append(f"{rel}: cannot tell which assignment this is; skipped")
            continue
        found.setdefault((student, assignment), []).append(path)
    submissions = []
    for (student, assignment), paths in sorted(found.items()):
        newest = max(paths, key=lambda p: p.stat().st_mtime)
        sub = Submission(student, assignment, str(newest))
        if len(paths) > 1:
            sub.flags.append(f"{len(paths)} files for this assignment; graded the newest ({newest.name})")
        submissions.append(sub)
    return submissions, notes


def release_of(root: Path, name: str):
    """The release notebook of an assignment, with the gradebook told about the assignment. nbgrader's
    generate_assignment (a few seconds) runs only when the instructor's notebook changed since the last
    run; its output is kept in autograder/.releases/."""
    import hashlib

    notebook = root / "solutions" / name / f"{name}.ipynb"
    digest = hashlib.sha256(notebook.read_bytes()).hexdigest()
    cache = root / "autograder" / ".releases"
    stamp, release = cache / f"{name}.sha256", cache / name / f"{name}.ipynb"
    gradebook = root / "autograder" / "gradebook.db"
    if not (gradebook.exists() and release.exists() and stamp.exists() and stamp.read_text() == digest):
        done = _nbgrader(root, "generate_assignment", name, "--force", f"--CourseDirectory.release_directory={cache}")
        if done.returncode != 0:
            raise SystemExit(f"nbgrader generate_assignment {name} failed:\n{done.stdout}{done.stderr}")
        stamp.write_text(digest)
    return nbformat.read(release, as_version=4)


def _nbgrader(root: Path, *args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    from autograder.release import nbgrader_env

    return subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=ROOT, env=nbgrader_env(root),
                          capture_output=True, text=True, timeout=timeout)


def _unreadable(release_nb, reason: str):
    """A stand-in for a file that cannot be graded: the release with every test failed, not run."""
    nb = nbformat.from_dict(json.loads(json.dumps(release_nb)))
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [_error_output("NotGraded", f"the submission could not be graded: {reason}")] if _is_test(cell) else []
    return nb


def _sandbox_paths(root: Path, inputs: Path, work: Path, job: Path) -> tuple[list[str], list[str]]:
    hide = {str(ROOT), str(root), str(inputs), str(work), "/tmp", "/var/tmp", "/dev/shm"}
    expose = {str(ROOT / "src"), str(job)}
    prefix = Path(sys.prefix)
    if prefix.is_relative_to(ROOT) or prefix.is_relative_to(root):
        expose.add(str(prefix))
    from peftlab.env import cache_dir  # not peftlab.models: that would import torch into the grader

    expose.add(str(cache_dir()))
    return sorted(hide), sorted(expose)


def run_job(job: dict) -> dict:
    """Run `autograder.execute` for one submission in its own process group, killed if it overruns."""
    path = Path(job["folder"]) / "job.json"
    path.write_text(json.dumps(job))
    proc = subprocess.Popen([sys.executable, "-m", "autograder.execute", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=job["notebook_timeout"] + 180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": "the grading process overran its time and was stopped", "flags": [], "notes": []}
    result_file = Path(job["result"])
    if not result_file.exists():
        return {"error": f"the grading process failed (exit {proc.returncode}): {log.decode(errors='replace')[-400:]}",
                "flags": [], "notes": []}
    return json.loads(result_file.read_text())


def scores(root: Path, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[float, float]]:
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


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="grading", unit="notebook", file=sys.stderr)
    except ImportError:
        return None


def grade(inputs: Path, *, workers: int = 2, only: list[str] | None = None, cell_timeout: int = 120,
          notebook_timeout: int = 900, memory_gb: float = 4.0, use_sandbox: bool = True,
          progress: bool = True) -> list[Submission]:
    root = course_root()
    names = assignments(root)
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise SystemExit(f"unknown assignment(s): {', '.join(unknown)}; the course has {', '.join(names)}")
        names = only
    start = time.monotonic()
    (root / "autograder").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="peftlab-grade-"))
    run_notes = []
    try:
        if inputs.is_file() and zipfile.is_zipfile(inputs):
            folder = work / "unzipped"
            run_notes += extract_zip(inputs, folder)
        elif inputs.is_dir():
            folder = inputs
        else:
            raise SystemExit(f"{inputs} is neither a folder nor a zip file")

        solutions = {name: nbformat.read(root / "solutions" / name / f"{name}.ipynb", as_version=4) for name in names}
        submissions, notes = discover(folder, names, solutions)
        run_notes += notes
        if not submissions:
            print("no submissions found", file=sys.stderr)
            return []
        sources = {name: (solutions[name], release_of(root, name)) for name in sorted({s.assignment for s in submissions})}
        use_sandbox = use_sandbox and sandbox.available()
        if not use_sandbox:
            run_notes.append("SANDBOX OFF: student code can use the network and read any file this user can "
                             "(solutions, gradebook); only time and memory limits apply")

        jobs, executed = {}, {}
        for sub in submissions:
            originals = root / "autograder" / "originals" / sub.student / sub.assignment
            shutil.rmtree(originals, ignore_errors=True)
            originals.mkdir(parents=True)
            shutil.copy2(sub.file, originals / Path(sub.file).name)
            source, release = sources[sub.assignment]
            try:
                prepared = prep.prepare(Path(sub.file), source, release)
            except Exception as exc:  # noqa: BLE001 - a submission we failed to understand is reported
                prepared = prep.Prepared(reason=f"could not be prepared for grading ({type(exc).__name__}: {exc})")
            sub.flags += prepared.flags
            sub.notes += prepared.notes
            if prepared.failed:
                sub.status, sub.reason = "failed", prepared.reason
                executed[sub] = _unreadable(release, prepared.reason)
                continue
            job_dir = work / "jobs" / f"{sub.student}--{sub.assignment}"
            job_dir.mkdir(parents=True)
            nbformat.write(prepared.notebook, job_dir / "grading.ipynb")
            hide, expose = _sandbox_paths(root, folder, work, job_dir)
            jobs[sub] = {"folder": str(job_dir), "notebook": str(job_dir / "grading.ipynb"),
                         "output": str(job_dir / "executed.ipynb"), "result": str(job_dir / "result.json"),
                         "cell_timeout": cell_timeout, "notebook_timeout": notebook_timeout,
                         "memory_mb": int(memory_gb * 1024), "sandbox": use_sandbox, "hide": hide, "expose": expose,
                         "threads": max(1, (os.cpu_count() or 2) // max(workers, 1))}

        bar = _progress(len(jobs)) if progress else None
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {pool.submit(run_job, job): sub for sub, job in jobs.items()}
            for future in concurrent.futures.as_completed(futures):
                sub = futures[future]
                try:
                    result = future.result()
                except Exception as exc:  # noqa: BLE001
                    result = {"error": f"{type(exc).__name__}: {exc}", "flags": [], "notes": []}
                sub.flags += result.get("flags", [])
                sub.notes += result.get("notes", [])
                sub.seconds = result.get("seconds", 0.0)
                output = Path(jobs[sub]["output"])
                if result.get("error") or not output.exists():
                    sub.status, sub.reason = "failed", result.get("error", "no output")
                    executed[sub] = _unreadable(sources[sub.assignment][1], sub.reason)
                else:
                    executed[sub] = nbformat.read(output, as_version=4)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()

        # nbgrader scores what ran (Execute and ClearOutput off), one assignment at a time.
        gradebook = root / "autograder" / "gradebook.db"
        if gradebook.exists():
            backups = root / "autograder" / "backups"
            backups.mkdir(exist_ok=True)
            shutil.copy2(gradebook, backups / f"gradebook-{time.strftime('%Y%m%d-%H%M%S')}.db")
        for sub, nb in executed.items():
            target = root / "autograder" / "submitted" / sub.student / sub.assignment
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            nbformat.write(nb, target / f"{sub.assignment}.ipynb")
        for name in sorted({s.assignment for s in submissions}):
            students = [s for s in submissions if s.assignment == name]
            done = _nbgrader(root, "autograde", name, "--force", "--Execute.enabled=False",
                             "--ClearOutput.enabled=False", "--Autograde.create_student=True")
            if done.returncode != 0:
                run_notes.append(f"nbgrader autograde {name} reported problems:\n{done.stderr[-2000:]}")
            fb = _nbgrader(root, "generate_feedback", name, "--force")
            if fb.returncode != 0:
                run_notes.append(f"nbgrader generate_feedback {name} reported problems:\n{fb.stderr[-2000:]}")
            graded = scores(root, [(s.student, name) for s in students])
            for s in students:
                if (s.student, name) in graded:
                    s.score, s.max_score = graded[(s.student, name)]
                    if s.status == "pending":
                        s.status = "graded"
                else:
                    s.status, s.reason = "failed", s.reason or "nbgrader could not score it"
        _nbgrader(root, "export", "--to", str(root / "autograder" / "grades.csv"))
        write_report(root, submissions, run_notes, time.monotonic() - start, workers, use_sandbox)
        return submissions
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_report(root: Path, submissions: list[Submission], run_notes: list[str], seconds: float,
                 workers: int, sandboxed: bool) -> None:
    reports = root / "autograder" / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    with open(reports / "report.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "assignment", "status", "score", "max_score", "flags", "notes", "reason", "file"])
        for s in submissions:
            writer.writerow([s.student, s.assignment, s.status, s.score, s.max_score, " | ".join(s.flags),
                             " | ".join(s.notes), s.reason, s.file])
    (reports / "report.json").write_text(json.dumps(
        {"seconds": seconds, "workers": workers, "sandbox": sandboxed, "notes": run_notes,
         "submissions": [asdict(s) for s in submissions]}, indent=1))
    stamp = time.strftime("%Y%m%d-%H%M%S")  # report.* describe the latest run; each run is also kept
    for suffix in ("csv", "json"):
        shutil.copy2(reports / f"report.{suffix}", reports / f"report-{stamp}.{suffix}")
    graded = sum(s.status == "graded" for s in submissions)
    failed = sum(s.status == "failed" for s in submissions)
    flagged = sum(bool(s.flags) for s in submissions)
    print(f"\n{len(submissions)} submissions in {seconds:.0f} s with {workers} workers: {graded} graded, "
          f"{failed} failed, {flagged} flagged for review (sandbox {'on' if sandboxed else 'OFF'})")
    for s in submissions:
        if s.status == "failed" or s.flags:
            detail = s.reason if s.status == "failed" else "; ".join(s.flags)
            print(f"  {s.student} / {s.assignment}: {s.status}, {s.score if s.score is not None else '-'} points: {detail[:300]}")
    for note in run_notes:
        print(f"note: {note}")
    print(f"grades: {root / 'autograder' / 'grades.csv'}\nreport: {reports / 'report.csv'}\n"
          f"feedback: {root / 'autograder' / 'feedback'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("submissions", type=Path, help="a folder or .zip of submitted notebooks")
    parser.add_argument("--assignment", action="append", help="grade only this assignment (repeatable)")
    parser.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="parallel notebooks")
    parser.add_argument("--cell-timeout", type=int, default=120, help="seconds one cell may run")
    parser.add_argument("--notebook-timeout", type=int, default=900, help="seconds one notebook may run")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="memory limit of one notebook's kernel")
    parser.add_argument("--no-sandbox", action="store_true", help="run kernels without the namespace sandbox")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    grade(args.submissions, workers=args.workers, only=args.assignment, cell_timeout=args.cell_timeout,
          notebook_timeout=args.notebook_timeout, memory_gb=args.memory_gb, use_sandbox=not args.no_sandbox,
          progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())

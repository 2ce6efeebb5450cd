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
2. runs the student's cells in a sandboxed kernel and judges every test in a trusted worker process
   (`autograder.worker`, `autograder.execute`, `autograder.judge`): the kernel only runs the tests'
   ``@observe`` calls and reports plain data; the checks run outside its reach, hidden parts last;
3. lets nbgrader score the judged notebooks (without running them again), generate feedback that
   hides hidden tests, and export grades as CSV, all in one nbgrader process (`autograder.nbgrader_batch`).

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
import csv
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autograder import items  # noqa: E402
from autograder import oracles  # noqa: E402
from autograder import prepare as prep  # noqa: E402
from autograder import sandbox  # noqa: E402
from autograder.execute import _error_output, _is_test  # noqa: E402
from autograder.release import nbgrader_batch  # noqa: E402

ZIP_LIMIT_BYTES = 4 << 30
ZIP_LIMIT_FILES = 20_000
SYSTEM_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}
SKIPPED_DUPLICATE = "the archive holds a later entry with the same name, which was graded instead"
SKIPPED_FOLDERS = {".ipynb_checkpoints": "a Jupyter checkpoint copy, not a submission",
                   "__MACOSX": "macOS archive metadata", ".git": "a git repository's internals"}


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


def course_root() -> Path:
    return Path(os.environ.get("PEFTLAB_COURSE_ROOT") or ROOT)


def assignments(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "solutions").iterdir() if p.is_dir() and p.name[:2].isdigit())


def _safe(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", ascii_text).strip("._-")


def student_ids(names: list[str]) -> dict[str, str]:
    """A gradebook id for every distinct name. A name that is already a safe, lower-case id (ASCII
    letters, digits, ``_.@-``, at most 48 characters, no leading dot) is its own id; any other name
    (``José``, ``alice bob``, ``Alice``, a 70-character name, ``.dotted``) becomes its transliteration
    plus a hash of the original. So an id depends only on its name (re-grading, or a new student
    called ``Alice`` beside ``alice``, never renames anyone), and two names never share an id, even
    on a case-insensitive disk. Only a name crafted to equal another's hashed id gets a number."""
    def hashed(name):
        return f"{_safe(name)[:40] or 'student'}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"

    ids, taken = {}, set()
    for name in sorted(set(names)):
        plain = _safe(name) == name and name == name.lower() and 0 < len(name) <= 48
        sid = name if plain else hashed(name)
        base, n = sid, 2
        while sid.lower() in taken:
            sid, n = f"{base}-{n}", n + 1
        ids[name] = sid
        taken.add(sid.lower())
    return ids


def extract_zip(path: Path, target: Path) -> tuple[list[str], dict[str, str]]:
    """Extract safely: no absolute paths, no '..', no links, bounded size and count. An entry that
    cannot be read (bad CRC, encrypted, unknown compression) is left out and named in the result.
    Returns (notes, {entry name: why it could not be read})."""
    notes, broken = [], {}
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise SystemExit(f"{path} cannot be opened as a zip archive: {exc}") from None
    with archive:
        members = archive.infolist()
        if len(members) > ZIP_LIMIT_FILES:
            raise SystemExit(f"{path.name} holds {len(members):,} files (limit {ZIP_LIMIT_FILES:,})")
        if sum(m.file_size for m in members) > ZIP_LIMIT_BYTES:
            raise SystemExit(f"{path.name} would unpack to more than {ZIP_LIMIT_BYTES >> 30} GB")
        last = {m.filename: i for i, m in enumerate(members)}
        for i, member in enumerate(members):
            name = Path(member.filename)
            if member.is_dir():
                continue
            if last[member.filename] != i:  # a later entry of the same name wins; this one is reported
                broken[f"{member.filename} (entry {i + 1})"] = SKIPPED_DUPLICATE
                continue
            if name.is_absolute() or ".." in name.parts or (member.external_attr >> 16) & 0o170000 == 0o120000:
                notes.append(f"skipped unsafe archive entry {member.filename!r}")
                broken[member.filename] = "an unsafe archive entry (absolute path, '..' or a link): not extracted"
                continue
            out = target / name
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except Exception as exc:  # noqa: BLE001 - bad CRC, encryption, compression, a clash with a folder
                out.unlink(missing_ok=True) if out.is_file() else None
                broken[name.as_posix()] = f"the archive entry could not be read ({type(exc).__name__}: {str(exc)[:120]})"
    return notes, broken


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


def _walk(folder: Path):
    """Every entry under ``folder`` without following links: (relative path, kind, why skipped)."""
    for top, dirs, files in os.walk(folder, followlinks=False):
        rel_top = Path(top).relative_to(folder)
        for d in list(dirs):
            rel = rel_top / d
            full = Path(top) / d
            if full.is_symlink():
                dirs.remove(d)
                yield rel, "skip", "a symbolic link, not followed"
            elif d in SKIPPED_FOLDERS:
                dirs.remove(d)
                for sub_top, _, sub_files in os.walk(full, followlinks=False):
                    for f in sub_files:
                        yield Path(sub_top).relative_to(folder) / f, "skip", SKIPPED_FOLDERS[d]
            elif d.endswith(".ipynb"):
                yield rel, "broken", "a folder named like a notebook, not a notebook"
        for f in files:
            rel = rel_top / f
            try:
                mode = os.lstat(Path(top) / f).st_mode
            except OSError as exc:
                yield rel, "broken" if f.endswith(".ipynb") else "skip", f"cannot be read: {exc.strerror}"
                continue
            if stat.S_ISLNK(mode):
                yield rel, "skip", "a symbolic link, not followed"
            elif not stat.S_ISREG(mode):
                yield rel, "skip", "not a regular file"
            elif f in SYSTEM_FILES or f.startswith("._"):
                yield rel, "skip", "an operating system's metadata file"
            elif not f.endswith(".ipynb"):
                yield rel, "skip", "not a notebook (.ipynb)"
            else:
                yield rel, "notebook", ""


def _student_of(rel: Path, assignment: str | None, skipped: bool = False) -> str:
    """The student an export entry belongs to: its top folder, or its file name less the assignment's
    (``alice_05_quantization.ipynb``). A skipped entry in a system folder (``__MACOSX``) has none."""
    if len(rel.parts) > 1:
        top = rel.parts[0]
        return "" if skipped and (top in SKIPPED_FOLDERS or top.startswith(".")) else top
    stem = rel.name[:-len(".ipynb")] if rel.name.endswith(".ipynb") else rel.name
    student = stem.replace(assignment, "") if assignment else stem
    student = student.strip("_- .") or stem
    return "" if skipped and (rel.name in SYSTEM_FILES or rel.name.startswith(".")) else student


def discover(folder: Path, names: list[str], sources: dict, broken: dict[str, str] | None = None
             ) -> tuple[list[Submission], list[Submission], list[str]]:
    """Find (student, assignment, file) in an export folder: (submissions, skipped entries, notes).
    ``broken`` names archive entries that could not be extracted; they become failed submissions."""
    entries = [(rel, kind, why) for rel, kind, why in _walk(folder)]
    entries += [(Path(name), "skip" if why == SKIPPED_DUPLICATE else "broken", why)
                for name, why in sorted((broken or {}).items())]
    skipped, found, notes = [], {}, []
    for rel, kind, why in entries:
        text = rel.as_posix()
        named = [n for n in names if n in text]
        assignment = max(named, key=len) if named else (names[0] if len(names) == 1 else None)
        if kind == "skip":
            skipped.append(Submission("", assignment or "", text, name=_student_of(rel, assignment, skipped=True),
                                      status="skipped", reason=why))
            continue
        if assignment is None and kind == "notebook":
            assignment = _content_assignment(folder / rel, sources)
        student = _student_of(rel, assignment)
        if assignment is None:
            skipped.append(Submission("", "", text, name=student, status="skipped",
                                      reason="cannot tell which assignment this is"))
            continue
        found.setdefault((student, assignment), []).append((rel, kind, why))
    ids = student_ids([student for student, _ in found])
    for row in skipped:  # the same id a graded row of that name has (or would have)
        row.student = (ids.get(row.name) or student_ids([*ids, row.name])[row.name]) if row.name else ""
    submissions = []
    for (student, assignment), items in sorted(found.items()):
        def mtime(item):
            try:
                return os.lstat(folder / item[0]).st_mtime if item[1] == "notebook" else -1.0
            except OSError:
                return -1.0

        chosen = max(items, key=lambda item: (mtime(item), item[0].as_posix()))
        sub = Submission(ids[student], assignment, str(folder / chosen[0]), name=student)
        if chosen[1] == "broken":
            sub.status, sub.reason = "failed", chosen[2]
        if ids[student] != student:
            sub.notes.append(f"student {student!r} is graded as {ids[student]!r}")
        for other in items:
            if other is not chosen:
                sub.flags.append(f"{len(items)} files for this assignment; graded the newest ({chosen[0].as_posix()})")
                skipped.append(Submission(ids[student], assignment, other[0].as_posix(), name=student, status="skipped",
                                          reason=f"an older file for the same student and assignment; graded "
                                                 f"{chosen[0].as_posix()}"))
        submissions.append(sub)
    return submissions, skipped, notes


def releases_of(root: Path, names: list[str], work: Path) -> dict:
    """The release notebooks of some assignments, with the gradebook told about each. nbgrader's
    generate_assignment runs (in one nbgrader process for all of them) only for the assignments whose
    instructor's notebook changed since the last run; its output is kept in autograder/.releases/."""
    cache = root / "autograder" / ".releases"
    gradebook = root / "autograder" / "gradebook.db"
    digests, stale = {}, []
    for name in names:
        digests[name] = hashlib.sha256((root / "solutions" / name / f"{name}.ipynb").read_bytes()).hexdigest()
        stamp, release = cache / f"{name}.sha256", cache / name / f"{name}.ipynb"
        if not (gradebook.exists() and release.exists() and stamp.exists() and stamp.read_text() == digests[name]):
            stale.append(name)
    plan = [["generate_assignment", name, "--force", f"--CourseDirectory.release_directory={cache}"] for name in stale]
    for name, step in zip(stale, nbgrader_batch(root, plan, work) if plan else [], strict=True):
        if step["returncode"] != 0:
            raise SystemExit(f"nbgrader generate_assignment {name} failed:\n{step['log']}")
        (cache / f"{name}.sha256").write_text(digests[name])
    return {name: nbformat.read(cache / name / f"{name}.ipynb", as_version=4) for name in names}


def _unreadable(release_nb, reason: str):
    """A stand-in for a file that cannot be graded: the release with every test failed, not run."""
    nb = nbformat.from_dict(json.loads(json.dumps(release_nb)))
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [_error_output("NotGraded", f"the submission could not be graded: {reason}")] if _is_test(cell) else []
    return nb


def _convert_models_once() -> None:
    """SmolLM2 converted into the cache before any kernel starts: kernels see the cache read-only, and
    some tests need its tokenizer. Done once (21 s on the reference machine), in a trusted process."""
    from peftlab.env import SMOLLM2_CACHE_NAME, cache_dir, smollm2_cached

    if not smollm2_cached():
        print("converting SmolLM2 into the model cache once (about 20 s on 2 cores) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-c", "from peftlab.models import smollm2_path; smollm2_path()"],
                       cwd=ROOT, capture_output=True, timeout=1800)
    folder = cache_dir() / SMOLLM2_CACHE_NAME
    if folder.is_dir() and folder.stat().st_mode & 0o005 != 0o005:  # converted by an older version: private
        try:
            folder.chmod(0o755)
        except OSError:
            pass


class WorkerProcess:
    """One long-lived `autograder.worker` process, fed one job at a time; a job that kills or hangs it
    costs only itself (the caller starts another)."""

    def __init__(self):
        self.log = tempfile.TemporaryFile()  # the worker's own messages: the tail is reported if it dies
        # Its own random string hashes (a fixed PYTHONHASHSEED would let a kernel send dict keys that collide).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
        self.proc = subprocess.Popen([sys.executable, "-m", "autograder.worker"], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1,
                                     start_new_session=True, env=env)
        self.lines: queue.Queue = queue.Queue()

        def read():
            for line in self.proc.stdout:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=read, daemon=True).start()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _tail(self, size: int = 400) -> str:
        self.log.seek(0, os.SEEK_END)
        self.log.seek(max(0, self.log.tell() - size))
        return self.log.read().decode(errors="replace").strip()

    def grade(self, job: dict, timeout: float) -> str | None:
        """Grade ``job`` (its ``job.json`` is written into its folder); the error, or None. After an
        error the process is stopped."""
        path = str(Path(job["folder"]) / "job.json")
        Path(path).write_text(json.dumps(job))
        error = None
        try:
            self.proc.stdin.write(json.dumps({"job": path}) + "\n")
            self.proc.stdin.flush()
            deadline = time.monotonic() + timeout
            while True:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
                if line is None:
                    self.proc.wait()
                    error = f"the grading worker died (exit {self.proc.returncode}): {self._tail()}"
                    break
                if line.strip() == f"PEFTLAB-DONE {path}":
                    break
        except queue.Empty:
            error = "the grading process overran its time and was stopped"
        except (BrokenPipeError, OSError):
            error = "the grading worker died"
        if error:
            self.close()
        return error

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        self.log.close()


class Workers:
    """``n`` long-lived `autograder.worker` processes grading the jobs between them."""

    def __init__(self, n: int, job_timeout: float):
        self.n, self.job_timeout = max(1, n), job_timeout

    def run(self, jobs: list[dict], on_done) -> None:
        todo: queue.Queue = queue.Queue()
        for job in jobs:
            todo.put(job)

        def loop():
            worker = None
            while True:
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    break
                if worker is None or not worker.alive():
                    worker = WorkerProcess()
                error = worker.grade(job, self.job_timeout)
                if error:
                    worker = None
                on_done(job, error)
            if worker is not None:
                worker.close()

        threads = [threading.Thread(target=loop) for _ in range(min(self.n, len(jobs)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


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
          progress: bool = True, expose: list[str] | None = None, max_procs: int = 64,
          scheduler: str | None = None, warm: bool = True) -> list[Submission]:
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
    run_notes, phases = [], {}  # phases: where the run's time went
    try:
        broken: dict[str, str] = {}
        if inputs.is_file() and zipfile.is_zipfile(inputs):
            folder = work / "unzipped"
            folder.mkdir()
            zip_notes, broken = extract_zip(inputs, folder)
            run_notes += zip_notes
        elif inputs.is_dir():
            folder = inputs
        else:
            raise SystemExit(f"{inputs} is neither a folder nor a zip file")

        solutions = {name: nbformat.read(root / "solutions" / name / f"{name}.ipynb", as_version=4) for name in names}
        submissions, skipped, notes = discover(folder, names, solutions, broken)
        run_notes += notes
        if not submissions:
            print("no submissions found", file=sys.stderr)
            write_report(root, skipped, run_notes, time.monotonic() - start, workers, False)
            return skipped
        used = sorted({s.assignment for s in submissions})
        releases = releases_of(root, used, work)
        sources = {name: (solutions[name], releases[name]) for name in used}
        use_sandbox = use_sandbox and sandbox.available()
        if not use_sandbox:
            run_notes.append("SANDBOX OFF: student code can use the network and read any file this user can "
                             "(solutions, gradebook); only time and memory limits apply")

        # Each kernel's torch threads: the cores other work leaves free now, shared by the workers. More
        # threads than free cores makes torch's OpenMP wait a scheduler slice at every operation, which
        # a busy grader pays in CPU time too (notebook 03: 10 min instead of 51 s, see peftlab.env).
        # An OMP_NUM_THREADS set for the grader caps them (other work on the machine is its own).
        from peftlab.env import free_cores, thread_cap, usable_cores

        free, cores = free_cores(), usable_cores()
        threads = max(1, free // max(workers, 1))
        threads = min(threads, thread_cap() or threads)
        if free < cores:
            run_notes.append(f"{cores - free} of {cores} cores were busy with other work when grading started: "
                             f"kernels run {threads} thread(s) each")
        jobs, executed, by_job = [], {}, {}
        for sub in submissions:
            source, release = sources[sub.assignment]
            originals = root / "autograder" / "originals" / sub.student / sub.assignment
            shutil.rmtree(originals, ignore_errors=True)
            originals.mkdir(parents=True)
            if sub.status == "failed":  # an archive entry that could not be read
                executed[sub] = _unreadable(release, sub.reason)
                continue
            try:
                shutil.copyfile(sub.file, originals / Path(sub.file).name, follow_symlinks=False)
            except OSError:
                pass
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
            job_dir = work / "jobs" / f"job-{len(jobs):05d}"
            job_dir.mkdir(parents=True)
            job_dir.chmod(0o700)
            nbformat.write(prepared.notebook, job_dir / "grading.ipynb")
            job = {"folder": str(job_dir), "notebook": str(job_dir / "grading.ipynb"),
                   "output": str(job_dir / "executed.ipynb"), "result": str(job_dir / "result.json"),
                   "cell_timeout": cell_timeout, "notebook_timeout": notebook_timeout,
                   "memory_mb": int(memory_gb * 1024), "sandbox": use_sandbox, "expose": list(expose or []),
                   "max_procs": max_procs, "student_names": prep.student_names(source),
                   "left_out": oracles.left_out(source),
                   "threads": threads, "warm": warm}
            jobs.append(job)
            by_job[job["folder"]] = sub

        _convert_models_once()
        phases["read, release and prepare"] = time.monotonic() - start
        clock = time.monotonic()
        bar = _progress(len(jobs)) if progress else None
        lock = threading.Lock()

        def done(job, error):
            sub = by_job[job["folder"]]
            result = {}
            if not error:
                try:
                    result = json.loads(Path(job["result"]).read_text())
                except (OSError, ValueError):
                    error = "the grading process left no result"
            error = error or result.get("error")
            with lock:
                sub.flags += result.get("flags", [])
                sub.notes += result.get("notes", [])
                sub.seconds = result.get("seconds", 0.0)
                peak = result.get("worker_peak_mb")
                sub.worker_peak_mb = float(peak) if isinstance(peak, (int, float)) else None
                sub.timing = {k: round(v, 3) for k, v in result.get("timing", {}).items()
                              if isinstance(v, (int, float))}
                output = Path(job["output"])
                if error or not output.exists():
                    sub.status, sub.reason = "failed", error or "no output"
                    executed[sub] = _unreadable(sources[sub.assignment][1], sub.reason)
                else:
                    executed[sub] = nbformat.read(output, as_version=4)
                shutil.rmtree(job["folder"], ignore_errors=True)  # whatever the kernel left goes at once
                if bar is not None:
                    bar.update(1)

        if scheduler:  # the execution step on a Dask cluster; everything else stays here
            from autograder.cluster import Cluster

            Cluster(scheduler, notebook_timeout + 240).run(jobs, done)
        else:
            Workers(workers, notebook_timeout + 240).run(jobs, done)
        if bar is not None:
            bar.close()
        phases["execute"] = time.monotonic() - clock
        clock = time.monotonic()

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
        graded_names = sorted({s.assignment for s in submissions})
        plan = []
        for name in graded_names:
            # Students graded before and not in this run are left alone: nbgrader would score (and write
            # feedback for) every submission of the assignment again, so regrading a few cost the class.
            earlier = {p.parent.name for p in (root / "autograder" / "submitted").glob(f"*/{name}")}
            others = sorted(earlier - {s.student for s in submissions if s.assignment == name})
            keep = [f"--CourseDirectory.student_id_exclude={','.join(others)}"] if others else []
            plan += [["autograde", name, "--force", "--Execute.enabled=False", "--ClearOutput.enabled=False",
                      "--Autograde.create_student=True", *keep], ["generate_feedback", name, "--force", *keep]]
        plan.append(["export", "--to", str(root / "autograder" / "grades.csv")])
        for step in nbgrader_batch(root, plan, work):  # one nbgrader process for the whole run
            if step["returncode"] != 0:
                run_notes.append(f"nbgrader {' '.join(step['args'][:2])} reported problems:\n{step['log'][-2000:]}")
        phases["nbgrader"] = time.monotonic() - clock
        clock = time.monotonic()
        for name in graded_names:
            students = [s for s in submissions if s.assignment == name]
            graded = scores(root, [(s.student, name) for s in students])
            for s in students:
                if (s.student, name) in graded:
                    s.score, s.max_score = graded[(s.student, name)]
                    if s.status == "pending":
                        s.status = "graded"
                else:
                    s.status, s.reason = "failed", s.reason or "nbgrader could not score it"
        try:  # item analysis: per test, who passed and why others did not (never a hidden test's text)
            rows = [(s.assignment, s.student, s.score, s.max_score, executed[s]) for s in submissions
                    if s.status == "graded" and s in executed]
            items.write(root / "autograder" / "reports",
                        items.analyse(rows, {name: items.test_points(sources[name][0]) for name in sorted(sources)}))
        except Exception as exc:  # noqa: BLE001 - the grades stand without it
            run_notes.append(f"the item analysis could not be written: {type(exc).__name__}: {exc}")
        phases["scores and item analysis"] = time.monotonic() - clock
        write_report(root, submissions + skipped, run_notes, time.monotonic() - start, workers, use_sandbox, phases)
        return submissions + skipped
    finally:
        shutil.rmtree(work, ignore_errors=True)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text) -> str:
    """Text from a submission (names, flags that quote it) made safe for a terminal: control
    characters (escape sequences) shown as codes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", str(text))


def cell(text) -> str:
    """A CSV cell that a spreadsheet will not evaluate as a formula."""
    text = printable(text)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def write_report(root: Path, submissions: list[Submission], run_notes: list[str], seconds: float,
                 workers: int, sandboxed: bool, phases: dict | None = None) -> None:
    reports = root / "autograder" / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    with open(reports / "report.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "name", "assignment", "status", "score", "max_score", "flags", "notes", "reason",
                         "file"])
        for s in submissions:
            writer.writerow([cell(v) for v in (s.student, s.name, s.assignment, s.status, s.score, s.max_score,
                                               " | ".join(s.flags), " | ".join(s.notes), s.reason, s.file)])
    (reports / "report.json").write_text(json.dumps(
        {"seconds": seconds, "workers": workers, "sandbox": sandboxed, "notes": run_notes,
         "phases": {k: round(v, 2) for k, v in (phases or {}).items()},
         "submissions": [asdict(s) for s in submissions if s.status != "skipped"],
         "skipped": [asdict(s) for s in submissions if s.status == "skipped"]}, indent=1))
    stamp = time.strftime("%Y%m%d-%H%M%S")  # report.* describe the latest run; each run is also kept
    for suffix in ("csv", "json"):
        shutil.copy2(reports / f"report.{suffix}", reports / f"report-{stamp}.{suffix}")
    graded = sum(s.status == "graded" for s in submissions)
    failed = sum(s.status == "failed" for s in submissions)
    skipped = sum(s.status == "skipped" for s in submissions)
    flagged = sum(bool(s.flags) for s in submissions if s.status != "skipped")
    print(f"\n{len(submissions) - skipped} submissions in {seconds:.0f} s with {workers} workers: {graded} graded, "
          f"{failed} failed, {flagged} flagged for review, {skipped} files skipped (sandbox {'on' if sandboxed else 'OFF'})")
    for s in submissions:
        if s.status == "skipped":
            print(printable(f"  skipped {s.file}: {s.reason}"))
        elif s.status == "failed" or s.flags:
            detail = s.reason if s.status == "failed" else "; ".join(s.flags)
            print(printable(f"  {s.student} / {s.assignment}: {s.status}, {s.score if s.score is not None else '-'} "
                            f"points: {detail[:300]}"))
    for note in run_notes:
        print(printable(f"note: {note}"))
    print(f"grades: {root / 'autograder' / 'grades.csv'}\nreport: {reports / 'report.csv'}\n"
          f"feedback: {root / 'autograder' / 'feedback'}")
    if (reports / "items.html").exists():
        print(f"item analysis: {reports / 'items.html'}")


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
    parser.add_argument("--cold-kernels", action="store_true",
                        help="start every kernel as a new interpreter, not forked from a warm one (slower)")
    args = parser.parse_args(argv)
    grade(args.submissions, workers=args.workers, only=args.assignment, cell_timeout=args.cell_timeout,
          notebook_timeout=args.notebook_timeout, memory_gb=args.memory_gb, use_sandbox=not args.no_sandbox,
          progress=not args.quiet, expose=args.expose, max_procs=args.max_procs, scheduler=args.scheduler,
          warm=not args.cold_kernels)
    return 0


if __name__ == "__main__":
    sys.exit(main())

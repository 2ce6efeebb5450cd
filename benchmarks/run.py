"""Benchmarks (not tests): notebook run time and peak memory, autograde time, optional install time.

    .venv/bin/python benchmarks/run.py              # notebooks + autograde, ~1-2 minutes
    .venv/bin/python benchmarks/run.py --install    # also time a fresh `scripts/setup.sh` (minutes)
    .venv/bin/python benchmarks/run.py --grading    # also time the grading command (complete student, 1/2 workers)
    .venv/bin/python benchmarks/run.py --only-grading
    .venv/bin/python benchmarks/run.py --lab        # also LoRA vs QLoRA through the GPU lab's command
    .venv/bin/python benchmarks/run.py --notebooks 01,08 --no-plain-autograde   # some notebooks' run time only

Prints a Markdown table. Each notebook runs in its own process and kernel with the SmolLM2 cache
already converted (what a student sees after the first run); the one-off conversion is timed
separately. Run on the course's reference machine (2 cores) for comparable figures.
"""

from __future__ import annotations

import argparse
import json
import os
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


def _grade(tmp: Path, env: dict, inbox: Path, workers: int, extra: tuple = (), report: dict | None = None) -> float:
    root = tmp / f"grade-root-{inbox.name}-{workers}{'-'.join(extra).replace(':', '')}"
    shutil.copytree(ROOT / "solutions", root / "solutions")
    (root / "autograder").mkdir()
    genv = {**env, "PEFTLAB_COURSE_ROOT": str(root)}
    names = sorted({p.stem for p in inbox.rglob("*.ipynb")})
    # The one-off generate_assignment per assignment is not part of the throughput.
    subprocess.run([PY, "-c", "import sys, tempfile; sys.path.insert(0, '.'); from autograder.grade import releases_of; "
                    "from pathlib import Path; releases_of(Path(sys.argv[1]), sys.argv[2:], Path(tempfile.mkdtemp()))",
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
                 f"cells {floor['cells']:.1f})", ""))
    inside = {}
    for sub in graded["submissions"]:
        for key, value in sub.get("timing", {}).items():
            inside[key] = inside.get(key, 0.0) + value
    jobs = sum(sub.get("seconds", 0.0) for sub in graded["submissions"])
    phases = graded.get("phases", {})
    rows.append(("  where the grading run's time went (1 worker)",
                 f"{graded['seconds']:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()), ""))
    rows.append(("  inside its notebooks' grading",
                 f"{jobs:.1f} s: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in inside.items())
                 + f"; the rest {phases.get('execute', jobs) - sum(inside.values()):.1f} (worker start, judge imports, "
                 "sandbox set-up, kernel shutdown)", ""))


def prepare_row(rows: list) -> None:
    """Preparing a submission with 20,000 cells of the student's own (linear; it was quadratic)."""
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
        rows.append(("preparing a submission with 20,000 extra cells (read, match, rebuild)",
                     f"{time.perf_counter() - start:.1f} s", ""))


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
                     f"{workers} worker(s)", f"{seconds:.1f} s ({60 / seconds:.2f} students/min)", ""))
    subs = graded.get("submissions", [])
    flags = sorted({flag for s in subs for flag in s.get("flags", [])})
    peaks = [s["worker_peak_mb"] for s in subs if s.get("worker_peak_mb")]
    rows.append(("  the complete student (1 worker): points, flags, the grading process's peak memory",
                 f"{sum(s.get('score') or 0 for s in subs):g} points, {len(flags)} flags{': ' + '; '.join(flags) if flags else ''}",
                 f"{max(peaks):,.0f} MB" if peaks else ""))
    floor_rows(env, rows, graded)
    klass = tmp / "inbox-class"
    for i in range(8):
        (klass / f"student{i}").mkdir(parents=True)
        shutil.copy(ROOT / "solutions" / "04_lora" / "04_lora.ipynb", klass / f"student{i}" / "04_lora.ipynb")
    for workers in (1, 2):
        seconds = _grade(tmp, env, klass, workers)
        rows.append((f"grading command: 8 submissions of 04_lora, {workers} worker(s)",
                     f"{seconds:.1f} s ({8 / seconds * 60:.1f} submissions/min)", ""))
    seconds = _grade(tmp, env, klass, 2, ("--scheduler", "local:2"))
    rows.append(("grading command: the same 8 on a Dask LocalCluster of 2 workers (--scheduler local:2)",
                 f"{seconds:.1f} s ({8 / seconds * 60:.1f} submissions/min)", ""))
    return rows


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
        rows.append((f"lab on CPU, {label}: {r['config']['max_steps']} steps, batch {r['config']['batch_size']}, "
                     f"seq {r['config']['max_seq_len']}; accuracy {a['before']:.0%} -> {a['after']:.0%}",
                     f"{t['steps_per_second']:.2f} steps/s, {t['tokens_per_second']:.0f} tokens/s",
                     f"measured / predicted: {phases}"))


class Rows(list):
    """Table rows, each also printed the moment it is measured (a late failure loses nothing)."""

    def append(self, row) -> None:
        super().append(row)
        print(f"| {row[0]} | {row[1]} | {row[2]} |", file=sys.stderr, flush=True)

    def __iadd__(self, rows):
        for row in rows:
            self.append(row)
        return self


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--install", action="store_true", help="also time a fresh setup.sh")
    parser.add_argument("--grading", action="store_true", help="also time the grading command (a few minutes)")
    parser.add_argument("--only-grading", action="store_true", help="time the grading command only")
    parser.add_argument("--lab", action="store_true", help="also run the GPU lab's command at CPU settings")
    parser.add_argument("--only-lab", action="store_true", help="the GPU lab's command only")
    parser.add_argument("--no-plain-autograde", action="store_true", help="skip nbgrader's own autograde (demos included)")
    parser.add_argument("--notebooks", default="", help="only these notebooks, by number (e.g. 01,08)")
    args = parser.parse_args()
    wanted = {n.strip() for n in args.notebooks.split(",") if n.strip()}
    rows = Rows()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = isolated_env(tmp / "home", tmp / "cache")
        (tmp / "home").mkdir()
        seconds = timed([PY, "-m", "peftlab.models"], env=env)
        rows.append(("SmolLM2 one-off conversion (first run only)", f"{seconds:.1f} s", ""))
        if args.only_grading:
            grading_rows(tmp, env, rows)
            return _print(rows)
        if args.only_lab:
            lab_rows(tmp, env, rows)
            return _print(rows)

        for path in sorted((ROOT / "solutions").glob("*/*.ipynb")):
            if wanted and path.parent.name[:2] not in wanted:
                continue
            done = subprocess.run([PY, "-c", _EXECUTE, str(path), str(path.parent)], env=env,
                                  capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((f"notebook {path.parent.name}, top to bottom",
                         f"{result['seconds']:.1f} s", f"{result['kernel_peak_mb']:,.0f} MB"))

        course = tmp / "course-root"
        shutil.copytree(ROOT / "solutions", course / "solutions")
        (course / "autograder").mkdir()
        genv = {**env, "PEFTLAB_COURSE_ROOT": str(course)}
        for path in ([] if args.no_plain_autograde else sorted((course / "solutions").glob("*/*.ipynb"))):
            name = path.parent.name
            if wanted and name[:2] not in wanted:
                continue
            timed([PY, "-m", "nbgrader", "generate_assignment", name, "--force"], cwd=ROOT, env=genv)
            shutil.copytree(path.parent, course / "autograder" / "submitted" / "student" / name)
            seconds = timed([PY, "-m", "nbgrader", "autograde", name, "--force"], cwd=ROOT, env=genv)
            rows.append((f"nbgrader autograde of one {name} submission", f"{seconds:.1f} s", ""))

        if args.grading:
            grading_rows(tmp, env, rows)
        if args.lab:
            lab_rows(tmp, env, rows)

        if args.install:
            clone = tmp / "clone"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
            seconds = timed(["bash", "scripts/setup.sh"], cwd=clone, env={**os.environ, "HOME": str(tmp / "home")})
            rows.append(("fresh install (scripts/setup.sh, pip cache empty)", f"{seconds:.0f} s", ""))

    _print(rows)


def _print(rows) -> None:
    print(f"\nPEFT Lab benchmarks ({os.cpu_count()} cores, {time.strftime('%Y-%m-%d')})\n")
    print("| what | time | peak memory |\n|---|---:|---:|")
    for what, seconds, memory in rows:
        print(f"| {what} | {seconds} | {memory} |")


if __name__ == "__main__":
    main()

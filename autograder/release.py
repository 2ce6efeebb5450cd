"""Generate the student release, course/, from the instructor notebooks in solutions/.

    python autograder/release.py              # regenerate every assignment (or: release.py 01_memory_math)
    python autograder/release.py --check      # exit 1 if the committed course/ is out of date

`solutions/` is the only place to edit notebooks: nbgrader replaces each solution with a stub that
raises NotImplementedError, strips hidden tests and outputs, and records the assignment in the
gradebook (autograder/gradebook.db) so that submissions can be autograded later. `--check`
generates into a temporary folder with a temporary gradebook and compares, touching nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "solutions"
COURSE = ROOT / "course"


def assignments() -> list[str]:
    """Assignment folders in course order (their names start with the notebook number)."""
    return sorted(p.name for p in SOLUTIONS.iterdir() if p.is_dir() and p.name[:2].isdigit())


def nbgrader_env(root: Path = ROOT) -> dict[str, str]:
    """Environment for an nbgrader subprocess: the course root, and this Python's scripts on PATH
    (nbgrader runs the `alembic` command, which only a venv's bin folder may have)."""
    scripts = str(Path(sys.executable).parent)
    return {**os.environ, "PEFTLAB_COURSE_ROOT": str(root),
            "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")])}


def generate(assignment: str, release_dir: Path = COURSE, db_url: str | None = None) -> None:
    """Run nbgrader's generate_assignment for one assignment into ``release_dir``."""
    cmd = [sys.executable, "-m", "nbgrader", "generate_assignment", assignment, "--force",
           f"--CourseDirectory.release_directory={release_dir}"]
    if db_url:
        cmd.append(f"--CourseDirectory.db_url={db_url}")
    env = nbgrader_env()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nbgrader generate_assignment {assignment} failed:\n{done.stdout}{done.stderr}")


def _normalised(path: Path):
    """A notebook's content without formatting differences (key order, indentation)."""
    return json.loads(path.read_text())


# Folders that running a notebook creates next to it (never released, never compared).
RUN_OUTPUTS = {".ipynb_checkpoints", "lab_output", "__pycache__"}


def stale_files(release_dir: Path, committed_dir: Path = COURSE) -> list[str]:
    """Relative paths that differ between a fresh release and the committed course/."""
    fresh = {p.relative_to(release_dir) for p in release_dir.rglob("*") if p.is_file()}
    committed = {p.relative_to(committed_dir) for p in committed_dir.rglob("*")
                 if p.is_file() and not RUN_OUTPUTS & set(p.parts)}
    problems = [f"missing from course/: {p}" for p in sorted(fresh - committed)]
    problems += [f"not generated from solutions/: {p}" for p in sorted(committed - fresh)]
    for rel in sorted(fresh & committed):
        a, b = release_dir / rel, committed_dir / rel
        same = (_normalised(a) == _normalised(b)) if rel.suffix == ".ipynb" else a.read_bytes() == b.read_bytes()
        if not same:
            problems.append(f"out of date: course/{rel}")
    return problems


def check() -> list[str]:
    """Generate every assignment into a temporary folder and compare with the committed course/."""
    with tempfile.TemporaryDirectory() as tmp:
        release_dir = Path(tmp) / "course"
        db_url = f"sqlite:///{Path(tmp) / 'gradebook.db'}"
        for name in assignments():
            generate(name, release_dir, db_url)
        return stale_files(release_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("assignment", nargs="*", help="assignment folders (default: all)")
    parser.add_argument("--check", action="store_true", help="only report whether course/ is up to date")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for line in problems:
            print(line)
        print("course/ is up to date" if not problems else
              "Run `python autograder/release.py` and commit course/.")
        return 1 if problems else 0
    (ROOT / "autograder").mkdir(exist_ok=True)
    for name in args.assignment or assignments():
        generate(name)
        print(f"released {name} -> course/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

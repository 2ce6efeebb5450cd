"""Generate the student release, course/, from the instructor notebooks in solutions/.

    python autograder/release.py              # regenerate every assignment (or: release.py 01_memory_math)
    python autograder/release.py --check      # exit 1 if the committed course/ is out of date

Before generating, `stamp` writes the repository's address (pyproject.toml's ``Repository``) into every
notebook's Colab badge and setup cell and the README's course map: publishing elsewhere is one edit.
`attach_diagrams` attaches to the markdown cells the diagrams they show (drawn by `peftlab.diagrams`),
and `quiz_keys` writes the quizzes' self-check (src/peftlab/data/quiz.json) from solutions/quiz.toml.

`solutions/` is the only place to edit notebooks: nbgrader replaces each solution with a stub that
raises NotImplementedError, strips hidden tests and outputs, and records the assignment in the
gradebook (autograder/gradebook.db) so that submissions can be autograded later. `--check`
generates into a temporary folder with a temporary gradebook and compares, touching nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "solutions"
COURSE = ROOT / "course"
QUIZ_SOURCE = SOLUTIONS / "quiz.toml"
QUIZ_KEYS = ROOT / "src" / "peftlab" / "data" / "quiz.json"


COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def repository_url(root: Path = ROOT) -> str:
    """The project's public repository, from pyproject.toml: the one address to edit when publishing."""
    import tomllib

    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]["Repository"].rstrip("/")


def colab_url(assignment: str, repository: str | None = None) -> str:
    """Where Colab opens the student release of ``assignment`` from the repository on GitHub."""
    repository = repository or repository_url()
    path = repository.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{path}/blob/main/course/{assignment}/{assignment}.ipynb"


def badge(assignment: str, repository: str | None = None) -> str:
    return f"[![Open In Colab]({COLAB_BADGE})]({colab_url(assignment, repository)})"


_BADGE_LINE = re.compile(r"^\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)$", re.M)
_SETUP_PIP = re.compile(r'"peftlab @ git\+[^"]*"')
_README_LINK = re.compile(r"https://colab\.research\.google\.com/github/[^)\s]*/blob/main/course/(\d\d_[a-z_]+)/\1\.ipynb")


def stamp(repository: str | None = None) -> list[str]:
    """Put the repository's address where students meet it: a Colab badge under each notebook's title,
    the setup cell's install line, the README's course map. Returns the files it changed."""
    repository = repository or repository_url()
    changed = []
    for name in assignments():
        path = SOLUTIONS / name / f"{name}.ipynb"
        text = path.read_text()
        nb = json.loads(text)
        title = next(c for c in nb["cells"] if c["cell_type"] == "markdown")
        source = "".join(title["source"])
        line = badge(name, repository)
        if _BADGE_LINE.search(source):
            source = _BADGE_LINE.sub(line, source)
        else:
            head, _, rest = source.partition("\n")
            source = f"{head}\n\n{line}\n{rest}" if rest else f"{head}\n\n{line}"
        title["source"] = _lines(source)
        for cell in nb["cells"]:
            if cell.get("id") == "setup":
                cell["source"] = _lines(_SETUP_PIP.sub(f'"peftlab @ git+{repository}"', "".join(cell["source"])))
        new = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
        if new != text:
            path.write_text(new)
            changed.append(str(path.relative_to(ROOT)))
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = _README_LINK.sub(lambda m: colab_url(m.group(1), repository), text)
    if new != text:
        readme.write_text(new)
        changed.append("README.md")
    return changed


_ATTACHMENT = re.compile(r"\]\(attachment:([\w.-]+\.png)\)")


def attach_diagrams(write: bool = True) -> list[str]:
    """Attach to each markdown cell of solutions/ the diagrams it shows (``![...](attachment:NAME.png)``),
    drawn by `peftlab.diagrams`, and nothing else. Returns the notebooks that changed (or would)."""
    from peftlab.diagrams import attachment

    drawn, changed = {}, []
    for name in assignments():
        path = SOLUTIONS / name / f"{name}.ipynb"
        text = path.read_text()
        nb = json.loads(text)
        for cell in nb["cells"]:
            wanted = sorted(set(_ATTACHMENT.findall("".join(cell["source"])))) if cell["cell_type"] == "markdown" else []
            if wanted:
                cell["attachments"] = {n: drawn.setdefault(n, attachment(n)) for n in wanted}
            else:
                cell.pop("attachments", None)
        new = json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"
        if new != text:
            changed.append(str(path.relative_to(ROOT)))
            if write:
                path.write_text(new)
    return changed


def quiz_keys(source: Path = QUIZ_SOURCE) -> str:
    """The learners' quiz self-check (`peftlab.quiz`): solutions/quiz.toml's answers as salted digests,
    its explanations sealed with the right answers, its hints in the clear."""
    import tomllib

    from peftlab.quiz import entry

    table = tomllib.loads(source.read_text())
    keys = {notebook: {str(n): entry(notebook, int(n), q["kind"], q["answer"], q["hint"], q["explanation"])
                       for n, q in questions.items()}
            for notebook, questions in table.items()}
    return json.dumps(keys, indent=1, sort_keys=True) + "\n"


def _lines(text: str) -> list[str]:
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + [parts[-1]]


def assignments() -> list[str]:
    """Assignment folders in course order (their names start with the notebook number)."""
    return sorted(p.name for p in SOLUTIONS.iterdir() if p.is_dir() and p.name[:2].isdigit())


def nbgrader_env(root: Path = ROOT) -> dict[str, str]:
    """Environment for an nbgrader subprocess: the course root, and this Python's scripts on PATH
    (nbgrader runs the `alembic` command, which only a venv's bin folder may have)."""
    scripts = str(Path(sys.executable).parent)
    return {**os.environ, "PEFTLAB_COURSE_ROOT": str(root),
            "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")])}


def nbgrader_batch(root: Path, plan: list[list[str]], work: Path, timeout: int = 3600) -> list[dict]:
    """Run nbgrader commands (argument lists) in order, in one nbgrader process
    (`autograder.nbgrader_batch`); returns each command's exit code and log."""
    plan_file, result_file = work / "nbgrader-plan.json", work / "nbgrader-result.json"
    plan_file.write_text(json.dumps(plan))
    try:
        done = subprocess.run([sys.executable, "-m", "autograder.nbgrader_batch", str(plan_file), str(result_file)],
                              cwd=ROOT, env=nbgrader_env(root), capture_output=True, text=True, timeout=timeout)
        if done.returncode == 0 and result_file.exists():
            return json.loads(result_file.read_text())
        problem = f"exit code {done.returncode}: {done.stderr[-2000:]}"
    except subprocess.TimeoutExpired:
        problem = f"ran past {timeout} s and was stopped"
    return [{"args": command, "returncode": -1, "log": f"the nbgrader process {problem}"} for command in plan]


def generate(names: list[str], release_dir: Path = COURSE, db_url: str | None = None) -> None:
    """Run nbgrader's generate_assignment for each assignment into ``release_dir`` (one nbgrader process)."""
    extra = [f"--CourseDirectory.db_url={db_url}"] if db_url else []
    plan = [["generate_assignment", name, "--force", f"--CourseDirectory.release_directory={release_dir}", *extra]
            for name in names]
    with tempfile.TemporaryDirectory() as work:
        for name, step in zip(names, nbgrader_batch(ROOT, plan, Path(work)), strict=True):
            if step["returncode"] != 0:
                raise RuntimeError(f"nbgrader generate_assignment {name} failed:\n{step['log']}")


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
        generate(assignments(), release_dir, db_url)
        problems = stale_files(release_dir)
    problems += [f"diagrams out of date: {path}" for path in attach_diagrams(write=False)]
    if not QUIZ_KEYS.exists() or QUIZ_KEYS.read_text() != quiz_keys():
        problems.append(f"out of date: {QUIZ_KEYS.relative_to(ROOT)} (from {QUIZ_SOURCE.relative_to(ROOT)})")
    return problems


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
    for path in stamp():
        print(f"updated {path} from the repository address in pyproject.toml")
    for path in attach_diagrams():
        print(f"attached the diagrams {path} shows")
    QUIZ_KEYS.write_text(quiz_keys())
    names = args.assignment or assignments()
    generate(names)
    for name in names:
        print(f"released {name} -> course/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

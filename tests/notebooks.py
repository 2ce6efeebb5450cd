"""Reading and running course notebooks in tests: find cells by nbgrader grade_id, execute notebooks in
a real kernel, or run their graded path in-process (fast, for trying many student mistakes)."""

from __future__ import annotations

import contextlib
import copy
import io
import os
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "solutions"
COURSE = ROOT / "course"


def notebooks(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*/*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def nbgrader_meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def is_test_cell(cell) -> bool:
    """An autograded test cell: graded, not a solution, code."""
    meta = nbgrader_meta(cell)
    return cell["cell_type"] == "code" and meta.get("grade") and not meta.get("solution")


def graded_test_cells(nb) -> dict[str, dict]:
    return {nbgrader_meta(c)["grade_id"]: c for c in nb.cells if is_test_cell(c)}


def solution_source(nb, grade_id: str) -> str:
    """The source of the solution cell ``grade_id``."""
    for cell in nb.cells:
        if nbgrader_meta(cell).get("grade_id") == grade_id and nbgrader_meta(cell).get("solution"):
            return cell["source"]
    raise KeyError(f"no solution cell {grade_id}")


def hidden_test_lines(nb) -> list[str]:
    """The non-empty lines between nbgrader's hidden-test markers in a solution notebook."""
    lines = []
    for cell in graded_test_cells(nb).values():
        for block in cell.source.split("### BEGIN HIDDEN TESTS")[1:]:
            lines += [line.strip() for line in block.split("### END HIDDEN TESTS")[0].splitlines() if line.strip()]
    return lines


def execute(path: Path, timeout: int = 600, allow_errors: bool = False, extra_cells=(), skip_tags=(), first_cells=()):
    """Execute a notebook top to bottom in a fresh kernel, in the notebook's own folder; the code of
    ``first_cells`` runs before its first cell and that of ``extra_cells`` after its last; cells tagged
    with one of ``skip_tags`` are left out."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if not set(skip_tags) & set(c.get("metadata", {}).get("tags", []))]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in extra_cells]
    nb.cells[:0] = [nbformat.v4.new_code_cell(source) for source in first_cells]
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=allow_errors,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    return nb


# Run after a whole notebook (see `reachable_reference`): what of the tests' reference code a student's next cell could call.
REACHABLE_PROBE = """
def _reachable(namespace):
    import json, sys, types
    reference, found = sys.modules.get("peftlab.reference"), []
    if reference is not None:
        oracles = {id(reference)} | {id(v) for v in vars(reference).values()
                                     if getattr(v, "__module__", None) == reference.__name__}
        for name, value in list(namespace.items()):
            if id(value) in oracles:
                found.append(name)
            elif isinstance(value, types.ModuleType):
                found += [f"{name}.{a}" for a, v in vars(value).items() if not a.startswith("_") and id(v) in oracles]
    print("REACHABLE", json.dumps(found))


_reachable(globals())
"""


def reachable_reference(nb) -> list[str]:
    """What the `REACHABLE_PROBE` cell (the notebook's last) found of the reference code."""
    import json

    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o["output_type"] == "stream")
    assert "REACHABLE" in printed, f"the probe cell did not report: {nb.cells[-1].outputs}"
    return json.loads(printed.split("REACHABLE", 1)[1])


def cell_errors(cell) -> list[str]:
    return [f"{o['ename']}: {o['evalue']}" for o in cell.get("outputs", []) if o["output_type"] == "error"]


def run_graded_path(nb, replace: dict[str, str] | None = None, skip_tags=("demo",),
                    until: set[str] | None = None) -> dict[str, BaseException | None]:
    """Run a notebook's graded path in-process, split as the grader splits it, and report each test.

    The student's side (locked, answer and plain cells, and the ``@observe`` calls of the tests) runs
    in one namespace, the judge's side (the tests' checks, the locked cells that do not use the
    student's names) in another, with the hidden parts of the tests held back to the end, exactly as
    `autograder.execute` does with a real kernel. ``replace`` maps a solution cell's grade_id to other
    source (a student's mistake). Cells tagged ``demo`` are skipped: graded tests never depend on them.
    With ``until`` (grade_ids), the run stops once all of them have run, and then runs the hidden parts
    of the tests so far: the verdicts of those tests are complete, later cells cannot change them.
    Returns grade_id -> an exception describing the failure, or None when the test passed.
    """
    import sys

    sys.path.insert(0, str(ROOT))
    from autograder.judge import Judge, LocalKernel
    from autograder.judge import used_names as judge_names
    from autograder.prepare import student_names

    from autograder import oracles

    replace = dict(replace or {})
    kernel = LocalKernel()
    student = set(student_names(nb))
    graded = copy.deepcopy(nb)  # the notebook as graded: the replaced answers read as the grader reads them
    for cell in graded.cells:
        grade_id = nbgrader_meta(cell).get("grade_id")
        if grade_id in replace and nbgrader_meta(cell).get("solution"):
            cell["source"] = replace[grade_id]
    judge = Judge(kernel.send, student, oracles.find(graded))
    seen = set()  # the grade_ids run so far
    for cell in nb.cells:
        if cell["cell_type"] != "code" or set(skip_tags) & set(cell.get("metadata", {}).get("tags", [])):
            continue
        grade_id = nbgrader_meta(cell).get("grade_id")
        source = replace.pop(grade_id, cell["source"]) if grade_id else cell["source"]
        seen.add(grade_id)
        if is_test_cell(cell):
            judge.test(grade_id, source)
            seen.add(grade_id)
            if until is not None and until <= seen:
                break  # what comes later cannot change these tests' verdicts
            continue
        if "judge-only" in cell.get("metadata", {}).get("tags", []):
            judge.locked(source)
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                kernel.run(source, f"<cell {grade_id or cell.get('id')}>")
        except Exception as exc:  # noqa: BLE001 - a student's cell (or one using it) may fail; the tests say so
            if nbgrader_meta(cell).get("locked") and not set(student) & judge_names(source):
                raise RuntimeError(f"locked cell {grade_id or cell.get('id')} failed: {exc!r}") from exc
        if nbgrader_meta(cell).get("locked") and cell.get("id") != "setup":
            judge.locked(source)
    verdicts = judge.finish()
    import matplotlib.pyplot as plt

    plt.close("all")
    if replace:
        raise KeyError(f"no solution cells named {sorted(replace)}")
    return {gid: None if v.passed else AssertionError(f"{v.ename}: {v.evalue}") for gid, v in verdicts.items()}


def isolated_env(home: Path, cache: Path) -> dict[str, str]:
    """Environment variables that keep kernels and tools out of the real home and offline."""
    return {
        "HOME": str(home),
        "IPYTHONDIR": str(home / ".ipython"),
        "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
        "JUPYTER_DATA_DIR": str(home / ".local" / "share" / "jupyter"),
        "JUPYTER_RUNTIME_DIR": str(home / ".local" / "share" / "jupyter" / "runtime"),
        "MPLCONFIGDIR": str(home / ".matplotlib"),
        "MPLBACKEND": "Agg",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home / ".cache" / "huggingface"),
        "PEFTLAB_CACHE": str(cache),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def seeded_cache(folder: Path) -> Path:
    """A private model cache for a grading run (its kernels see it read-only; with the sandbox off a
    submission could write there), holding a copy of the session's converted SmolLM2: a copy takes
    about a second, a conversion about 20."""
    import shutil

    from peftlab.env import SMOLLM2_CACHE_NAME, cache_dir
    from peftlab.models import smollm2_path

    smollm2_path()  # converted once per session, into the session's cache
    shutil.copytree(cache_dir() / SMOLLM2_CACHE_NAME, folder / SMOLLM2_CACHE_NAME)
    return folder


@contextlib.contextmanager
def environ(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def mutation_tests(path: Path, mutants: dict, correct_variants: dict | None = None, slow: set[str] = frozenset()):
    """Pytest functions checking that a notebook's graded tests pass its solution, reject each mutant
    (a plausible student mistake: ``name -> (grade_id, old, new, test ids of which one must fail)``)
    and accept each correct variant (``name -> (grade_id, old, new)``). Mutants named in ``slow`` run
    in the slow tier only (the quick tier keeps a few of each exercise).

    Use: ``test_solution, test_mistake, test_variant = mutation_tests(NB, MUTANTS, VARIANTS)``.
    """
    import functools

    import pytest

    @functools.cache
    def notebook():
        return nbformat.read(path, as_version=4)

    def swapped(grade_id, old, new, until=None):
        source = solution_source(notebook(), grade_id)
        assert old in source, f"mutation anchor not found in {grade_id}: {old!r}"
        return run_graded_path(notebook(), {grade_id: source.replace(old, new)}, until=until)

    def summary(outcomes):
        return {k: str(v)[:300] if v else "pass" for k, v in outcomes.items()}

    def test_solution_passes_the_graded_path():
        outcomes = run_graded_path(notebook())
        assert outcomes and all(v is None for v in outcomes.values()), summary(outcomes)

    @pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in mutants])
    def test_tests_reject_mistake(name):
        grade_id, old, new, must_fail = mutants[name]
        outcomes = swapped(grade_id, old, new, until={grade_id, *must_fail})
        assert any(outcomes.get(gid) is not None for gid in must_fail), f"no test caught '{name}': {summary(outcomes)}"

    @pytest.mark.parametrize("name", list(correct_variants or {}))
    def test_tests_accept_correct_variant(name):
        outcomes = swapped(*correct_variants[name])
        assert all(v is None for v in outcomes.values()), f"'{name}' is correct but fails: {summary(outcomes)}"

    variants_test = test_tests_accept_correct_variant if correct_variants else None  # None: nothing to collect
    return test_solution_passes_the_graded_path, test_tests_reject_mistake, variants_test


def stop_group(process, timeout: float = 20) -> None:
    """Stop a server started with ``start_new_session=True`` and everything it started (its kernels):
    SIGTERM to the group, SIGKILL after ``timeout`` seconds."""
    import signal
    import subprocess

    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

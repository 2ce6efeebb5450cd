"""The notebooks themselves: solutions pass, release stubs fail, course/ is generated, hygiene."""

import json
import sys

import nbformat
import pytest

from notebooks import (COURSE, ROOT, SOLUTIONS, REACHABLE_PROBE, cell_errors, execute, is_test_cell, nbgrader_meta,
                       notebooks, reachable_reference,
                       graded_test_cells)

SOLUTION_NBS = notebooks(SOLUTIONS)
RELEASE_NBS = notebooks(COURSE)
ids = [p.parent.name for p in SOLUTION_NBS]


def test_every_assignment_is_released():
    assert SOLUTION_NBS, "no solution notebooks found"
    assert [p.relative_to(SOLUTIONS) for p in SOLUTION_NBS] == [p.relative_to(COURSE) for p in RELEASE_NBS]


@pytest.mark.slow
@pytest.mark.parametrize("path", SOLUTION_NBS, ids=ids)
def test_solution_runs_top_to_bottom_and_passes_every_test(path, executed_solution):
    nb, _, seconds = executed_solution(path.parent.name)
    print(f"{path.parent.name}: {seconds:.1f} s top to bottom")
    assert not reachable_reference(nb), f"after the demonstrations, reference code is reachable: {reachable_reference(nb)}"
    for cell in nb.cells:
        assert not cell_errors(cell), f"{nbgrader_meta(cell).get('grade_id') or cell.get('id')}: {cell_errors(cell)}"
    assert graded_test_cells(nb), "a graded notebook needs graded test cells"
    # nbgrader gives zero points to a test cell that writes anything to stderr (a library warning too).
    for grade_id, cell in graded_test_cells(nb).items():
        stderr = [o["text"] for o in cell.outputs if o["output_type"] == "stream" and o["name"] == "stderr"]
        assert not stderr, f"{grade_id} writes to stderr, which nbgrader scores as a failure: {stderr}"


# The pictures drawn from what a cell measures (the diagrams are attachments: test_browser, test_diagrams).
DATA_PICTURES = {"05_quantization": ["quant-levels-plot"], "06_qlora": ["qlora-12"], "07_gpu_lab": ["lab-13"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DATA_PICTURES))
def test_measured_pictures_are_drawn(name, executed_solution):
    nb, _, _ = executed_solution(name)
    cells = {c.get("id"): c for c in nb.cells}
    for cell_id in DATA_PICTURES[name]:
        images = [o for o in cells[cell_id].outputs if "image/png" in o.get("data", {})]
        assert images, f"{name}: cell {cell_id} drew no picture"


@pytest.mark.slow
@pytest.mark.parametrize("path", RELEASE_NBS, ids=ids)
def test_release_stubs_fail_every_graded_test(path):
    """...and, once every cell has run (tests included), no name in the notebook's namespace, nor a
    public attribute of a module there, is the tests' reference code. The demonstrations are left out
    here (they need the student's work, and the solution's run checks the same probe after them)."""
    nb = execute(path, allow_errors=True, extra_cells=[REACHABLE_PROBE], skip_tags=("demo",))
    passing = [gid for gid, cell in graded_test_cells(nb).items() if not cell_errors(cell)]
    assert not passing, f"graded tests that pass without the student's work: {passing}"
    assert not reachable_reference(nb), f"the tests' reference code is in the student's namespace: {reachable_reference(nb)}"


@pytest.mark.slow
def test_committed_course_is_generated_from_solutions():
    sys.path.insert(0, str(ROOT / "autograder"))
    import release

    problems = release.check()
    assert not problems, "\n".join(problems + ["run: python autograder/release.py"])


@pytest.mark.parametrize("path", SOLUTION_NBS + RELEASE_NBS, ids=[str(p.relative_to(ROOT)) for p in SOLUTION_NBS + RELEASE_NBS])
def test_notebook_hygiene(path):
    raw = json.loads(path.read_text())
    nb = nbformat.reads(path.read_text(), as_version=4)
    nbformat.validate(nb)
    code = [c for c in raw["cells"] if c["cell_type"] == "code"]
    assert not any(c["outputs"] or c["execution_count"] for c in code), "commit notebooks without outputs"
    # The first code cell is the shared setup cell (versions; installs only in Colab).
    first = nb.cells[[c.cell_type for c in nb.cells].index("code")]
    setup = nbformat.read(SOLUTION_NBS[0], as_version=4).cells[1]
    assert first.source == setup.source and first.get("id") == "setup"
    assert 'if "google.colab" in sys.modules' in first.source and "peftlab.print_versions()" in first.source
    for cell in nb.cells:
        if is_test_cell(cell):
            meta = nbgrader_meta(cell)
            assert meta.get("points", 0) > 0, f"{meta['grade_id']} awards no points"
            assert cell.source.startswith('"""'), f"{meta['grade_id']} should open with a one-line docstring"


def test_setup_cell_installs_from_the_project_repository():
    import tomllib

    repo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    setup = nbformat.read(SOLUTION_NBS[0], as_version=4).cells[1].source
    assert f"peftlab @ git+{repo}" in setup
    assert "torch" not in setup.split("pip")[1].split("]")[0], "Colab keeps its own torch"


@pytest.mark.parametrize("path", SOLUTION_NBS, ids=ids)
def test_hidden_tests_exist_and_are_stripped_from_the_release(path):
    solution = nbformat.read(path, as_version=4)
    release = nbformat.read(COURSE / path.relative_to(SOLUTIONS), as_version=4)
    hidden = [gid for gid, c in graded_test_cells(solution).items() if "### BEGIN HIDDEN TESTS" in c.source]
    assert hidden, "every notebook should have hidden tests"
    for gid, cell in graded_test_cells(release).items():
        assert "HIDDEN TESTS" not in cell.source, gid
    for cell in release.cells:
        assert "### BEGIN SOLUTION" not in cell.source


def _judge_level_names(source: str) -> set[str]:
    """Names a test cell loads outside its @observe functions: what the judge's own process evaluates."""
    import ast

    names = set()

    def visit(node, inside_probe=False):
        if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and getattr(d.func, "id", "") == "observe" for d in node.decorator_list):
            for decorator in node.decorator_list:
                visit(decorator)
            return  # the body runs in the student's kernel
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            names.add(node.id)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return names


@pytest.mark.parametrize("path", SOLUTION_NBS, ids=ids)
def test_tests_call_student_code_only_through_observe(path):
    """The grader runs a test's checks in its own process, where the student's names do not exist: a
    check that uses one directly (instead of inside an @observe function) could never pass there."""
    sys.path.insert(0, str(ROOT))
    from autograder.prepare import student_names

    nb = nbformat.read(path, as_version=4)
    student = set(student_names(nb))
    for grade_id, cell in graded_test_cells(nb).items():
        used = _judge_level_names(cell.source) & student
        assert not used, f"{grade_id} uses the student's {sorted(used)} outside an @observe function"
        lines = cell.source.rstrip().splitlines()
        if "### BEGIN HIDDEN TESTS" in cell.source:  # the judge holds back everything after the marker
            assert "### BEGIN HIDDEN TESTS" in [l for l in lines if not l.startswith((" ", "\t"))], grade_id
            assert lines[-1] == "### END HIDDEN TESTS", f"{grade_id}: the hidden part must end the cell"


@pytest.mark.parametrize("path", SOLUTION_NBS, ids=ids)
def test_checks_cannot_be_emptied_by_a_short_report(path):
    """A kernel can return fewer values than a test asked for: every zip over observed values is strict,
    and no check loops directly over what the kernel returned (a short list would make it vacuous)."""
    import ast

    nb = nbformat.read(path, as_version=4)
    for grade_id, cell in graded_test_cells(nb).items():
        tree = ast.parse(cell.source)
        probes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and any(
            isinstance(d, ast.Call) and getattr(d.func, "id", "") == "observe" for d in n.decorator_list)]
        observed = {p.name for p in probes}
        inside = {id(x) for p in probes for x in ast.walk(p)}

        def root(node):
            while isinstance(node, (ast.Subscript, ast.Attribute, ast.Call)):
                node = node.func if isinstance(node, ast.Call) else node.value
            return getattr(node, "id", None)

        for node in ast.walk(tree):
            if id(node) in inside:
                continue
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "zip":
                assert any(k.arg == "strict" for k in node.keywords), f"{grade_id}: zip(...) without strict=True"
            if isinstance(node, ast.For):
                assert root(node.iter) not in observed, f"{grade_id}: a loop over {ast.unparse(node.iter)} (observed)"


def _defined_names(source: str) -> set[str]:
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    # Methods count too (a renamed copy of an exercise's class still repeats its forward), dunders do not.
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("__")}


def test_no_release_notebook_carries_another_exercise_s_answer():
    """A graded function or class is defined only in its own exercise cell (where the release has a
    stub): no other cell of any release notebook may define it again, which would hand students the
    answer of an exercise (course/03 once carried 02's soft-prompt count and class)."""
    graded = {}  # name -> (notebook, grade_id) of the solution cell that defines it
    for path in SOLUTION_NBS:
        for cell in nbformat.read(path, as_version=4).cells:
            meta = nbgrader_meta(cell)
            if cell.cell_type == "code" and meta.get("solution"):
                for name in _defined_names(cell.source):
                    graded.setdefault(name, (path.parent.name, meta["grade_id"]))
    assert {"soft_prompt_param_count", "LoRALinear", "quantize_nf4"} <= set(graded), sorted(graded)
    found = []
    for path in RELEASE_NBS:
        for cell in nbformat.read(path, as_version=4).cells:
            meta = nbgrader_meta(cell)
            if cell.cell_type != "code" or meta.get("solution"):
                continue
            for name in _defined_names(cell.source) & set(graded):
                found.append(f"{path.parent.name}, cell {cell.get('id')}: defines {name} "
                             f"(the exercise {graded[name][1]} of {graded[name][0]})")
    assert not found, "\n".join(found)

"""The rule that an answer is the student's own work is stated where it applies and checked by the
visible tests, with one implementation (`peftlab.rules`) for the notebook and the grader."""

from __future__ import annotations

import ast
import sys

import nbformat
import pytest

from notebooks import ROOT
from test_oracles import CHEATS, NB, _cheat, _nb

sys.path.insert(0, str(ROOT))
from autograder import oracles  # noqa: E402
from peftlab import rules  # noqa: E402


def _declared(nb) -> list[str]:
    """The arguments of the imports cell's ``answers_must_not_use(...)`` call."""
    imports = next(c for c in nb.cells if c.get("id") == "imports")
    for node in ast.walk(ast.parse(imports.source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "answers_must_not_use":
            return [arg.value for arg in node.args]
    raise AssertionError("the imports cell does not declare the notebook's rule (answers_must_not_use)")


@pytest.mark.parametrize("key", sorted(NB))
def test_each_notebook_declares_the_rule_its_grader_applies(key):
    nb = _nb(key)
    assert _declared(nb) == nb.metadata["peftlab"][oracles.META_KEY]


@pytest.mark.parametrize("key", sorted(NB))
def test_the_rule_is_stated_in_the_text_before_the_exercises(key):
    """Every entry a notebook forbids is named (whole, or its last part) in code font in its introduction."""
    nb = _nb(key)
    intro = nb.cells[0].source
    assert "**Your own work.**" in intro
    missing = [e for e in nb.metadata["peftlab"][oracles.META_KEY]
               if f"`{e}`" not in intro and f"`{e.rsplit('.', 1)[-1]}`" not in intro]
    assert not missing, f"{NB[key].name}: the introduction does not name {missing}"


def _verdicts(nb) -> tuple[dict[str, bool], dict[str, bool]]:
    """Per test cell, whether the notebook's rule and the grader's zero it."""
    use, entries = oracles.find(nb), oracles.forbidden(nb)
    notebook, grader, cells = {}, {}, []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade") and not meta.get("solution"):
            names = rules.observed_names(cell.source)
            notebook[meta["grade_id"]] = rules.violation(names, cells, entries, rules.reference_names()) is not None
            grader[meta["grade_id"]] = use.zeroed(cell.source) is not None
        cells.append(cell.source)
    return notebook, grader


@pytest.mark.parametrize("key", sorted(NB))
def test_honest_solutions_break_no_rule(key):
    notebook, grader = _verdicts(_nb(key))
    assert not any(notebook.values()) and not any(grader.values()), (notebook, grader)


@pytest.mark.parametrize("name", list(CHEATS))
def test_the_visible_rule_agrees_with_the_grader_on_every_cheat(name):
    key, cell, function, body, zeroed = CHEATS[name]
    nb = _nb(key)
    answer = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == cell)
    answer.source = _cheat(key, cell, function, body)
    notebook, grader = _verdicts(nb)
    assert notebook == grader, {k: (notebook[k], grader[k]) for k in notebook if notebook[k] != grader[k]}
    assert all(notebook[test] for test in zeroed), (zeroed, notebook)


def test_the_rule_follows_a_helper_and_ignores_the_instructor_s_imports():
    cells = ["from transformers import LlamaForCausalLM\nanswers_must_not_use('transformers.LlamaForCausalLM')",
             "def helper(c):\n    return LlamaForCausalLM(c)\n", "def count(c):\n    return helper(c).num_parameters()\n",
             "def honest(c):\n    return c.hidden_size * 2\n"]
    entries = [rules.REFERENCE, "transformers.LlamaForCausalLM"]
    assert rules.violation({"count"}, cells, entries) == ("count", "uses helper, which uses LlamaForCausalLM "
                                                          "(transformers.LlamaForCausalLM)")
    assert rules.violation({"honest", "LlamaForCausalLM"}, cells, entries) is None
    assert "scores no points" in rules.message("count", "imports peft")


def test_an_argument_named_like_a_reference_function_is_not_a_call_of_it():
    """07's predict_peak_bytes takes ``load_in_4bit=True``, the name of a reference function: using the
    argument is not calling the reference; a bare global call of it still is."""
    names = frozenset({"load_in_4bit"})
    argument = "def predict(config, load_in_4bit=True):\n    return 4 if load_in_4bit else 2\n"
    assert rules.direct_use(argument, {}, [rules.REFERENCE], set(), names) is None
    call = "def predict(path):\n    return load_in_4bit(path, {})\n"
    assert rules.direct_use(call, {}, [rules.REFERENCE], set(), names) == "calls load_in_4bit of peftlab.reference"


def test_a_test_s_call_is_read_by_its_global_names_not_its_attributes():
    """``spt(ids).loss`` loads the attribute ``loss``: a cell defining a global ``loss`` is not called."""
    def step(ids):
        return [SoftPromptTuning(ids).loss.backward(), [helper(i) for i in ids]]

    assert rules.global_names(step.__code__) == {"SoftPromptTuning", "helper"}
    test = "@observe(ids)\ndef step(ids):\n    return SoftPromptTuning(ids).loss.backward()\n"
    assert rules.observed_names(test) == {"SoftPromptTuning"}


def test_a_forbidden_import_fails_the_visible_test_in_a_real_kernel(tmp_path):
    """In JupyterLab: the test after an answer that imports the forbidden library fails with the rule's
    message; the same test after an honest answer passes."""
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell, new_notebook

    declare = "from peftlab.checks import answers_must_not_use, observe\nanswers_must_not_use('json')\n"
    test = "@observe()\ndef got():\n    return [encode(1)]\n\nassert got == ['1']\n"
    outcomes = {}
    for label, answer in (("cheat", "def encode(x):\n    import json\n    return json.dumps(x)\n"),
                          ("honest", "def encode(x):\n    return str(x)\n")):
        nb = new_notebook(cells=[new_code_cell(declare), new_code_cell(answer), new_code_cell(test)])
        NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
        outcomes[label] = [o for o in nb.cells[2].outputs if o.output_type == "error"]
    assert not outcomes["honest"], outcomes["honest"]
    assert outcomes["cheat"] and outcomes["cheat"][0].ename == "AssertionError"
    assert "encode imports json" in outcomes["cheat"][0].evalue and "scores no points" in outcomes["cheat"][0].evalue

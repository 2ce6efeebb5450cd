"""Points only for the student's own work: an answer that reaches the tests' reference code (or the
library an exercise rebuilds) scores nothing for the tests that call it, and is flagged; honest
answers, and answers that merely mention such names in prose, are untouched."""

from __future__ import annotations

import ast
import sys

import nbformat
import pytest

from notebooks import ROOT, SOLUTIONS, notebooks, run_graded_path, solution_source

sys.path.insert(0, str(ROOT))
from autograder import oracles  # noqa: E402

NB = {p.parent.name[:2]: p for p in notebooks(SOLUTIONS)}


def _nb(key):
    return nbformat.read(NB[key], as_version=4)


def _signature(source: str, name: str) -> str:
    """The ``def`` line(s) of ``name`` in a solution, up to the colon that ends them."""
    start = source.index(f"def {name}(")
    depth, i = 0, start
    while True:
        ch = source[i]
        depth += ch == "("
        depth -= ch == ")"
        if ch == ":" and depth == 0:
            return source[start:i + 1]
        i += 1


# notebook, answer cell, the function replaced, the body that reaches a reference, tests that must score nothing
CHEATS = {
    "reference imported in the function": (
        "04", "lora_counts", "llama_lora_param_count",
        "    from peftlab.reference import peft_lora_count\n    return peft_lora_count(config, r, target_modules)\n",
        ["llama_lora_counts_match_peft"]),
    "reference module as an alias": (
        "01", "llama_param_count", "llama_param_count",
        "    import peftlab.reference as ref\n    return ref.real_param_count(config)\n",
        ["llama_param_count_models", "llama_param_count_gqa"]),
    "bare name a test cell imported": (
        "01", "llama_param_count", "llama_param_count", "    return real_param_count(config)\n",
        ["llama_param_count_models", "llama_param_count_gqa"]),
    "through importlib": (
        "02", "soft_prompt_count", "soft_prompt_param_count",
        "    import importlib\n    return importlib.import_module('peftlab.reference').peft_prompt_count(config, num_virtual_tokens)\n",
        ["soft_prompt_count_values"]),
    "getattr on the package": (
        "03", "prefix_count", "prefix_param_count",
        "    import peftlab\n    return getattr(peftlab, 'reference').peft_prefix_count(config, num_virtual_tokens)\n",
        ["prefix_count_matches_peft"]),
    "the library the exercise rebuilds": (
        "05", "nf4", "quantize_nf4",
        "    import bitsandbytes.functional as F\n"
        "    packed, state = F.quantize_4bit(w.detach().float().reshape(-1), blocksize=blocksize, quant_type='nf4')\n"
        "    flat = packed.reshape(-1)\n"
        "    return torch.stack([flat >> 4, flat & 0xF], 1).reshape(-1)[: w.numel()], state.absmax\n",
        ["nf4_matches_bitsandbytes"]),
    "the lab's prediction": (
        "07", "predict_peak_bytes", "predict_peak_bytes",
        "    from peftlab import reference as ref\n"
        "    return ref.predict_peak_bytes(config, batch_size=batch_size, seq_len=seq_len, r=r, target_modules=target_modules)\n",
        ["predict_weights"]),
    "peft's own LoRA+ optimizer": (
        "08", "loraplus", "loraplus_param_groups",
        "    from peft.optimizers import create_loraplus_optimizer\n"
        "    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio).param_groups\n",
        ["loraplus_matches_peft"]),
}


def _cheat(key, cell, name, body):
    source = solution_source(_nb(key), cell)
    signature = _signature(source, name)
    head, rest = source.split(signature, 1)
    # drop the honest body of ``name``: up to the next top-level definition, or the end of the cell
    following = [i for i in (rest.find("\ndef "), rest.find("\nclass ")) if i >= 0]
    tail = rest[min(following):] if following else "\n"
    return head + signature + "\n" + body + tail


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHEATS))
def test_an_answer_that_reaches_the_reference_scores_nothing(name):
    key, cell, function, body, zeroed = CHEATS[name]
    outcomes = run_graded_path(_nb(key), {cell: _cheat(key, cell, function, body)})
    for grade_id in zeroed:
        assert outcomes[grade_id] is not None and "ReferenceCodeUsed" in str(outcomes[grade_id]), (grade_id, outcomes)


def test_the_libraries_a_notebook_rebuilds_are_left_out_of_its_kernel():
    assert {key: oracles.left_out(_nb(key)) for key in sorted(NB)} == {
        "01": [], "02": ["peft"], "03": ["peft"], "04": ["peft"], "05": ["bitsandbytes"], "06": [], "07": [], "08": []}


@pytest.mark.parametrize("key", sorted(NB))
def test_graded_cells_never_import_a_library_left_out(key):
    """The grader runs every cell but demonstrations with the left-out libraries absent."""
    nb = _nb(key)
    left_out = set(oracles.left_out(nb))
    for cell in nb.cells:
        if cell.cell_type == "code" and "demo" not in cell.metadata.get("tags", []):
            imported = {origin.split(".")[0] for origin in oracles._imports(ast.parse(cell.source)).values()}
            assert not imported & left_out, (cell.metadata.get("nbgrader", {}).get("grade_id"), imported & left_out)


@pytest.mark.parametrize("key", sorted(NB))
def test_honest_solutions_are_not_flagged(key):
    use = oracles.find(_nb(key))
    assert not use.cells and not use.names, use


def test_mentions_in_prose_and_the_student_s_own_names_do_not_count():
    """Docstrings, comments and a dict key named like a hardware helper are not uses; a helper cell of
    the student's own that imports the reference taints the answer that calls it."""
    nb = _nb("07")
    entries = oracles.forbidden(nb)
    assert oracles.direct_use('def f():\n    """Like peftlab.reference does."""\n    # reference\n    return {"precision": 1}\n',
                              {}, entries, {"f"}) is None
    assert oracles.direct_use("def predict_peak_bytes(c):\n    return predict_peak_bytes\n", {}, entries,
                              {"predict_peak_bytes"}) is None
    assert oracles.direct_use("def f(device):\n    return hardware.precision(device)\n",
                              {"hardware": "peftlab.hardware"}, entries, {"f"})
    assert oracles.direct_use("def f(config):\n    return lab.predict_for(config, {})\n",
                              {"lab": "peftlab.lab"}, entries, {"f"})
    # patching a library is tampering (flagged elsewhere), not using it for an answer
    assert oracles.direct_use("lab.predict_for = None\n", {"lab": "peftlab.lab"}, entries, set()) is None

    helper = nbformat.v4.new_code_cell("from peftlab.reference import predict_peak_bytes as _p\n\ndef helper(*a, **k):\n"
                                       "    return _p(*a, **k)\n", metadata={"tags": ["student-added"]})
    for i, cell in enumerate(nb.cells):
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade_id") == "predict_peak_bytes" and \
                cell["metadata"]["nbgrader"].get("solution"):
            cell.source = cell.source.replace("### BEGIN SOLUTION", "### BEGIN SOLUTION\n    return helper(config)", 1)
            nb.cells.insert(i, helper)
            break
    use = oracles.find(nb)
    assert "helper" in use.names and "predict_peak_bytes" in use.names, use
    hit = use.zeroed("@observe()\ndef got():\n    return predict_peak_bytes(family_config('x'), batch_size=1)\n")
    assert hit and hit[0] == "predict_peak_bytes", hit


def test_the_reference_leaves_the_namespace_after_each_cell(capsys):
    """In a notebook, a test cell's import of the reference is gone once the cell has run, so an
    answer cannot call it; the release-notebook test's probe would see it otherwise."""
    from IPython.core.interactiveshell import InteractiveShell

    from test_notebooks import REACHABLE_PROBE

    shell = InteractiveShell.instance()
    try:
        # as in a fresh kernel: the checks module is first imported with the shell running (this test
        # process may have imported it before any shell existed)
        shell.run_cell("import importlib, peftlab, peftlab.checks\nimportlib.reload(peftlab.checks)")
        shell.run_cell("from peftlab.reference import peft_lora_count\nfrom peftlab import reference\nfound = callable(peft_lora_count)")
        assert shell.user_ns["found"] is True  # usable inside the cell that imported it
        assert "peft_lora_count" not in shell.user_ns and "reference" not in shell.user_ns
        shell.run_cell(REACHABLE_PROBE)
        assert 'REACHABLE []' in capsys.readouterr().out
        # the probe itself finds what the hook would have removed
        shell.run_cell("from peftlab import reference\nagain = reference.bnb_nf4 is not None")  # a later test cell
        assert shell.user_ns["again"] is True and "reference" not in shell.user_ns
        namespace = {"peftlab": sys.modules["peftlab"], "answer": sys.modules["peftlab.reference"].bnb_nf4}
        exec(REACHABLE_PROBE, namespace)
        assert 'REACHABLE ["answer"]' in capsys.readouterr().out
    finally:
        InteractiveShell.clear_instance()

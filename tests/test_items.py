"""The item analysis an instructor gets after a grading run (`autograder.items`), on a class of mixed
submissions: pass shares, discrimination, grouped failure messages, flags, histograms, and never a
hidden test's text."""

from __future__ import annotations

import copy
import json
import sys

import nbformat

from notebooks import ROOT, SOLUTIONS, graded_test_cells, hidden_test_lines

sys.path.insert(0, str(ROOT))
from autograder import items  # noqa: E402
from autograder.execute import _error_output  # noqa: E402

SOURCE = nbformat.read(SOLUTIONS / "01_memory_math" / "01_memory_math.ipynb", as_version=4)
TESTS = list(graded_test_cells(SOURCE))


def executed(failures: dict[str, str]) -> dict:
    """The source notebook as the grader leaves it: each test passed, or failed with a message."""
    nb = copy.deepcopy(SOURCE)
    for cell in nb.cells:
        grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        if grade_id in TESTS:
            if grade_id in failures:
                ename, evalue = failures[grade_id].split(": ", 1)
                cell.outputs = [_error_output(ename, evalue)]
            else:
                cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="passed\n")]
    return nb


def a_class():
    """12 students: everyone passes TESTS[0], no one TESTS[1] (messages differing only in numbers),
    the stronger half TESTS[2] (the others fail its hidden part or quote markup), the rest vary."""
    points = items.test_points(SOURCE)
    rows = []
    for k in range(12):
        failures = {TESTS[1]: f"AssertionError: counted {1000 + k:,} parameters, the real model has 134,515,008"}
        if k < 6:
            failures[TESTS[2]] = ("HiddenTestFailed: a hidden test failed" if k % 2 else
                                  "AssertionError: got '<script>alert(1)</script>'")
        for j, grade_id in enumerate(TESTS[3:]):
            if (k + j) % 3 == 0:
                failures[grade_id] = "ValueError: raised by your code"
        score = sum(v for gid, v in points.items() if gid not in failures)
        rows.append(("01_memory_math", f"student{k}", score, sum(points.values()), items.verdicts(executed(failures))))
    return rows, points


def test_a_mixed_class_is_analysed(tmp_path):
    rows, points = a_class()
    report = items.analyse(rows, {"01_memory_math": points})["01_memory_math"]
    by_test = {item["test"]: item for item in report["items"]}
    assert [i["test"] for i in report["items"]] == TESTS and report["students"] == 12
    everyone, no_one, half = by_test[TESTS[0]], by_test[TESTS[1]], by_test[TESTS[2]]
    assert everyone["pass_share"] == 1 and "almost everyone passes" in everyone["flag"]
    assert no_one["pass_share"] == 0 and "almost no one passes" in no_one["flag"]
    assert no_one["messages"] == [{"message": "AssertionError: counted # parameters, the real model has #", "count": 12}]
    assert half["pass_share"] == 0.5 and half["flag"] == "" and half["hidden_failures"] == 3
    assert half["discrimination"] > 0.5, "the students who pass it are the stronger ones"
    assert report["mean"] == sum(r[2] for r in rows) / 12

    page = items.write(tmp_path, {"01_memory_math": report}).read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page, "messages quoting a student's output are escaped"
    for line in hidden_test_lines(SOURCE):
        if len(line) > 20:
            assert line not in page, f"hidden test text in the report: {line}"
    png = (tmp_path / "items-01_memory_math.png").read_bytes()
    assert png.startswith(b"\x89PNG") and "data:image/png;base64," in page
    assert json.loads((tmp_path / "items.json").read_text())["01_memory_math"]["students"] == 12


def test_a_small_class_is_not_flagged():
    rows, points = a_class()
    report = items.analyse(rows[:4], {"01_memory_math": points})["01_memory_math"]
    assert all(item["flag"] == "" for item in report["items"])


def test_messages_group_by_numbers_not_by_digits_inside_names():
    """``q1_answer`` is a name and stays one; the numbers around it become ``#``."""
    assert items._pattern("AssertionError: q1_answer should be 1,234, got 12.5e-3") == \
        "AssertionError: q1_answer should be #, got #"
    assert items._pattern("dtype float32, not bfloat16: lora_B2 has shape (4, 64)") == \
        "dtype float32, not bfloat16: lora_B2 has shape (#, #)"
    assert items._pattern("expected -0.5, got +3") == "expected #, got #"

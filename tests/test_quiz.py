"""The quizzes' self-check (`peftlab.quiz`) tells a learner "correct" exactly when the grader's hidden
test would give the point, without the answers in the release."""

from __future__ import annotations

import json
import re
import tomllib
from collections import Counter

import nbformat
import pytest

from notebooks import COURSE, ROOT, SOLUTIONS
from peftlab import quiz

KEY = tomllib.loads((SOLUTIONS / "quiz.toml").read_text())
QUESTIONS = [(name, int(n)) for name, questions in KEY.items() for n in questions]


def _cells(root, name):
    return nbformat.read(root / name / f"{name}.ipynb", as_version=4).cells


def _test_cell(name: str, n: int) -> str:
    return next(c.source for c in _cells(SOLUTIONS, name)
                if c.metadata.get("nbgrader", {}).get("grade_id") == f"quiz_q{n}")


def _verdicts(source: str, n: int, candidate) -> tuple[bool, bool]:
    """(the learner's visible test passes, the grader's whole test passes) for ``candidate``, the
    ``@observe`` call replaced by its plain result, as the judge sees it."""
    visible, hidden = source.split("### BEGIN HIDDEN TESTS")
    namespace = {"observe": lambda *a: (lambda f: f()), "check_answer": quiz.check_answer,
                 f"q{n}_answer": candidate}
    try:
        exec(visible, namespace)
    except AssertionError:
        return False, False
    try:
        exec(hidden, namespace)
    except AssertionError:
        return True, False
    return True, True


def _candidates(kind: str, answer):
    if kind == "letter":
        return ["a", "b", "c", "d", "A", "e", "", "ab", 1, None]
    near = [answer * f for f in (1, 1.0004, 0.9996, 1.003, 0.997, 1.006, 0.994, 1.01, 0.99, 10, 0.1, 1 / 1.073741824)]
    return [*near, answer + 1, answer - 1, int(answer), round(answer, 1), str(answer), True, float("nan"), -answer]


def test_the_release_holds_the_current_keys():
    from autograder.release import QUIZ_KEYS, quiz_keys

    assert QUIZ_KEYS.read_text() == quiz_keys(), "run `python autograder/release.py` after editing solutions/quiz.toml"


def test_no_answer_in_the_release():
    released = json.loads(quiz.KEYS.read_text())
    for name, n in QUESTIONS:
        record = released[name][str(n)]
        assert set(record) == {"kind", "salt", "digest", "hint", "explanation"}
        plain = KEY[name][str(n)]["explanation"]
        assert plain.encode().hex() != record["explanation"] and plain[:20] not in json.dumps(released)


@pytest.mark.parametrize("name,n", QUESTIONS, ids=[f"{a}-q{n}" for a, n in QUESTIONS])
def test_the_self_check_agrees_with_the_hidden_test(name, n):
    key = KEY[name][str(n)]
    source = _test_cell(name, n)
    assert f'right, feedback = check_answer("{name}", {n}, answer)\nassert right, feedback\n' in source
    assert _verdicts(source, n, key["answer"]) == (True, True), "the key's answer passes"
    wrong = 0
    for candidate in _candidates(key["kind"], key["answer"]):
        visible, graded = _verdicts(source, n, candidate)
        assert visible == graded, f"{candidate!r}: the self-check says {visible}, the grader {graded}"
        wrong += not graded
    assert wrong >= 4, "most candidates are wrong answers"


@pytest.mark.parametrize("name,n", QUESTIONS, ids=[f"{a}-q{n}" for a, n in QUESTIONS])
def test_the_explanation_comes_only_with_the_right_answer(name, n):
    key = KEY[name][str(n)]
    assert quiz.check_answer(name, n, key["answer"]) == (True, f"Q{n}: correct. {key['explanation']}")
    wrong = "a" if key["answer"] != "a" else "b"
    if key["kind"] != "letter":
        wrong = key["answer"] * 1.1
    assert quiz.explanation(name, n, wrong) is None
    right, feedback = quiz.check_answer(name, n, wrong)
    assert not right and re.fullmatch(rf"Q{n}: not yet.*Hint: {re.escape(key['hint'])}", feedback), feedback


def test_every_quiz_question_has_a_key_and_the_text_states_the_rule():
    for name in sorted(p.name for p in COURSE.iterdir() if p.is_dir()):
        cells = _cells(COURSE, name)
        tests = {int(g[len("quiz_q"):]) for c in cells
                 if (g := c.metadata.get("nbgrader", {}).get("grade_id", "")).startswith("quiz_q")}
        assert tests == {int(n) for n in KEY[name]}, name
        text = next(c.source for c in cells if c.cell_type == "markdown" and "**Q1** (`q1_answer`)" in c.source)
        assert "**correct**" in text and "**not yet**" in text, f"{name}: the quiz says how it answers"
        kinds = {q["kind"] for q in KEY[name].values()}
        if "number" in kinds:
            assert "three significant figures" in text, name
        if "count" in kinds:
            assert "a count must be exact" in text, name
        for n, q in KEY[name].items():
            question = text.split(f"**Q{n}**")[1].split("**Q")[0]
            if q["kind"] == "count":
                assert "(a count" in question or "(an integer" in question, f"{name} Q{n} says it is a count"


def test_the_right_letters_are_spread():
    letters = Counter(q["answer"] for questions in KEY.values() for q in questions.values() if q["kind"] == "letter")
    assert max(letters.values()) <= 4 and len(letters) == 4, letters

"""The course task generator: seeded, disjoint splits, correct targets, exact-match metric."""

import datetime as dt
import re

import pytest

from peftlab import task


def test_splits_are_deterministic_and_seeded():
    assert task.make_splits(50, 20, seed=3) == task.make_splits(50, 20, seed=3)
    assert task.make_splits(50, 20, seed=3) != task.make_splits(50, 20, seed=4)


def test_train_and_test_share_no_calendar_day():
    train, test = task.make_splits(2000, 500)
    assert len(train) == 2000 and len(test) == 500
    assert not {e.date for e in train} & {e.date for e in test}
    assert len({e.date for e in train}) == 2000, "no day repeats inside a split"


def test_test_split_does_not_depend_on_the_training_size():
    assert task.make_splits(10, 64)[1] == task.make_splits(1000, 64)[1]


def test_every_wording_is_used_and_reads_back_as_its_target():
    train, _ = task.make_splits(700, 0)
    assert {e.style for e in train} == set(task.FORMATS)
    months = {m: i for i, m in enumerate(["January", "February", "March", "April", "May", "June", "July",
                                          "August", "September", "October", "November", "December"], 1)}
    for e in train:
        # An independent reading of the text: find the month name, the day and the 4-digit year.
        month = next(i for name, i in months.items() if name[:3] in e.text)
        year = int(re.search(r"\b(\d{4})\b", e.text).group(1))
        day = int(re.search(r"\b(\d{1,2})(?:st|nd|rd|th)?\b(?!\d)", e.text.replace(str(year), "")).group(1))
        assert dt.date(year, month, day).isoformat() == e.target, e.text
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", e.target)


def test_prompt_and_completion():
    example = task.make_splits(1, 0)[0][0]
    assert example.prompt.startswith(task.INSTRUCTION) and example.prompt.endswith("ISO:")
    assert example.text in example.prompt
    assert example.completion == f" {example.target}\n"


def test_exact_match_reads_the_first_line_only():
    assert task.exact_match([" 2021-03-05\nmore text", "2021-03-06"], ["2021-03-05", "2021-03-05"]) == 0.5
    assert task.exact_match(["", "  2000-01-01  "], ["2000-01-01", "2000-01-01"]) == 0.5
    assert task.extract_answer("\n\n 1999-12-31\nx") == "1999-12-31"
    with pytest.raises(ValueError):
        task.exact_match(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        task.exact_match([], [])


def test_bad_split_sizes_are_rejected():
    with pytest.raises(ValueError):
        task.make_splits(-1, 10)
    with pytest.raises(ValueError):
        task.make_splits(40_000, 10)


def test_base_model_accuracy_is_low(smollm2):
    """The task leaves room to learn: the pretrained model gets only a minority right."""
    model, tokenizer, _ = smollm2
    _, test = task.make_splits(0, 32)
    accuracy = task.evaluate(model, tokenizer, test)
    print(f"SmolLM2-135M-Instruct base exact match on 32 test dates: {accuracy:.0%}")
    assert accuracy < 0.5

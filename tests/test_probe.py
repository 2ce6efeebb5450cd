"""Plain data between the student's kernel and the judge (`peftlab.probe`), and the judge itself
(`autograder.judge`): exact types, strict decoding of whatever a kernel sends, hidden parts last."""

from __future__ import annotations

import json
import math
import sys
from collections import OrderedDict

import pytest
import torch

from notebooks import ROOT

sys.path.insert(0, str(ROOT))
from autograder.judge import Judge, LocalKernel, split_test  # noqa: E402
from peftlab import probe  # noqa: E402
from peftlab.checks import assert_close, expect_error, observe, raised  # noqa: E402


def round_trip(value):
    return probe.loads(probe.dumps(value))


def test_plain_values_keep_their_exact_types():
    value = {"int": 3, "float": 2.5, "bool": True, "none": None, "str": "x", "list": [1, (2, 3)], 4: "int key",
             "nan": float("nan"), "inf": float("-inf"), "big": 10**40}
    back = round_trip(value)
    assert type(back["int"]) is int and type(back["float"]) is float and back["bool"] is True
    assert back["list"] == [1, (2, 3)] and type(back["list"][1]) is tuple and back[4] == "int key"
    assert math.isnan(back["nan"]) and back["inf"] == float("-inf") and back["big"] == 10**40


def test_tensors_come_back_bit_for_bit_with_their_flags():
    values = [torch.randn(3, 4), torch.randn(5, dtype=torch.bfloat16), torch.tensor([True, False]),
              torch.arange(6, dtype=torch.uint8).reshape(2, 3), torch.empty(0, 7), torch.tensor(3.5),
              torch.randn(4, 4)[:, ::2]]  # not contiguous
    for t in values:
        back = round_trip(t)
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t), t
    p = torch.nn.Parameter(torch.ones(2))
    assert isinstance(round_trip(p), torch.nn.Parameter) and round_trip(p).requires_grad
    frozen = round_trip(torch.nn.Parameter(torch.ones(2), requires_grad=False))
    assert isinstance(frozen, torch.nn.Parameter) and not frozen.requires_grad
    assert round_trip(torch.float16) is torch.float16 and round_trip(torch.Size([2, 3])) == (2, 3)
    assert round_trip(OrderedDict(a=torch.zeros(1)))["a"].shape == (1,)


def test_values_that_pose_as_plain_data_arrive_unreadable():
    class Count(int):
        def __eq__(self, other):
            return True

    class Letter(str):
        def __eq__(self, other):
            return True

    class Agreeable(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return True

    for value, why in [(Count(3), "a subclass of int"), (Letter("b"), "a subclass of str"),
                       (torch.zeros(2).as_subclass(Agreeable), "a subclass of Tensor"), (torch.nn.Linear(2, 2), "")]:
        back = round_trip(value)
        assert isinstance(back, probe.Unreadable) and back.why == why, (value, back)
        assert back != 3 and back != "b" and not back and back not in {"a", "b"}
        with pytest.raises(AssertionError):
            assert_close(back, 3.0)
    assert isinstance(round_trip(torch.empty(2, device="meta")), probe.Unreadable)


@pytest.mark.parametrize("report", [
    "", "not json", "[" * 100_000 + "]" * 100_000, '{"$": "tensor"}', '{"$": "unknown"}',
    '{"$": "tensor", "dtype": "float32", "shape": [4], "data": "AAAA", "grad": false, "param": false}',
    '{"$": "tensor", "dtype": "evil", "shape": [1], "data": "", "grad": false, "param": false}',
    '{"$": "tensor", "dtype": "int64", "shape": [1], "data": "AAAAAAAAAAA=", "grad": true, "param": false}',
    '{"$": "tensor", "dtype": "float32", "shape": [-1], "data": "", "grad": false, "param": false}',
    '{"$": "tensor", "dtype": "float32", "shape": [100000, 100000], "data": "", "grad": false, "param": false}',
    '{"$": "dict", "v": [[[1], 2]]}', '{"$": "dict", "v": [1]}', '{"$": "float", "v": "1e309"}', '{"plain": 1}',
    "1" * 5000,
])
def test_malformed_reports_raise_report_error(report):
    with pytest.raises(probe.ReportError):
        probe.loads(report)


@pytest.mark.parametrize("report", ["null", "{}", '{"ok": "yes"}', '{"ok": true}', '{"ok": false, "error": 3}',
                                    json.dumps({"ok": False, "error": {"type": 1}})])
def test_malformed_kernel_reports_are_report_errors(report):
    with pytest.raises(probe.ReportError):
        probe.read_report(report)


def test_kernel_errors_carry_the_students_exception():
    with pytest.raises(probe.KernelError) as caught:
        probe.read_report(json.dumps({"ok": False, "error": {"type": "NotImplementedError", "message": ""}}))
    assert caught.value.ename == "NotImplementedError"


def test_observe_in_a_notebook_converts_and_keeps_the_tests_random_state():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)

    @observe(torch.ones(2), [1, 2])
    def got(x, items):
        return {"sum": float(x.sum()), "items": items, "draw": torch.rand(1)}

    assert got["sum"] == 2.0 and got["items"] == [1, 2]
    assert torch.equal(torch.rand(3), expected), "an observation must not consume the test's random numbers"

    @observe()
    def again():
        return torch.rand(1)

    assert torch.equal(again, got["draw"]), "every observation starts from the same seed"


def test_raised_and_expect_error():
    def bad(n):
        if n < 0:
            raise ValueError("negative")
        return n

    expect_error(ValueError, raised(bad, -1))
    with pytest.raises(AssertionError, match="returned 1 without raising ValueError"):
        expect_error(ValueError, raised(bad, 1))
    with pytest.raises(AssertionError, match="raised ValueError"):
        expect_error(KeyError, raised(bad, -1))
    with pytest.raises(NotImplementedError):
        raised(lambda: (_ for _ in ()).throw(NotImplementedError()))


TEST = '''"""a test"""
@observe(3)
def got(n):
    return double(n)

assert got == 6, "double(3) is 6"
### BEGIN HIDDEN TESTS
@observe(-2)
def more(n):
    return double(n)

assert more == -4, "the expected answer, never shown"
### END HIDDEN TESTS
'''


def judged(student_code: str):
    kernel = LocalKernel()
    kernel.run("from peftlab.checks import observe\n" + student_code)
    sent = []

    def send(source, name, arguments, token):
        sent.append((judge.phase, name))
        return kernel.send(source, name, arguments, token)

    judge = Judge(send, {"double"})
    judge.locked("from peftlab.checks import observe, assert_close")
    visible = judge.test("double_values", TEST)
    return visible, judge.finish()["double_values"], sent


def test_the_judge_runs_hidden_parts_last_and_says_nothing_about_them():
    visible, final, sent = judged("def double(n):\n    return 2 * n if n > 0 else 0\n")
    assert visible.passed and not final.passed and final.hidden
    assert (final.ename, final.evalue) == ("HiddenTestFailed", "a hidden test failed")
    assert sent == [("visible", probe.CHECK), ("hidden", probe.CHECK)]  # the kernel never learns a test's names
    visible, final, _ = judged("def double(n):\n    return 2 * n\n")
    assert visible.passed and final.passed


def test_a_failing_visible_part_keeps_its_hidden_part_from_the_kernel():
    visible, final, sent = judged("def double(n):\n    raise NotImplementedError()\n")
    assert not visible.passed and visible.ename == "NotImplementedError"
    assert [name for _, name in sent] == [probe.CHECK]


def test_split_keeps_line_numbers():
    visible, hidden = split_test(TEST)
    assert "BEGIN HIDDEN" not in visible and hidden.splitlines()[TEST.splitlines().index("### BEGIN HIDDEN TESTS")].startswith("###")
    assert split_test("assert True\n") == ("assert True\n", None)


# -- the boundary between the student's kernel and the judge ------------------------------------------


def _report(value, token="t0"):
    return json.dumps({"ok": True, "value": value, "token": token})


def test_a_report_counts_only_with_the_token_of_its_call():
    assert probe.read_report(_report(3, "abc"), "abc") == 3
    for token in ("abd", "", None, 3):
        with pytest.raises(probe.ReportError, match="token"):
            probe.read_report(json.dumps({"ok": True, "value": 3, "token": token}), "abc")
    with pytest.raises(probe.ReportError, match="token"):
        probe.read_report(json.dumps({"ok": True, "value": 3}), "abc")


def test_keys_that_collide_are_refused_fast_and_ordinary_keys_are_kept():
    import time

    prime = 2**61 - 1
    colliding = {"$": "dict", "v": [[k * prime, 0] for k in range(1, 150_001)]}  # all hash to 0
    start = time.monotonic()
    with pytest.raises(probe.ReportError, match="kind|keys"):
        probe.read_report(_report(colliding), "t0")
    floats = {"$": "dict", "v": [[{"$": "float", "v": "inf"}, 1]] + [[k + 0.5, 0] for k in range(1000)]}
    with pytest.raises(probe.ReportError, match="keys"):
        probe.read_report(_report(floats), "t0")
    assert time.monotonic() - start < 2
    ok = {"$": "dict", "v": [["a", 1], [2, 3], [None, 4], [True, 5], [{"$": "tuple", "v": ["cpu", 0]}, 6], [0.5, 7]]}
    assert probe.read_report(_report(ok), "t0") == {"a": 1, 2: 3, None: 4, True: 5, ("cpu", 0): 6, 0.5: 7}


def test_reading_a_report_is_bounded_in_items_and_time():
    with pytest.raises(probe.ReportError, match="too many items"):
        probe.read_report(_report([0] * (probe.MAX_ITEMS + 100)), "t0")
    with pytest.raises(probe.ReportError, match="too long"):
        probe.read_report(_report([[0] * 10] * 50_000), "t0", seconds=0)


def test_a_huge_int_is_reported_as_not_plain_data_instead_of_losing_the_report():
    namespace = {"big": lambda: 10**5000}
    report = probe.call_report("def got():\n    return big()\n", "got", probe.dumps(((), {})), namespace, token="k")
    value = probe.read_report(report, "k")
    assert isinstance(value, probe.Unreadable) and "digits" in value.why


def test_helpers_and_checks_ignore_the_notebooks_builtins():
    """A notebook that shadows builtins (vars, isinstance, len, ...) blinds neither the helpers nor the checks."""
    namespace = {"vars": lambda obj: {}, "isinstance": lambda *a: False, "len": lambda x: 0,
                 "hasattr": lambda *a: False, "layer": torch.nn.Linear(8, 8)}
    namespace["layer"].copy = torch.ones(8, 8)
    source = probe.trampolined("def found():\n    return [path for path, _ in float_tensors(layer)] + [len([1, 2])]\n")
    report = probe.call_report(source, probe.CHECK, probe.dumps(((), {})), namespace, probe.HELPERS, "k")
    assert probe.read_report(report, "k") == ["_parameters.weight", "_parameters.bias", "copy", 2]


def test_every_call_sees_the_same_frames_above_it():
    """Whether a test checks a value or an error, and whichever test it is, the student's code sees the
    same stack: the trampoline's thread, nothing of the test."""
    kernel = LocalKernel()
    kernel.run('''
import inspect
stacks = []
def f(x):
    frame, names = inspect.currentframe().f_back, []
    while frame is not None:
        names.append((frame.f_code.co_name, frame.f_code.co_filename))
        frame = frame.f_back
    stacks.append(names)
    return x
''')
    for source in ("def a():\n    return f(1)\n", "def b():\n    return [raised(f, 2), [f(y) for y in (3,)]]\n",
                   "def c():\n    return raised(lambda: f(4))\n"):
        report = kernel.send(probe.trampolined(source), probe.CHECK, probe.dumps(((), {})), "k")
        probe.read_report(report, "k")
    stacks = kernel.namespace["stacks"]
    assert len(stacks) == 4 and all(stack == stacks[0] for stack in stacks), stacks
    assert not any("check" in name or "raised" in name or "comp" in name for name, _ in stacks[0])


def test_the_trampoline_carries_the_callers_torch_state():
    kernel = LocalKernel()
    kernel.run("import torch\ndef state(x):\n    return [torch.is_grad_enabled(), (x * 2).requires_grad]\n")
    source = probe.trampolined('''
def got():
    saved = []
    x = torch.ones(2, requires_grad=True)
    with torch.no_grad():
        first = state(x)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        y = state(x)
        (x * x).sum()
    return [first, y, len(saved) > 0]
''')
    report = kernel.send(source, probe.CHECK, probe.dumps(((), {})), "k")
    assert probe.read_report(report, "k") == [[False, False], [True, True], True]


def test_the_judges_own_time_on_a_test_is_limited():
    kernel = LocalKernel()
    kernel.run("def double(n):\n    return 2 * n\n")
    judge = Judge(kernel.send, {"double"})
    judge.clock.seconds = 0.5
    judge.locked("from peftlab.checks import observe")
    verdict = judge.test("slow", "@observe(2)\ndef got(n):\n    return double(n)\nwhile True:\n    pass\n")
    assert not verdict.passed and verdict.ename == "JudgeTimeout"
    assert any("ran past" in flag for flag in judge.flags)
    assert judge.test("quick", "@observe(2)\ndef got(n):\n    return double(n)\nassert got == 4\n").passed


def test_encoding_stops_walking_at_the_item_limit():
    """A huge answer costs the kernel no more than the limit, and arrives as one short, readable report."""
    import time

    huge = [[] for _ in range(1_000_000)]
    start = time.monotonic()
    encoded = probe.encode(huge)
    assert time.monotonic() - start < 1 and len(encoded) == probe.MAX_ITEMS + 1
    back = probe.decode(encoded)
    assert isinstance(back[-1], probe.Unreadable) and back[:3] == [[], [], []]


def test_the_trampoline_uses_the_callers_thread_count():
    """An operation's result depends on how many threads compute it (to the last bit): a call made on
    the trampoline's thread uses the caller's count, as the judge's reference does."""
    import threading

    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    before = torch.get_num_threads()
    wanted = 1 if seen[0] > 1 else 2  # not what a new thread starts with
    torch.set_num_threads(wanted)
    try:
        kernel = LocalKernel()
        kernel.run("import torch\ndef count():\n    return torch.get_num_threads()\n")
        report = kernel.send(probe.trampolined("def got():\n    return count()\n"), probe.CHECK, probe.dumps(((), {})), "k")
        assert probe.read_report(report, "k") == wanted
    finally:
        torch.set_num_threads(before)

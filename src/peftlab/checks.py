"""Assertion helpers for the notebooks' test cells, so their failure messages tell a student what to fix
rather than print a bare traceback.

`assert_close` and `expect_error` check values an ``@observe`` function returned (see
`peftlab.probe`); `raised` and `float_tensors` are for use inside one (the grader sends its own copy of
them with every observation).
"""

from __future__ import annotations

import math

from peftlab.probe import Unreadable, float_tensors, observe, raised  # noqa: F401 - the test cells' imports


def expect_error(error: type[BaseException], outcome, hint: str = "") -> None:
    """Assert that a call described by `peftlab.probe.raised` raised ``error`` (or a subclass of it);
    ``hint`` says why it should."""
    if not isinstance(outcome, dict) or not isinstance(outcome.get("kinds"), list):
        raise AssertionError(f"expected the outcome of a call (from raised(...)), got {outcome!r}")
    call = outcome.get("call", "the call")
    if error.__name__ in outcome["kinds"]:
        return
    if outcome.get("raised"):
        raise AssertionError(f"{call} raised {outcome['raised']}: {outcome.get('message', '')}; expected "
                             f"{error.__name__}. {hint}".strip())
    raise AssertionError(f"{call} returned {outcome.get('returned', '')} without raising {error.__name__}. "
                         f"{hint}".strip())


def assert_close(actual, expected, rel: float = 1e-9, abs_tol: float = 0.0, what: str = "value") -> None:
    """Assert two numbers agree within a relative tolerance, naming ``what`` in the message."""
    if type(actual) not in (int, float):
        raise AssertionError(f"{what} should be a number (int or float), got {type(actual).__name__}: {actual!r}")
    if not math.isclose(actual, expected, rel_tol=rel, abs_tol=abs_tol):
        raise AssertionError(f"{what} should be {expected:,.6g}, got {actual:,.6g}")


__all__ = ["Unreadable", "assert_close", "expect_error", "float_tensors", "observe", "raised"]

"""Assertion helpers for the notebooks' test cells, so their failure messages tell a student what to fix
rather than print a bare traceback.

`assert_close` and `expect_error` check values an ``@observe`` function returned (see
`peftlab.probe`); `raised` and `float_tensors` are for use inside one (the grader sends its own copy of
them with every observation).

Importing this module in a notebook also keeps the tests' reference code (`peftlab.reference`) out of
the notebook's namespace: after every cell, the names a test cell imported from it are removed again,
so that no answer can call them (see `forget_reference`).
"""

from __future__ import annotations

import math
import sys

from peftlab.probe import Unreadable, float_tensors, observe, raised  # noqa: F401 - the test cells' imports
from peftlab.rules import answers_must_not_use  # noqa: F401 - the imports cell declares the notebook's rule
from peftlab.quiz import check_answer  # noqa: F401 - the quiz tests give instant feedback


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


def forget_reference(*_) -> list[str]:
    """Take the tests' reference code out of the notebook's namespace: every global bound to
    `peftlab.reference` or to one of its functions, and the package's ``reference`` attribute (the
    module stays loaded, so a test cell's next import costs nothing). Runs after every cell; returns
    the names removed."""
    module = sys.modules.get("peftlab.reference")
    shell = _shell()
    if module is None or shell is None:
        return []
    oracles = {id(module)} | {id(value) for value in vars(module).values()
                               if getattr(value, "__module__", None) == module.__name__}
    removed = [name for name, value in list(shell.user_ns.items()) if id(value) in oracles]
    for name in removed:
        del shell.user_ns[name]
    package = sys.modules.get("peftlab")
    if package is not None and vars(package).get("reference") is module:
        delattr(package, "reference")
    return removed


def _shell():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _watch() -> None:
    shell = _shell()
    if shell is not None and forget_reference not in shell.events.callbacks.get("post_run_cell", []):
        shell.events.register("post_run_cell", forget_reference)


_watch()

__all__ = ["Unreadable", "assert_close", "expect_error", "float_tensors", "forget_reference", "observe", "raised"]

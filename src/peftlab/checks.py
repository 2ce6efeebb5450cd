"""Small assertion helpers for the notebooks' test cells, so their failure messages tell a student
what to fix rather than print a bare traceback."""

from __future__ import annotations

import math


def expect_error(error: type[BaseException], func, *args, hint: str = "", **kwargs) -> None:
    """Assert that ``func(*args, **kwargs)`` raises ``error``; ``hint`` says why it should."""
    call = f"{getattr(func, '__name__', func)}({', '.join([*map(repr, args), *(f'{k}={v!r}' for k, v in kwargs.items())])})"
    try:
        func(*args, **kwargs)
    except error:
        return
    except NotImplementedError:
        raise
    except Exception as exc:  # a different error is a wrong answer, not a crash of the test
        raise AssertionError(f"{call} raised {type(exc).__name__}: {exc}; expected "
                             f"{error.__name__}. {hint}".strip()) from exc
    raise AssertionError(f"{call} returned without raising {error.__name__}. {hint}".strip())


def assert_close(actual, expected, rel: float = 1e-9, abs_tol: float = 0.0, what: str = "value") -> None:
    """Assert two numbers agree within a relative tolerance, naming ``what`` in the message."""
    if not isinstance(actual, (int, float)) or isinstance(actual, bool):
        raise AssertionError(f"{what} should be a number, got {type(actual).__name__}: {actual!r}")
    if not math.isclose(actual, expected, rel_tol=rel, abs_tol=abs_tol):
        raise AssertionError(f"{what} should be {expected:,.6g}, got {actual:,.6g}")

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


def float_tensors(obj, min_numel: int = 1) -> list[tuple[str, "object"]]:
    """Every floating-point tensor with at least ``min_numel`` elements reachable from ``obj`` (a module's
    parameters, buffers and plain attributes, and inside objects, lists and dicts it holds), as
    ``(path, tensor)`` pairs: to check that a module keeps no float copy of something."""
    import torch

    found, seen = [], set()

    def walk(value, path, depth):
        if id(value) in seen or depth > 6:
            return
        seen.add(id(value))
        if torch.is_tensor(value):
            if value.is_floating_point() and value.numel() >= min_numel:
                found.append((path, value))
            return
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, (list, tuple, set)):
            items = enumerate(value)
        elif hasattr(value, "__dict__") and not isinstance(value, type) and not callable(value) or \
                isinstance(value, torch.nn.Module):
            items = vars(value).items()
        else:
            return
        for key, item in items:
            walk(item, f"{path}.{key}" if path else str(key), depth + 1)

    walk(obj, "", 0)
    return found

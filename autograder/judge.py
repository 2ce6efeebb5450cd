"""Decide test verdicts outside the student's kernel.

A test cell (see `peftlab.probe`) calls the student's code only inside ``@observe`` functions. The
judge runs everything else of the cell, the assertions and the reference computations with `peft`,
`transformers` and `bitsandbytes`, in the grader's own process; each ``@observe`` function's source is
sent to the kernel, which runs it and reports the returned value as plain data. So a verdict is made
from data, by code the submission cannot reach: replacing builtins, helpers, IPython hooks or the
libraries in the kernel changes only what the kernel reports, never how it is judged.

Order, and what the kernel ever sees:

- the visible part of each test runs at its place in the notebook, after the cells before it;
- every hidden part (from ``### BEGIN HIDDEN TESTS`` to the end of the cell) is held back until the
  whole notebook has run, so a hidden test's calls reach the kernel only after the last cell whose
  outputs the student will see; what the kernel prints then is discarded;
- a failing hidden part is reported as "a hidden test failed", nothing more.

The judge's namespace starts with the notebook's locked code cells that do not use the student's
names (imports, helper definitions), run here from the instructor's source; each hidden part runs in
a copy of the namespace as its own cell's visible part left it.
"""

from __future__ import annotations

import ast
import contextlib
import io
import secrets
import signal
import textwrap
import threading
from dataclasses import dataclass, field

from peftlab import probe
from peftlab.rules import message

BEGIN, END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
# All the reports of one notebook (the course's notebooks send at most 1.6 MB and 400 items in all).
NOTEBOOK_REPORT_BYTES = 48 << 20
NOTEBOOK_REPORT_ITEMS = 200_000
HIDDEN_FAILED = ("HiddenTestFailed", "a hidden test failed")


class ProbeFailed(Exception):
    """An @observe call produced no report (time limit, dead kernel, a suppressed display)."""

    def __init__(self, ename: str, evalue: str):
        super().__init__(evalue)
        self.ename, self.evalue = ename, evalue


class JudgeTimeout(BaseException):
    """The judge's own work on one test (reading reports, checks, references) ran out of time (a
    BaseException: no check's own `except Exception` swallows it)."""


class JudgeClock:
    """Limits the judge's own time on one test part, not counting the kernel's: an interval timer
    (SIGALRM) that runs while the judge works and is paused while it waits for the kernel. Where no
    timer can be set (not the main thread, no SIGALRM), checks run unlimited."""

    def __init__(self, seconds: float = 300.0):
        self.seconds, self.left = seconds, 0.0

    @staticmethod
    def _usable() -> bool:
        return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()

    @staticmethod
    def _expired(signum, frame):
        raise JudgeTimeout()

    @contextlib.contextmanager
    def running(self):
        if not self._usable():
            yield
            return
        previous = signal.signal(signal.SIGALRM, self._expired)
        self.left = self.seconds
        signal.setitimer(signal.ITIMER_REAL, self.left)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    @contextlib.contextmanager
    def paused(self):
        if not self._usable() or signal.getsignal(signal.SIGALRM) != self._expired:
            yield
            return
        self.left = max(0.001, signal.setitimer(signal.ITIMER_REAL, 0)[0])
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, self.left)


@dataclass
class Verdict:
    passed: bool = True
    ename: str = ""
    evalue: str = ""
    hidden: bool = False        # the failure came from the hidden part


@dataclass
class _Deferred:
    grade_id: str
    source: str
    namespace: dict


def split_test(source: str) -> tuple[str, str | None]:
    """(visible part, hidden part or None). The hidden part keeps its line numbers (leading blank
    lines), so that tracebacks and probe sources line up with the cell."""
    lines = source.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip() == BEGIN:
            return "".join(lines[:i]), "\n" * i + "".join(lines[i:])
    return source, None


def used_names(source: str) -> set[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


class Judge:
    """Verdicts for one notebook. ``send(source, name, arguments, token) -> report text`` runs an
    @observe function in the student's kernel, raising `ProbeFailed` when no report comes back."""

    def __init__(self, send, student_names: set[str], reference_use=None):
        self.send = send
        self.student_names = set(student_names)
        self.reference_use = reference_use  # `autograder.oracles.Use`: answers that call the tests' reference
        self.namespace: dict = {"__name__": "__main__"}
        self.sources: dict[str, str] = {}
        self.verdicts: dict[str, Verdict] = {}
        self.deferred: list[_Deferred] = []
        self.flags: list[str] = []
        self.phase = "visible"
        self.clock = JudgeClock()
        self.kept_bytes = self.kept_items = 0

    # -- cells ----------------------------------------------------------------------------------

    def uses_student_code(self, source: str) -> bool:
        return bool(used_names(source) & self.student_names)

    def locked(self, source: str) -> None:
        """A locked cell of the instructor's, run here too unless it needs the student's code."""
        if self.uses_student_code(source):
            return
        with self._runner(), _quiet():
            exec(compile(source, "<locked cell>", "exec"), self.namespace)

    def test(self, grade_id: str, source: str) -> Verdict:
        """Run a test's visible part now; keep its hidden part for `finish`. A test that calls an
        answer using the tests' reference code fails without running: no points for that exercise."""
        hit = self.reference_use.zeroed(source) if self.reference_use is not None else None
        if hit:
            name, why = hit
            self.flags.append(f"{grade_id} scored no points: {name} {why} (the tests' reference code)")
            self.verdicts[grade_id] = Verdict(False, "ReferenceCodeUsed", message(name, why))
            return self.verdicts[grade_id]
        visible, hidden = split_test(source)
        verdict = self._exec(grade_id, visible, self.namespace, hidden=False)
        self.verdicts[grade_id] = verdict
        if hidden is not None:
            self.deferred.append(_Deferred(grade_id, hidden, dict(self.namespace)))
        return verdict

    def finish(self) -> dict[str, Verdict]:
        """Run every hidden part, in order; a test passes only if both its parts passed."""
        self.phase = "hidden"
        for item in self.deferred:
            verdict = self.verdicts[item.grade_id]
            if not verdict.passed:
                continue  # already failed: its hidden part need not reach the kernel
            hidden = self._exec(item.grade_id, item.source, item.namespace, hidden=True)
            if not hidden.passed:
                self.verdicts[item.grade_id] = Verdict(False, *HIDDEN_FAILED, hidden=True)
        return self.verdicts

    # -- running judge code ---------------------------------------------------------------------

    def _exec(self, grade_id: str, source: str, namespace: dict, hidden: bool) -> Verdict:
        filename = f"<test {grade_id}{' (hidden)' if hidden else ''}>"
        self.sources[filename] = source
        probe.reseed()
        try:
            with self._runner(), _quiet(), self.clock.running():
                exec(compile(source, filename, "exec"), namespace)
        except JudgeTimeout:
            self.flags.append(f"the grader's checks of {grade_id} ran past their {self.clock.seconds:.0f} s "
                              "(what the kernel reported took too long to check)")
            return Verdict(False, "JudgeTimeout", f"checking what your code returned took the grader more than "
                           f"{self.clock.seconds:.0f} s")
        except probe.KernelError as exc:
            if exc.ename == "ReferenceUnavailable":
                self.flags.append(f"{grade_id}: the student's code called the tests' reference code, absent while graded")
            return Verdict(False, exc.ename[:100], exc.evalue[:1000] or "(raised by your code)")
        except ProbeFailed as exc:
            return Verdict(False, exc.ename, exc.evalue[:1000])
        except probe.ReportError as exc:
            self.flags.append(f"the kernel sent a malformed report in {grade_id}: {exc}")
            return Verdict(False, "ReportError", f"the kernel's report could not be read: {exc}")
        except AssertionError as exc:
            return Verdict(False, "AssertionError", _short(exc))
        except Exception as exc:  # noqa: BLE001 - anything else is this test failing
            return Verdict(False, type(exc).__name__, _short(exc))
        return Verdict()

    @contextlib.contextmanager
    def _runner(self):
        probe.set_runner(self._remote)
        try:
            yield
        finally:
            probe.set_runner(None)

    def _remote(self, func, args, kwargs):
        source, name = self.probe_source(func)
        arguments = probe.dumps((tuple(args), dict(kwargs)))
        token = secrets.token_hex(16)  # marks the one report this call asks for
        with self.clock.paused():      # the kernel's time is not the judge's
            report = self.send(source, name, arguments, token)
        # What the judge keeps of a notebook's reports is bounded too (values stay until its tests end).
        self.kept_bytes += len(report) if isinstance(report, str) else 0
        if self.kept_bytes > NOTEBOOK_REPORT_BYTES or self.kept_items >= NOTEBOOK_REPORT_ITEMS:
            raise probe.ReportError(f"the notebook's reports passed {NOTEBOOK_REPORT_BYTES >> 20} MB or "
                                    f"{NOTEBOOK_REPORT_ITEMS:,} items")
        budget = probe.Budget(most=min(probe.MAX_ITEMS + 16, NOTEBOOK_REPORT_ITEMS - self.kept_items))
        try:
            value = probe.read_report(report, token, budget=budget)
        finally:
            self.kept_items += budget.items
        self._note_unreadable(value, name)
        return value

    def probe_source(self, func) -> tuple[str, str]:
        """The source of an @observe function, without its decorator, from the cell it was defined in."""
        code = func.__code__
        if code.co_freevars:
            raise TypeError(f"@observe function {func.__name__} uses variables of an enclosing function")
        text = self.sources.get(code.co_filename)
        if text is None:
            raise RuntimeError(f"@observe used outside a test cell ({code.co_filename})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.name == func.__name__:
                first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                if first == code.co_firstlineno:
                    lines = text.splitlines()[node.lineno - 1:node.end_lineno]
                    return probe.trampolined(textwrap.dedent("\n".join(lines))), probe.CHECK
        raise RuntimeError(f"cannot find the source of @observe function {func.__name__}")

    def _note_unreadable(self, value, name: str, depth: int = 0) -> None:
        if depth > 4:
            return
        if isinstance(value, probe.Unreadable):
            if value.why.startswith("a subclass of"):
                self.flags.append(f"an answer posed as plain data: {value.kind} ({value.why})")
        elif isinstance(value, (list, tuple)):
            for item in value[:1000]:
                self._note_unreadable(item, name, depth + 1)
        elif isinstance(value, dict):
            for item in list(value.values())[:1000]:
                self._note_unreadable(item, name, depth + 1)


def _short(exc: BaseException, limit: int = 1000) -> str:
    """An exception's message, bounded: a message may quote what the kernel returned."""
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + " [...]"


@contextlib.contextmanager
def _quiet():
    """Judge code prints nowhere: the grader's own output is a protocol."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


@dataclass
class LocalKernel:
    """A stand-in for the student's kernel in this process (the tests' fast path): the notebook's
    namespace, and @observe calls made into it exactly as the grader's kernel makes them."""

    namespace: dict = field(default_factory=lambda: {"__name__": "__main__"})

    def run(self, source: str, name: str = "<cell>") -> None:
        exec(compile(source, name, "exec"), self.namespace)

    def send(self, source: str, name: str, arguments: str, token: str = "") -> str:
        state = probe._random_state()  # the judge's random draws go on as in its own process
        try:
            with _quiet():
                return probe.call_report(source, name, arguments, self.namespace, probe.HELPERS, token)
        finally:
            probe._set_random_state(state)

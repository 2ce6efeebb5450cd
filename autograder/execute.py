"""Grade one prepared notebook: run the student's cells in a sandboxed kernel, judge the tests here.

Part of stage 3, execute. A grading process (`autograder.worker`) runs one `Job` at a time: the job names
the prepared notebook (which holds the hidden tests and lives where the kernel cannot see it), where to
write the executed copy and the `Result`, the limits and the student's names. What happens to each
cell of the prepared notebook, in order:

- locked cells, the student's answers and code cells, plain cells: run in the kernel; their outputs are
  kept, reduced to inert forms (text, PNG or JPEG images, error text) and capped;
- a locked cell that does not use the student's names also runs in the judge (imports, helpers); one
  tagged ``judge-only`` (a reference the tests compare with) runs only there;
- a test cell: its visible part is judged now (`autograder.judge`); its hidden part after the last cell.

Every test cell then carries exactly one verdict written by the grader: a line on stdout when it
passed, an error output when it failed (for a hidden part: "a hidden test failed" and nothing else).
nbgrader scores those outputs. A kernel that dies, hangs or runs out of time or memory costs the
tests that could not be judged, never the run; a test is never passed without being judged.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import secrets
import sys
import time
from pathlib import Path

import nbformat

from autograder import oracles
from autograder.judge import Judge, ProbeFailed, Verdict
from autograder.kernel import Kernel, Limits
from autograder.prepare import _kind
from autograder.records import Job, Result

ROOT = Path(__file__).resolve().parent.parent
MAX_NOTEBOOK_OUTPUT = 4 << 20     # all kept outputs of one notebook (the feedback page)
MAX_TEXT = 64 << 10               # one stream, error message or traceback
IMAGE_MAGIC = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}

INTEGRITY = '''
def integrity():
    import sys
    shell = get_ipython()

    def from_notebook(hook):
        code = getattr(hook, "__code__", None) or getattr(getattr(hook, "__call__", None), "__code__", None)
        module = getattr(hook, "__module__", None) if code is not None else type(hook).__module__
        filename = getattr(code, "co_filename", "") if code is not None else ""
        return module in (None, "__main__") or filename.startswith("<") or "ipykernel_" in filename

    probe = sys.modules.get("peftlab.probe")
    import builtins
    return {
        # a method the kernel binds afresh for each request (input) is the same function on the same object
        "builtins": {name: [id(getattr(value, "__func__", value)), id(getattr(value, "__self__", None))]
                     for name, value in vars(builtins).items() if not name.startswith("_")},
        "trace": sys.gettrace() is not None, "profile": sys.getprofile() is not None,
        "input_transformers": sum(map(from_notebook, [*shell.input_transformers_post, *shell.input_transformers_cleanup])),
        "ast_transformers": sum(map(from_notebook, shell.ast_transformers)),
        "events": sum(from_notebook(f) for hooks in shell.events.callbacks.values() for f in hooks),
        "custom_exceptions": len(shell.custom_exceptions),
        "blocked": sorted(set(getattr(probe, "_SEEN", []))),
        "probe": [getattr(getattr(probe, "run", None), "__module__", None), id(getattr(probe, "_ARMED", None))] + [
            __import__("hashlib").sha256(getattr(getattr(probe, f, None), "__code__", None).co_code).hexdigest()
            if hasattr(getattr(probe, f, None), "__code__") else None
            for f in ("run", "call_report", "_check_globals", "_scrub", "_changed", "_publishing", "_guard", "arm", "loads",
                      "dumps", "encode", "decode", "reseed")],
    }
'''
INTEGRITY_NAMES = {
    "trace": "a tracing hook (sys.settrace)", "profile": "a profiling hook (sys.setprofile)",
    "input_transformers": "IPython input transformers", "ast_transformers": "IPython AST transformers",
    "events": "IPython event callbacks", "custom_exceptions": "a custom exception handler (set_custom_exc)",
    "probe": "the grader's probe functions (run, call_report, encode, decode)",
    "builtins": "Python's builtins",
    "blocked": "operations blocked while graded",
}


def _is_test(cell) -> bool:
    return _kind(cell) == "test"


def printable_short(text: str, limit: int = 120) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _error_output(ename: str, evalue: str):
    return nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"])


def _text(value) -> str:
    text = "".join(value) if isinstance(value, list) else str(value)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "\n[cut by the grader]\n"


def sanitize(outputs: list) -> list:
    """Outputs reduced to forms no browser executes: stream text, plain text, PNG/JPEG images (checked
    to be images), errors as text. HTML, JavaScript, SVG, widgets and all metadata are dropped."""
    clean = []
    for output in outputs:
        kind = output.get("output_type")
        if kind == "stream":
            name = output.get("name") if output.get("name") in ("stdout", "stderr") else "stdout"
            clean.append(nbformat.v4.new_output("stream", name=name, text=_text(output.get("text", ""))))
        elif kind in ("display_data", "execute_result"):
            data = output.get("data", {}) if isinstance(output.get("data"), dict) else {}
            kept = {}
            if isinstance(data.get("text/plain"), (str, list)):
                kept["text/plain"] = _text(data["text/plain"])
            for mime, magic in IMAGE_MAGIC.items():
                value = data.get(mime)
                if isinstance(value, str) and len(value) < 4 << 20:
                    try:
                        if base64.b64decode(value[:64] + "=" * (-len(value[:64]) % 4), validate=False).startswith(magic):
                            base64.b64decode(value, validate=True)
                            kept[mime] = value
                    except (binascii.Error, ValueError):
                        pass
            if kept:
                if kind == "execute_result":
                    clean.append(nbformat.v4.new_output("execute_result", data=kept, execution_count=None))
                else:
                    clean.append(nbformat.v4.new_output("display_data", data=kept))
        elif kind == "error":
            traceback = output.get("traceback") if isinstance(output.get("traceback"), list) else []
            clean.append(nbformat.v4.new_output("error", ename=_text(output.get("ename", "Error"))[:200],
                                                evalue=_text(output.get("evalue", "")),
                                                traceback=[_text(line) for line in traceback[:200]]))
    return clean


def _verdict_outputs(verdict: Verdict, printed: str) -> list:
    outputs = []
    if printed:
        outputs.append(nbformat.v4.new_output("stream", name="stdout", text=_text(printed)))
    if verdict.passed:
        outputs.append(nbformat.v4.new_output("stream", name="stdout", text="passed\n"))
    else:
        outputs.append(_error_output(verdict.ename or "Error", verdict.evalue))
    return outputs


class Session:
    """One notebook's kernel and judge."""

    def __init__(self, job: Job):
        self.job = job
        limits = Limits(cell_cpu_seconds=job.cell_timeout, cell_wall_seconds=job.cell_timeout * 5,
                        memory_mb=job.memory_mb, max_procs=job.max_procs)
        self.kernel = Kernel(Path(job.folder) / "k", limits, use_sandbox=job.sandbox, expose=list(job.expose),
                             threads=job.threads, warm=job.warm, left_out=list(job.left_out))
        self.judge = Judge(self.send, set(job.student_names))
        self.flags: list[str] = []
        self.notes: list[str] = []
        self.printed: list[str] = []   # what the student's code printed during a visible test
        self.deadline = float("inf")

    def send(self, source: str, name: str, arguments: str, token: str) -> str:
        """Run one @observe function in the kernel; its report, which must be the only one the call
        sent, marked with ``token``, from a call that ended normally (the probe catches everything the
        student's code raises, so an error, an interrupt the grader did not send or a second report
        means the kernel's machinery was tampered with)."""
        visible = self.judge.phase == "visible"
        if time.monotonic() > self.deadline:
            raise ProbeFailed("TimeoutError", f"not run: the notebook ran past its {self.job.notebook_timeout} s limit")
        from peftlab.probe import HELPERS  # the grader's own copy, defined afresh for every call

        code = (f"__import__('peftlab.probe', fromlist=['run']).run({source!r}, {name!r}, {arguments!r}, "
                f"{HELPERS!r}, {token!r})")
        run = self.kernel.run(code, store_history=False, keep_outputs=visible, expect_report=True)
        self._note_refused(run.refused if run.status != "dead" else 0)
        if visible:
            self.printed += [o.get("text", "") for o in run.outputs if o.get("output_type") == "stream"]
        if run.status == "timeout":
            self.flags.append(f"a test's call into the student's code hit a limit: {run.reason}")
            raise ProbeFailed("TimeoutError", f"the test's call into your code was stopped: {run.reason}")
        if run.status == "dead":
            raise ProbeFailed("DeadKernelError", f"not run: {run.reason}")
        reports = [r for r in run.reports if r is not None]
        if run.refused and not reports:
            raise ProbeFailed("ReportTooLarge", "what the test's call into your code sent is larger than "
                              f"{self.kernel.limits.max_message_bytes >> 20} MB")
        if run.report_count > 1:
            self.flags.append("the kernel sent more than one report for one call (refused)")
            raise ProbeFailed("ReportRefused", "your notebook sent more than one report for one test's call")
        if run.report_count and not reports:
            self.flags.append(f"a test's call returned more than {self.kernel.limits.max_report_bytes >> 20} MB of data")
            raise ProbeFailed("ReportTooLarge", f"what the test's call into your code returned is larger than "
                              f"{self.kernel.limits.max_report_bytes >> 20} MB")
        errors = [f"{o.get('ename')}: {o.get('evalue')}" for o in run.outputs if o.get("output_type") == "error"]
        if run.status == "error":
            self.flags.append("a test's call ended in an error outside the grader's probe"
                              + (f" ({printable_short(errors[0])})" if errors else "") + ": its report was refused")
            raise ProbeFailed("ReportRefused", "the test's call into your notebook did not end normally"
                              + (f" ({errors[0][:300]})" if errors and visible else ""))
        if not reports:
            self.flags.append("a test's call into the student's code sent no report (display suppressed?)")
            raise ProbeFailed("NoResult", "your notebook did not report what the test's call returned")
        return reports[-1]

    def _note_refused(self, refused: int) -> None:
        if refused:
            self.flags.append(f"the kernel sent messages larger than {self.kernel.limits.max_message_bytes >> 20} MB "
                              "(refused unread)")

    def integrity(self) -> dict | None:
        try:
            from peftlab import probe

            token = secrets.token_hex(16)
            return probe.read_report(self.send(INTEGRITY, "integrity", probe.dumps(((), {})), token), token)
        except Exception:  # noqa: BLE001 - a kernel that cannot even answer this is reported elsewhere
            return None

    def compare(self, baseline, now, when: str) -> None:
        if not isinstance(baseline, dict) or not isinstance(now, dict):
            return
        changed = [INTEGRITY_NAMES[k] for k in INTEGRITY_NAMES if k not in ("builtins", "blocked") and baseline.get(k) != now.get(k)]
        if isinstance(now.get("blocked"), list) and now["blocked"] != baseline.get("blocked"):
            changed.append(f"{INTEGRITY_NAMES['blocked']} ({', '.join(map(str, now['blocked'][:5]))})")
        before, after = baseline.get("builtins"), now.get("builtins")
        if isinstance(before, dict) and isinstance(after, dict):  # names added later (by a library) do not count
            rebound = sorted(str(name) for name, value in before.items() if after.get(name) != value)
            if rebound:
                changed.append(f"{INTEGRITY_NAMES['builtins']} ({', '.join(rebound[:5])})")
        if changed:
            self.flags.append(f"the notebook changed the kernel's machinery ({when}): {', '.join(changed)}")

    def grade(self, nb) -> dict:
        """Run and judge ``nb`` in place, cell by cell; the `Result` fields that say how it went."""
        start = time.monotonic()
        self.deadline = start + self.job.notebook_timeout
        self.stopped: str | None = None  # why the notebook could not go on
        self.baseline = None             # the kernel's machinery after the imports cell
        # Where the time goes: the kernel's start, the imports cell, the other cells, the tests' calls
        # and checks (visible, then hidden), the integrity checks.
        self.timing = dict.fromkeys(("kernel_start", "imports", "cells", "tests", "hidden", "integrity"), 0.0)
        self.judge.reference_use = oracles.find(nb)  # answers that use the tests' reference score nothing
        self._start()
        printed = {}
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            cell.execution_count = None
            if _kind(cell) == "test":
                printed[index] = self._test(cell)
            else:
                self._cell(cell)
        if not self.stopped:
            self._finish()
        for index, cell in enumerate(nb.cells):
            if _is_test(cell):
                grade_id = cell.metadata["nbgrader"]["grade_id"]
                verdict = self.judge.verdicts.get(grade_id) or Verdict(False, "NotRun", "not run: the grader stopped early")
                cell.outputs = _verdict_outputs(verdict, printed.get(index, ""))
        self.flags += self.judge.flags
        self.notes += self.kernel.notes
        if not self.kernel.dead and not self.stopped:  # the relay's word on a message may come after its cell's end
            self._note_refused(self.kernel.refused_in_all())
        if self.kernel.dead and not self.stopped:
            self.flags.append(self.kernel.dead)
        _cap_notebook(nb, self.notes)
        return {"completed": self.stopped is None and not self.kernel.dead, "seconds": time.monotonic() - start,
                "timing": self.timing, "peak_mb": round(self.kernel.peak_bytes / 2**20)}

    @contextlib.contextmanager
    def _timed(self, part: str):
        clock = time.monotonic()
        try:
            yield
        finally:
            self.timing[part] += time.monotonic() - clock

    def _start(self) -> None:
        try:
            with self._timed("kernel_start"):
                self.kernel.start()
                # The probe first, before any of the student's code: it keeps Python's builtins as they are now.
                self.kernel.run("__import__('peftlab.probe', fromlist=['arm']).arm()", store_history=False,
                                keep_outputs=False)
        except Exception as exc:  # noqa: BLE001
            self.stopped = f"the kernel could not start ({type(exc).__name__}: {str(exc)[:200]})"
            self.flags.append(self.stopped)

    def _test(self, cell) -> str:
        """Judge a test cell's visible part; what the student's code printed during it."""
        grade_id = cell.metadata["nbgrader"]["grade_id"]
        if self.stopped:
            self.judge.verdicts[grade_id] = Verdict(False, "NotRun", f"not run: {self.stopped}")
            return ""
        self.printed = []
        with self._timed("tests"):
            self.judge.test(grade_id, cell.source)
        return "".join(self.printed)

    def _cell(self, cell) -> None:
        """Run a locked, answer or added cell in the kernel (a judge-only one in the judge)."""
        cell.outputs = []
        kind = _kind(cell)
        if self.stopped:
            return
        if kind == "locked" and "judge-only" in cell.get("metadata", {}).get("tags", []):
            self.judge.locked(cell.source)  # the tests' reference: never in the student's kernel
            return
        if time.monotonic() > self.deadline:
            self.stopped = f"the notebook ran past its {self.job.notebook_timeout} s limit"
            self.flags.append(self.stopped)
            return
        with self._timed("imports" if cell.get("id") == "imports" else "cells"):
            run = self.kernel.run(cell.source)
        self._note_refused(run.refused if run.status != "dead" else 0)
        cell.outputs = sanitize(run.outputs)
        if run.capped:
            self.notes.append(f"output of cell {cell.get('id')} cut to {self.kernel.limits.max_output_bytes // 1024} KB")
        if run.status == "timeout":
            cell.outputs.append(_error_output("TimeoutError", run.reason))
            self.flags.append(f"a cell hit a time limit ({cell.get('id')}): {run.reason}")
        elif run.status == "dead":
            self.stopped = run.reason if "limit" in run.reason or "too many" in run.reason else f"{run.reason} in cell {cell.get('id')}"
            cell.outputs.append(_error_output("DeadKernelError", self.stopped))
            self.flags.append(self.stopped)
        if any(o.get("output_type") == "error" and o.get("ename") == "MemoryError" for o in cell.outputs):
            self.flags.append(f"memory limit reached in cell {cell.get('id')}")
        if kind == "locked" and cell.get("id") != "setup":
            try:
                self.judge.locked(cell.source)
            except Exception as exc:  # noqa: BLE001 - the instructor's cell failing here is worth saying
                self.notes.append(f"locked cell {cell.get('id')} failed in the judge: {type(exc).__name__}: {exc}")
            if cell.get("id") == "imports":
                with self._timed("integrity"):
                    self.baseline = self.integrity()

    def _finish(self) -> None:
        """The hidden tests, between integrity checks of the kernel's machinery."""
        with self._timed("integrity"):
            now = self.integrity()
        self.compare(self.baseline, now, "during the notebook")
        with self._timed("hidden"):
            self.judge.finish()
        with self._timed("integrity"):
            now = self.integrity()
        self.compare(self.baseline, now, "during the hidden tests")


def _cap_notebook(nb, notes: list[str]) -> None:
    """Keep the feedback page bounded: drop the largest non-test outputs beyond the notebook's cap."""
    sizes = [(len(json.dumps(c.get("outputs", []))), i) for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and not _is_test(c)]
    total = sum(s for s, _ in sizes) + sum(len(json.dumps(c.outputs)) for c in nb.cells if _is_test(c))
    for size, i in sorted(sizes, reverse=True):
        if total <= MAX_NOTEBOOK_OUTPUT:
            break
        nb.cells[i].outputs = [nbformat.v4.new_output("stream", name="stdout",
                                                      text="[outputs removed by the grader: the notebook's outputs were too large]\n")]
        total -= size
        notes.append(f"outputs of cell {nb.cells[i].get('id')} removed (the notebook's outputs passed {MAX_NOTEBOOK_OUTPUT >> 20} MB)")


def grade_job(job: Job) -> Result:
    """Run one job; always writes the executed notebook and returns a result (never raises)."""
    nb = nbformat.read(job.notebook, as_version=4)
    session = Session(job)
    try:
        result = session.grade(nb)
    except Exception as exc:  # noqa: BLE001 - report any failure as this submission's
        result = {"completed": False, "error": f"{type(exc).__name__}: {exc}"}
        for cell in nb.cells:
            if _is_test(cell):
                cell.outputs = [_error_output("NotGraded", "the grader could not finish this notebook")]
    finally:
        session.kernel.shutdown()
    for cell in nb.cells:
        if _is_test(cell) and not cell.get("outputs"):  # never let a test that was not judged count as passed
            cell.outputs = [_error_output("NotRun", "not run: the grader could not finish the kernel")]
    nbformat.write(nb, job.output)
    dedup = lambda items: tuple(dict.fromkeys(items))  # noqa: E731
    return Result(**result, flags=dedup(session.flags), notes=dedup(session.notes))

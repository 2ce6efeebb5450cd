"""Feedback that does not give hidden tests away.

nbgrader's `ClearHiddenTests` removes hidden test *source* from the feedback, but a failing test's
traceback quotes the failing line and its neighbours, which may be hidden ones. This preprocessor,
run before `ClearHiddenTests`, replaces each test cell's traceback by the error's type and message
and says whether the visible or the hidden part of the test failed.
"""

from __future__ import annotations

import re

from nbgrader.preprocessors import NbGraderPreprocessor

BEGIN, END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LINE = re.compile(r"(?:Cell In\s*\[\d*\],|<ipython-input-[^>]*>|File <[^>]*>:?)\s*,?\s*line (\d+)")


def hidden_lines(source: str) -> set[int]:
    """1-based line numbers inside the hidden-test markers (the markers included)."""
    lines, inside = set(), False
    for number, line in enumerate(source.splitlines(), start=1):
        if line.strip() == BEGIN:
            inside = True
        if inside:
            lines.add(number)
        if line.strip() == END:
            inside = False
    return lines


def failing_line(traceback: list[str]) -> int | None:
    """The line of the test cell an IPython traceback points at (the first frame in the cell)."""
    for entry in traceback:
        found = _LINE.search(_ANSI.sub("", entry))
        if found:
            return int(found.group(1))
    return None


def sanitize_cell(cell) -> None:
    hidden = hidden_lines(cell.source)
    for output in cell.get("outputs", []):
        if output.get("output_type") != "error":
            continue
        line = failing_line(output.get("traceback", []))
        where = ("a hidden test failed" if line in hidden else "a visible test failed") if line else "the test failed"
        message = f"{output.get('ename', 'Error')}: {output.get('evalue', '')}".rstrip(": ")
        output["traceback"] = [f"{message}  ({where})"]


class SanitizeTracebacks(NbGraderPreprocessor):
    """Shorten every test cell's error to its type, message and which part (visible/hidden) failed."""

    def preprocess_cell(self, cell, resources, cell_index):
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if cell.cell_type == "code" and meta.get("grade") and not meta.get("solution"):
            sanitize_cell(cell)
        return cell, resources

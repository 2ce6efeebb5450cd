"""Stage 5, report: the run's report (``autograder/reports/report.csv`` and ``.json``: one row per input
file with its score, status, flags for a person to review and notes on repairs), the item analysis
(`autograder.items`) and the summary printed at the end. Text from a submission is made safe for a
terminal and for a spreadsheet."""

from __future__ import annotations

import csv
import json
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from autograder import items
from autograder.records import Submission


def item_analysis(root: Path, url: str, assignments: list[str]) -> str | None:
    """Per test, who passed and why others did not (never a hidden test's text), over every submission
    of ``assignments`` the gradebook at ``url`` holds, in ``autograder/reports/items.*``; a note if it
    could not be written (the grades stand without it)."""
    try:
        points = {}
        for name in assignments:
            source = json.loads((root / "solutions" / name / f"{name}.ipynb").read_text())
            points[name] = items.test_points(source)
        items.write(root / "autograder" / "reports", items.analyse(items.class_rows(root, url, assignments), points))
    except Exception as exc:  # noqa: BLE001 - the grades stand without it
        return f"the item analysis could not be written: {type(exc).__name__}: {exc}"
    return None


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text) -> str:
    """Text from a submission (names, flags that quote it) made safe for a terminal: control
    characters (escape sequences) shown as codes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", str(text))


def cell(text) -> str:
    """A CSV cell that a spreadsheet will not evaluate as a formula."""
    text = printable(text)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def write_report(root: Path, submissions: list[Submission], run_notes: list[str], seconds: float,
                 workers: int, sandboxed: bool, phases: dict | None = None) -> None:
    reports = root / "autograder" / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    with open(reports / "report.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "name", "assignment", "status", "score", "max_score", "flags", "notes", "reason",
                         "file"])
        for s in submissions:
            writer.writerow([cell(v) for v in (s.student, s.name, s.assignment, s.status, s.score, s.max_score,
                                               " | ".join(s.flags), " | ".join(s.notes), s.reason, s.file)])
    (reports / "report.json").write_text(json.dumps(
        {"seconds": seconds, "workers": workers, "sandbox": sandboxed, "notes": run_notes,
         "phases": {k: round(v, 2) for k, v in (phases or {}).items()},
         "submissions": [asdict(s) for s in submissions if s.status != "skipped"],
         "skipped": [asdict(s) for s in submissions if s.status == "skipped"]}, indent=1))
    stamp = time.strftime("%Y%m%d-%H%M%S")  # report.* describe the latest run; each run is also kept
    for suffix in ("csv", "json"):
        shutil.copy2(reports / f"report.{suffix}", reports / f"report-{stamp}.{suffix}")
    graded = sum(s.status == "graded" for s in submissions)
    failed = sum(s.status == "failed" for s in submissions)
    skipped = sum(s.status == "skipped" for s in submissions)
    flagged = sum(bool(s.flags) for s in submissions if s.status != "skipped")
    print(f"\n{len(submissions) - skipped} submissions in {seconds:.0f} s with {workers} workers: {graded} graded, "
          f"{failed} failed, {flagged} flagged for review, {skipped} files skipped (sandbox {'on' if sandboxed else 'OFF'})")
    for s in submissions:
        if s.status == "skipped":
            print(printable(f"  skipped {s.file}: {s.reason}"))
        elif s.status == "failed" or s.flags:
            detail = s.reason if s.status == "failed" else "; ".join(s.flags)
            print(printable(f"  {s.student} / {s.assignment}: {s.status}, {s.score if s.score is not None else '-'} "
                            f"points: {detail[:300]}"))
    for note in run_notes:
        print(printable(f"note: {note}"))
    print(f"grades: {root / 'autograder' / 'grades.csv'}\nreport: {reports / 'report.csv'}\n"
          f"feedback: {root / 'autograder' / 'feedback'}")
    if (reports / "items.html").exists():
        print(f"item analysis: {reports / 'items.html'}")

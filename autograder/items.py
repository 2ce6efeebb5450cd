"""Item analysis of a class: how each test cell did across every submission the gradebook holds.

For every assignment and every test cell: the share of graded students who passed it, its
discrimination (the pass rate among the top third of the class by total score, less the bottom
third's), the most common failure messages and how many failures came from the hidden part, and flags
for tests that nearly no one passes (a broken test, or an exercise whose text misleads) or nearly
everyone passes (a test that tells students apart no more). Per assignment: a histogram of the
scores. nbgrader has none of this.

Who passed what comes from the gradebook (`autograder.gradebook.test_scores`), so the analysis covers
the whole class, graded in one run or many, here or on other machines, and a score an instructor
changed by hand counts as changed. Why a test failed comes from the autograded notebook nbgrader
keeps for each submission (``autograder/autograded/``): what the grader wrote into the test cell (a
verdict, see `autograder.execute`), so a hidden test's text never appears: its failures read "a hidden
test failed". A submission that could not be graded (scored as a stand-in) is left out. Failure
messages are grouped with their numbers replaced by ``#`` (a message such as "counted 1,234
parameters" differs from student to student), cut to 200 characters, and HTML-escaped in the report,
since a message may quote what a student's code returned.

Writes ``autograder/reports/items.json``, ``items.html`` (tables and the histograms, one
self-contained file) and ``items-<assignment>.png``; each run's JSON and HTML are also kept with a
time stamp.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import time
from collections import Counter
from pathlib import Path

MIN_CLASS = 5          # fewer graded students than this: shares are shown, no test is flagged
LOW, HIGH = 0.10, 0.95  # pass shares at or beyond which a test is flagged
# A number, not digits inside a name: "q1_answer", "float32" and "lora_B2" stay as they are.
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d(?:[\d,_.]*\d)?(e[-+]?\d+)?(?![A-Za-z_])", re.IGNORECASE)


def _grade_id(cell) -> str | None:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    if cell.get("cell_type") == "code" and meta.get("grade") and not meta.get("solution"):
        return meta.get("grade_id")
    return None


def verdicts(nb) -> dict[str, str | None]:
    """grade_id -> None when the test passed, else its failure message (from the grader's verdict)."""
    found = {}
    for cell in nb.get("cells", []):
        grade_id = _grade_id(cell)
        if grade_id is None:
            continue
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        found[grade_id] = None if not errors else f"{errors[-1].get('ename', 'Error')}: {errors[-1].get('evalue', '')}"
    return found


def _pattern(message: str) -> str:
    text = " ".join(str(message).split())
    text = _NUMBER.sub("#", text)
    return text if len(text) <= 200 else text[:200] + " [...]"


NO_MESSAGE = "NoMessage: failed; no autograded notebook on this machine says why"
BY_HAND = "ScoredByHand: the grader passed it; its score was changed by hand"


def _messages(root: Path, student: str, assignment: str) -> dict[str, str | None]:
    """The verdicts in the autograded notebook nbgrader kept for a submission; {} when there is none."""
    path = Path(root) / "autograder" / "autograded" / student / assignment / f"{assignment}.ipynb"
    try:
        return verdicts(json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError):
        return {}


def class_rows(root: Path, url: str, assignments: list[str]) -> list[tuple[str, str, float, float, dict]]:
    """(assignment, student, score, max_score, {grade_id: None when passed, else why}) for every graded
    submission of ``assignments`` in the gradebook at ``url``; stand-ins for submissions that could not
    be graded are left out."""
    from autograder import gradebook

    rows = []
    for (assignment, student), cells in sorted(gradebook.test_scores(url, assignments).items()):
        messages = _messages(root, student, assignment)
        if messages and all(str(m).startswith("NotGraded") for m in messages.values()):
            continue
        outcomes = {grade_id: None if got >= most else (messages.get(grade_id) or (BY_HAND if grade_id in messages else NO_MESSAGE))
                    for grade_id, (got, most) in cells.items()}
        rows.append((assignment, student, sum(g for g, _ in cells.values()), sum(m for _, m in cells.values()), outcomes))
    return rows


def analyse(graded: list[tuple[str, str, float, float, dict]], points: dict[str, dict[str, float]]) -> dict:
    """``graded``: (assignment, student, score, max_score, {grade_id: None when passed, else the
    failure message}) for each graded submission (`class_rows`); ``points``: assignment ->
    {grade_id: points} of its test cells, in notebook order."""
    report = {}
    for assignment, tests in points.items():
        rows = [(student, score, max_score, outcomes) for a, student, score, max_score, outcomes in graded if a == assignment]
        if not rows:
            continue
        ranked = sorted(rows, key=lambda r: r[1])
        third = max(1, len(ranked) // 3)
        bottom, top = ranked[:third], ranked[-third:]
        items = []
        for grade_id, value in tests.items():
            outcomes = [r[3].get(grade_id, "NotRun: the test did not run") for r in rows]
            passed = sum(o is None for o in outcomes)
            failures = [o for o in outcomes if o is not None]
            share = passed / len(rows)
            item = {"test": grade_id, "points": value, "students": len(rows), "passed": passed, "pass_share": share,
                    "discrimination": (sum(r[3].get(grade_id, "") is None for r in top) / len(top)
                                       - sum(r[3].get(grade_id, "") is None for r in bottom) / len(bottom)),
                    "hidden_failures": sum(o.startswith("HiddenTestFailed") for o in failures),
                    "messages": [{"message": m, "count": c} for m, c in Counter(map(_pattern, failures)).most_common(3)],
                    "flag": ""}
            if len(rows) >= MIN_CLASS and share <= LOW:
                item["flag"] = "almost no one passes: check the test, or the exercise's text"
            elif len(rows) >= MIN_CLASS and share >= HIGH:
                item["flag"] = "almost everyone passes: it tells students apart no more"
            items.append(item)
        scores = [r[1] for r in rows]
        report[assignment] = {"students": len(rows), "max_score": max(r[2] for r in rows), "scores": scores,
                              "mean": sum(scores) / len(scores), "items": items}
    return report


def histogram_png(scores: list[float], max_score: float, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.6))
    top = max(max_score, max(scores, default=0))
    bins = [b - 0.5 for b in range(int(top) + 2)]
    ax.hist(scores, bins=bins, color="#4C72B0", edgecolor="white")
    ax.set_xlabel("score (points)")
    ax.set_ylabel("students")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(-0.5, top + 0.5)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def write(folder: Path, report: dict) -> Path:
    """Write the JSON, the PNGs and the HTML summary into ``folder``; returns the HTML's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.json").write_text(json.dumps(report, indent=1))
    esc = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>Item analysis</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}td,th{padding:3px 8px;"
             "border-bottom:1px solid #ddd;text-align:left;vertical-align:top}td.n{text-align:right}"
             ".flag{color:#b00}</style><h1>Item analysis</h1>"]
    for assignment, data in report.items():
        png = histogram_png(data["scores"], data["max_score"], f"{assignment}: {data['students']} students")
        (folder / f"items-{assignment}.png").write_bytes(png)
        parts.append(f"<h2>{esc(assignment)}</h2><p>{data['students']} graded students, mean "
                     f"{data['mean']:.2f} of {data['max_score']:g} points.</p>"
                     f"<img alt='score histogram' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
        parts.append("<table><tr><th>test</th><th>points</th><th>passed</th><th>discrimination</th>"
                     "<th>most common failures</th><th>flag</th></tr>")
        for item in data["items"]:
            messages = "<br>".join(f"{m['count']} &times; {esc(m['message'])}" for m in item["messages"])
            if item["hidden_failures"]:
                messages += f"<br><i>{item['hidden_failures']} of the failures in the hidden part</i>"
            parts.append(f"<tr><td>{esc(item['test'])}</td><td class=n>{item['points']:g}</td>"
                         f"<td class=n>{item['pass_share']:.0%} ({item['passed']}/{item['students']})</td>"
                         f"<td class=n>{item['discrimination']:+.2f}</td><td>{messages}</td>"
                         f"<td class=flag>{esc(item['flag'])}</td></tr>")
        parts.append("</table>")
    path = folder / "items.html"
    path.write_text("\n".join(parts) + "\n")
    stamp = time.strftime("%Y%m%d-%H%M%S")  # items.* describe the latest run; each run is also kept
    for suffix in ("json", "html"):
        shutil.copy2(folder / f"items.{suffix}", folder / f"items-{stamp}.{suffix}")
    return path


def test_points(source_nb) -> dict[str, float]:
    """{grade_id: points} of a notebook's test cells, in order."""
    found = {}
    for cell in source_nb.get("cells", []):
        grade_id = _grade_id(cell)
        if grade_id is not None:
            found[grade_id] = float(cell["metadata"]["nbgrader"].get("points", 0))
    return found

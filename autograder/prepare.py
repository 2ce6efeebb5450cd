"""Stage 2, prepare: turn each submitted file into the notebook the grader runs (a `Job`), and say what
was wrong with it.

The graded notebook is rebuilt from the instructor's source: every locked cell and every test (with
its hidden part) comes from `solutions/`, every answer from the student. It is written where the
student's kernel cannot see it; the kernel only ever receives cells one at a time (`autograder.execute`). So a locked cell the student
edited, a test cell replaced by `pass` or deleted, or cells moved around are all graded as the
instructor wrote them, and reported. Matching uses nbgrader's cell metadata; when a platform such
as Google Colab dropped it, cells are matched by their content and position against the release.

Nothing here executes student code.
"""

from __future__ import annotations

import bisect
import builtins
import copy
import hashlib
import html
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell

from autograder import gradebook, oracles
from autograder.records import Job, Submission
from autograder.release import nbgrader_batch
from peftlab.rules import bound_names

MAX_BYTES = 200 * 1024 * 1024  # larger files are refused unread
MAX_MARKDOWN = 100 * 1024      # a Markdown answer is cut beyond this (rendering some Markdown is cubic)
MAX_CODE = 1024 * 1024         # an answer or added code cell is cut beyond this

# Code a person should read: it reaches outside the notebook or into the grader's machinery.
SUSPICIOUS = {
    "network": r"\bsocket\b|urllib|requests\.|http\.client|httpx|aiohttp",
    "processes": r"subprocess|os\.system|os\.popen|os\.exec|os\.fork|os\.spawn|pty\.|multiprocessing",
    "exits the kernel": r"os\._exit|sys\.exit|\bexit\(|\bquit\(|os\.kill",
    "reads grading files": r"solutions|gradebook|autograder|submitted|\.ipynb|\bIn\[|_ih\b|\bOut\[|history_manager",
    "grader machinery": r"get_ipython|__builtins__|\bbuiltins\b|sys\.modules|showtraceback|ctypes|\bgc\.|inspect\.stack"
                        r"|__globals__|__code__|__closure__|co_code|func_globals|__defaults__"
                        r"|sys\._getframe|signal\.|settrace|setprofile|sys\.monitoring|input_transformers|ast_transformers"
                        r"|events\.register|set_custom_exc|display_pub|publish_display_data|peftlab\.probe|__import__"
                        r"|setattr\(\s*(torch|math|np|peftlab|random|transformers|peft)"
                        r"|\bprobe\b|call_report|HELPERS|__peftlab|InteractiveShell|iopub|send_multipart|\.session\b",
    "rebinds test helpers": r"^\s*((torch|math|random|np|numpy|transformers|peft|peftlab|bnb|bitsandbytes)(\.\w+)+"
                            r"|assert_close|expect_error|observe|raised|float_tensors|[a-z_]*reference\w*|peft_\w+|abs|sum|len"
                            r"|isinstance|type|print|setattr|getattr|int|float|str|bool|round|min|max|sorted)\s*=",
    # the tests' reference code: autograder/oracles.py reads it (and zeroes the tests it affects)
    "redefines a test helper": r"^\s*(def|class)\s+(raised|observe|expect_error|assert_close|float_tensors|load_prefixes"
                               r"|call_report|encode|decode|dumps|loads)\b|globals\(\)\s*\[",
    "writes outside the notebook": r"\.pth\b|site-packages|getsitepackages|sys\.prefix|peftlab/|\.venv|checks\.py"
                                   r"|JUPYTER_RUNTIME_DIR|fallocate",
    "inspects the call stack": r"currentframe|_getframe|f_back|f_locals|f_globals|f_code|tb_frame|tb_next|co_name"
                               r"|gi_frame|cr_frame|ag_frame|_current_frames|inspect\.(stack|trace|getouterframes|getframeinfo)"
                               r"|(extract|walk|format|print)_stack|walk_tb|exc_info|__traceback__|get_referrers"
                               r"|get_parent|parent_header|/proc/self|threading\.enumerate|contextvars|copy_context"
                               r"|_shell_parent|_parent_ident|linecache|exec_result|faulthandler",
    "answers that pose as plain data": r"class\s+\w+\s*\(\s*(int|float|str|bool|tuple|list|dict|torch\.Tensor|Tensor)\s*[,)]"
                                       r"|def\s+__(eq|ne|lt|le|gt|ge|hash|bool|float|int|index|torch_function|instancecheck)__",
}

@dataclass
class Prepared:
    """A submission ready to run (``notebook``), or why it cannot be (``reason``)."""

    notebook: nbformat.NotebookNode | None = None
    reason: str = ""
    flags: list[str] = field(default_factory=list)   # integrity problems for a person to look at
    notes: list[str] = field(default_factory=list)   # repairs and conversions, recorded
    answered: int = 0                                # answer cells that hold the student's work

    @property
    def failed(self) -> bool:
        return self.notebook is None


def _norm(source) -> str:
    if isinstance(source, list):
        source = "".join(source)
    return "\n".join(line.rstrip() for line in str(source).replace("\r\n", "\n").split("\n")).strip()


def _nbgrader(cell) -> dict:
    meta = cell.get("metadata") if isinstance(cell, dict) else None
    data = meta.get("nbgrader") if isinstance(meta, dict) else None
    return data if isinstance(data, dict) else {}


def _kind(cell) -> str:
    meta = _nbgrader(cell)
    if meta.get("solution"):
        return "answer"
    if meta.get("grade") and cell.cell_type == "code":
        return "test"
    if meta.get("locked"):
        return "locked"
    tags = cell.get("metadata", {}).get("tags", [])
    return "demo" if "demo" in tags else "plain"


def read_submission(path: Path) -> tuple[nbformat.NotebookNode | None, str, list[str]]:
    """Parse a file as a notebook (any nbformat version, upgraded to 4): ``(notebook, reason, notes)``."""
    notes = []
    try:
        info = os.lstat(path)
    except OSError as exc:
        return None, f"cannot read the file: {exc.strerror}", notes
    if stat.S_ISLNK(info.st_mode):
        return None, "a symbolic link, not a file (links are not followed)", notes
    if not stat.S_ISREG(info.st_mode):
        return None, "not a regular file" + (" (a folder named like a notebook)" if stat.S_ISDIR(info.st_mode) else ""), notes
    if info.st_size > MAX_BYTES:
        return None, f"file too large ({info.st_size / 1e6:,.0f} MB; limit {MAX_BYTES / 1e6:,.0f} MB)", notes
    if info.st_size == 0:
        return None, "empty file (0 bytes)", notes
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        return None, f"cannot read the file: {exc.strerror}", notes
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"not valid JSON, so not a readable notebook (truncated or corrupted?): {str(exc)[:120]}", notes
    except RecursionError:
        return None, "not a readable notebook: its JSON is nested too deeply", notes
    if not isinstance(data, dict) or not ("cells" in data or "worksheets" in data):
        return None, "valid JSON but not a Jupyter notebook (no cells)", notes
    version = data.get("nbformat")
    try:
        nb = nbformat.reads(json.dumps(data), as_version=4)
    except RecursionError:
        return None, "not a readable notebook: its JSON is nested too deeply", notes
    except Exception as exc:  # noqa: BLE001 - any parse failure is the submission's, reported
        return None, f"not a notebook nbformat can read: {str(exc)[:160]}", notes
    if not isinstance(getattr(nb, "cells", None), list):
        return None, "not a notebook nbformat can read: no list of cells", notes
    if version != 4:
        notes.append(f"converted from nbformat {version} to 4")
    cells = [c for c in nb.cells if isinstance(c, dict) and c.get("cell_type") in ("code", "markdown", "raw")]
    for cell in cells:
        if not isinstance(cell.get("metadata"), dict):
            cell["metadata"] = {}
        source = cell.get("source", "")
        cell["source"] = "".join(str(s) for s in source) if isinstance(source, list) else str(source)
        if cell.get("outputs"):
            cell["outputs"] = []  # outputs are never graded; a huge one is simply dropped
    nb.cells = cells
    return nb, "", notes


def _match(source, release, sub) -> tuple[dict[int, int], list[str], list[str]]:
    """Map source cell index -> submission cell index. Returns (match, flags, notes)."""
    flags, notes = [], []
    graded = {c.metadata["nbgrader"]["grade_id"]: i for i, c in enumerate(source) if _nbgrader(c).get("grade_id")}
    by_id: dict[str, list[int]] = {}
    for j, cell in enumerate(sub):
        gid = _nbgrader(cell).get("grade_id")
        if isinstance(gid, str) and gid in graded and sub[j].cell_type == source[graded[gid]].cell_type:
            by_id.setdefault(gid, []).append(j)
    colab = len(by_id) < 0.5 * len(graded)
    if colab:
        notes.append("nbgrader metadata missing (a Colab-style rewrite?): cells matched to the release by content "
                     "and position")
    match, used = {}, set()
    for gid, js in by_id.items():
        match[graded[gid]] = js[0]
        used.add(js[0])
        if len(js) > 1:
            flags.append(f"cell {gid} appears {len(js)} times (every copy runs, in order)")
    # Cells the release gave the student unchanged are found by their content.
    free = lambda j: j not in used  # noqa: E731
    by_text: dict[tuple[str, str], list[int]] = {}
    for j, cell in enumerate(sub):
        by_text.setdefault((cell.cell_type, _norm(cell.source)), []).append(j)
    repaired = 0
    for i, cell in enumerate(source):
        if i in match or _kind(cell) == "answer":
            continue
        if _kind(cell) in ("test", "locked") and not colab and _nbgrader(cell).get("grade_id"):
            # metadata present elsewhere: this cell lost its own (or was deleted); an unchanged copy still counts
            candidates = [j for j in by_text.get((cell.cell_type, _norm(release[i].source)), []) if free(j)]
            if candidates:
                match[i] = candidates[0]
                used.add(candidates[0])
            continue
        candidates = [j for j in by_text.get((cell.cell_type, _norm(release[i].source)), []) if free(j)]
        if not candidates and _kind(cell) in ("plain", "demo"):
            candidates = [j for j, c in enumerate(sub) if free(j) and c.get("id") == cell.get("id")
                          and _norm(c.source) == _norm(release[i].source)]
        if candidates:
            match[i] = candidates[0]
            used.add(candidates[0])
            repaired += colab and _kind(cell) in ("test", "locked")
    if colab:  # answers: the unclaimed cell of the right type between the neighbouring matched cells
        anchors = {i: j for i, j in match.items()}  # matched before any answer is placed
        keys = sorted(anchors)
        for i, cell in enumerate(source):
            if _kind(cell) != "answer" or i in match:
                continue
            k = bisect.bisect_left(keys, i)
            lo = max((anchors[x] for x in keys[:k]), default=-1) if k else -1
            hi = min((anchors[x] for x in keys[k:]), default=len(sub))
            j = next((j for j in range(lo + 1, hi) if free(j) and sub[j].cell_type == cell.cell_type), None)
            if j is not None:
                match[i] = j
                used.add(j)
                repaired += 1
        notes.append(f"restored nbgrader metadata of {repaired} cells")
    return match, flags, notes


def prepare(path: Path, source_nb, release_nb, name: str = "") -> Prepared:
    """Rebuild ``path`` (a student's file) as a gradable notebook from ``source_nb`` (solutions, with
    hidden tests) and ``release_nb`` (what the student received)."""
    sub_nb, reason, notes = read_submission(path)
    if sub_nb is None:
        return Prepared(reason=reason, notes=notes)
    source, release, sub = source_nb.cells, release_nb.cells, sub_nb.cells
    if not sub:
        return Prepared(reason="the notebook has no cells", notes=notes, flags=["empty notebook"])
    match, flags, match_notes = _match(source, release, sub)
    notes += match_notes
    result = Prepared(flags=flags, notes=notes)

    order = [match[i] for i in sorted(match)]
    if order != sorted(order):
        result.flags.append("cells were moved out of the release's order (graded in the release's order)")
    for i, cell in enumerate(source):
        kind, gid = _kind(cell), _nbgrader(cell).get("grade_id", cell.get("id"))
        if kind in ("test", "locked") and _nbgrader(cell).get("grade_id"):
            what = "test cell" if kind == "test" else "locked cell"
            if i not in match:
                result.flags.append(f"{what} {gid} was deleted (graded with the original)")
            elif _norm(sub[match[i]].source) not in (_norm(release[i].source), _norm(cell.source)):
                result.flags.append(f"{what} {gid} was modified (graded with the original)")
        elif kind == "answer":
            if i not in match:
                result.flags.append(f"answer cell {gid} was deleted")
            elif _norm(sub[match[i]].source) != _norm(release[i].source):
                result.answered += 1

    for i, cell in enumerate(source):  # bounded answers: feedback and the formgrader render them
        if _kind(cell) == "answer" and i in match:
            limit = MAX_MARKDOWN if cell.cell_type == "markdown" else MAX_CODE
            answer = sub[match[i]]
            if len(answer.source) > limit:
                result.flags.append(f"answer cell {_nbgrader(cell).get('grade_id')} holds {len(answer.source) // 1024:,} KB; "
                                    f"cut to {limit // 1024} KB")
                answer.source = answer.source[:limit]
    matched = set(match.values())
    extras = [j for j, c in enumerate(sub) if j not in matched and c.cell_type == "code" and _norm(c.source)]
    deleted_answers = any("answer cell" in f for f in result.flags)
    if extras and deleted_answers:
        result.flags.append(f"{len(extras)} code cells of the student's own kept in place (an answer moved?)")
    elif extras:
        result.notes.append(f"{len(extras)} code cells of the student's own kept in place")

    for j in extras:
        if len(sub[j].source) > MAX_CODE:
            result.flags.append(f"a code cell of the student's own holds {len(sub[j].source) // 1024:,} KB; cut to "
                                f"{MAX_CODE // 1024} KB")
            sub[j].source = sub[j].source[:MAX_CODE]
    student_code = [sub[match[i]].source for i, c in enumerate(source) if _kind(c) == "answer" and i in match
                    and c.cell_type == "code"] + [sub[j].source for j in extras]
    for label, pattern in SUSPICIOUS.items():
        hits = sorted({m.group(0).strip() for src in student_code for m in re.finditer(pattern, src, re.M)})
        if hits:
            result.flags.append(f"suspicious code ({label}): {', '.join(hits[:4])}")
    rebound = sorted(set().union(*(rebound_builtins(src) for src in student_code)))
    if rebound:
        result.flags.append(f"suspicious code (rebinds Python's builtins): {', '.join(rebound[:6])}")

    result.notebook = _build(source_nb, release, sub, match, extras)
    return result


BUILTIN_NAMES = frozenset(name for name in dir(builtins) if not name.startswith("_"))


def rebound_builtins(source: str) -> set[str]:
    """Builtin names a cell binds in the notebook's namespace (assignment, ``def``, ``class``, import,
    loop variable...): at its top level, not inside functions, where such names are only local."""
    try:
        return bound_names(source) & BUILTIN_NAMES
    except (RecursionError, ValueError, MemoryError):  # a source too deeply nested to read
        return set()


_SCRIPT_URL = re.compile(r"(?i)\b(j\s*a\s*v\s*a\s*s\s*c\s*r\s*i\s*p\s*t|v\s*b\s*s\s*c\s*r\s*i\s*p\s*t)\s*:")


def inert_markdown(text: str) -> str:
    """A student's Markdown with its HTML shown as text and script links disarmed, so that rendering
    it (feedback pages, the formgrader) runs nothing in anyone's browser."""
    return _SCRIPT_URL.sub(lambda m: m.group(1) + "-blocked:", html.escape(text, quote=False))


def _build(source_nb, release, sub, match, extras):
    """The grading notebook: the source's cells in order, the student's answers in the answer cells,
    the student's own code cells after the cell they followed, demos left out."""
    source = source_nb.cells
    inverse = {j: i for i, j in match.items()}
    anchored: dict[int, list[int]] = {}
    extra = set(extras)
    last = -1  # the latest source cell matched so far, in the submission's order: one pass
    for j in range(len(sub)):
        if j in inverse:
            last = max(last, inverse[j])
        elif j in extra:
            anchored.setdefault(last, []).append(j)
    imports = next((i for i, c in enumerate(source) if c.get("id") == "imports"), None)
    if imports is None:
        imports = next((i for i, c in enumerate(source) if _kind(c) == "locked" and c.cell_type == "code"), 0)

    cells = []

    def add_extras(at):
        for j in anchored.get(at, []):
            cells.append(new_code_cell(sub[j].source, id=f"student-cell-{j}", metadata={"tags": ["student-added"]}))

    for i, cell in enumerate(source):
        kind = _kind(cell)
        if kind == "demo":
            pass
        elif kind == "answer":
            new = copy.deepcopy(release[i])  # the release's metadata (with nbgrader's checksum of the stub)
            if i in match:
                new.source = sub[match[i]].source
            if new.cell_type == "markdown":
                new.source = inert_markdown(new.source)
            cells.append(new)
        else:
            new = copy.deepcopy(cell)
            if kind in ("test", "locked"):
                new.metadata["nbgrader"] = copy.deepcopy(release[i].metadata.get("nbgrader", new.metadata["nbgrader"]))
            cells.append(new)
        if i == imports:
            for at in range(-1, imports + 1):
                add_extras(at)
        elif i > imports:
            add_extras(i)
    for cell in cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nbformat.v4.new_notebook(cells=cells, metadata=copy.deepcopy(source_nb.metadata))


def student_names(source_nb) -> list[str]:
    """Names the instructor's answer cells define: the judge leaves locked cells using them to the kernel."""
    names = set()
    for cell in source_nb.cells:
        if _kind(cell) == "answer" and cell.cell_type == "code":
            names |= bound_names(cell.source)
    return sorted(names)


def releases_of(root: Path, names: list[str], work: Path, url: str) -> dict:
    """The release notebooks of some assignments, with the gradebook at ``url`` told about each.
    nbgrader's generate_assignment runs (in one nbgrader process for all of them) only for the
    assignments whose instructor's notebook changed since the last run, or that the gradebook lacks;
    its output is kept in autograder/.releases/."""
    cache = root / "autograder" / ".releases"
    digests, stale = {}, []
    for name in names:
        digests[name] = hashlib.sha256((root / "solutions" / name / f"{name}.ipynb").read_bytes()).hexdigest()
        stamp, release = cache / f"{name}.sha256", cache / name / f"{name}.ipynb"
        if not (release.exists() and stamp.exists() and stamp.read_text() == digests[name]
                and gradebook.has_assignment(url, name)):
            stale.append(name)
    plan = [["generate_assignment", name, "--force", f"--CourseDirectory.release_directory={cache}"] for name in stale]
    for name, step in zip(stale, nbgrader_batch(root, plan, work) if plan else [], strict=True):
        if step["returncode"] != 0:
            raise SystemExit(f"nbgrader generate_assignment {name} failed:\n{step['log']}")
        (cache / f"{name}.sha256").write_text(digests[name])
    return {name: nbformat.read(cache / name / f"{name}.ipynb", as_version=4) for name in names}


def jobs(root: Path, submissions: list[Submission], sources: dict, work: Path, limits: Job
         ) -> list[tuple[Job, Submission]]:
    """A job for every submission that can be graded, with ``limits``'s settings, its notebook written
    into a private folder under ``work``; each file is also kept as received in autograder/originals/.
    A submission that cannot be prepared is marked failed, with the reason. ``sources`` maps each
    assignment to its (instructor's notebook, release)."""
    out = []
    for sub in submissions:
        source, release = sources[sub.assignment]
        originals = root / "autograder" / "originals" / sub.student / sub.assignment
        shutil.rmtree(originals, ignore_errors=True)
        originals.mkdir(parents=True)
        if sub.status == "failed":  # an archive entry that could not be read
            continue
        try:
            shutil.copyfile(sub.file, originals / Path(sub.file).name, follow_symlinks=False)
        except OSError:
            pass
        try:
            prepared = prepare(Path(sub.file), source, release)
        except Exception as exc:  # noqa: BLE001 - a submission we failed to understand is reported
            prepared = Prepared(reason=f"could not be prepared for grading ({type(exc).__name__}: {exc})")
        sub.flags += prepared.flags
        sub.notes += prepared.notes
        if prepared.failed:
            sub.status, sub.reason = "failed", prepared.reason
            continue
        folder = work / "jobs" / f"job-{len(out):05d}"
        folder.mkdir(parents=True)
        folder.chmod(0o700)
        nbformat.write(prepared.notebook, folder / "grading.ipynb")
        job = replace(limits, folder=str(folder), notebook=str(folder / "grading.ipynb"),
                      output=str(folder / "executed.ipynb"), result=str(folder / "result.json"),
                      student=sub.student, assignment=sub.assignment,
                      student_names=tuple(student_names(source)), left_out=tuple(oracles.left_out(source)))
        out.append((job, sub))
    return out

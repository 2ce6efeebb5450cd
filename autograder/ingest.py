"""Stage 1, ingest: read the input (a folder or a zip, as learning platforms export them) and find in
it every student's submission of every assignment, each with a stable gradebook id. Reading never
stops the run: a file that cannot be graded becomes a failed or skipped row, with the reason."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import unicodedata
import zipfile
from pathlib import Path

from autograder import prepare as prep
from autograder.records import Submission

ZIP_LIMIT_BYTES = 4 << 30
ZIP_LIMIT_FILES = 20_000
SYSTEM_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}
SKIPPED_DUPLICATE = "the archive holds a later entry with the same name, which was graded instead"
SKIPPED_FOLDERS = {".ipynb_checkpoints": "a Jupyter checkpoint copy, not a submission",
                   "__MACOSX": "macOS archive metadata", ".git": "a git repository's internals"}


def _safe(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", ascii_text).strip("._-")


def student_ids(names: list[str]) -> dict[str, str]:
    """A gradebook id for every distinct name. A name that is already a safe, lower-case id (ASCII
    letters, digits, ``_.@-``, at most 48 characters, no leading dot) is its own id; any other name
    (``José``, ``alice bob``, ``Alice``, a 70-character name, ``.dotted``) becomes its transliteration
    plus a hash of the original. So an id depends only on its name (re-grading, or a new student
    called ``Alice`` beside ``alice``, never renames anyone), and two names never share an id, even
    on a case-insensitive disk. Only a name crafted to equal another's hashed id gets a number."""
    def hashed(name):
        return f"{_safe(name)[:40] or 'student'}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"

    ids, taken = {}, set()
    for name in sorted(set(names)):
        plain = _safe(name) == name and name == name.lower() and 0 < len(name) <= 48
        sid = name if plain else hashed(name)
        base, n = sid, 2
        while sid.lower() in taken:
            sid, n = f"{base}-{n}", n + 1
        ids[name] = sid
        taken.add(sid.lower())
    return ids


def extract_zip(path: Path, target: Path) -> tuple[list[str], dict[str, str]]:
    """Extract safely: no absolute paths, no '..', no links, bounded size and count. An entry that
    cannot be read (bad CRC, encrypted, unknown compression) is left out and named in the result.
    Returns (notes, {entry name: why it could not be read})."""
    notes, broken = [], {}
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise SystemExit(f"{path} cannot be opened as a zip archive: {exc}") from None
    with archive:
        members = archive.infolist()
        if len(members) > ZIP_LIMIT_FILES:
            raise SystemExit(f"{path.name} holds {len(members):,} files (limit {ZIP_LIMIT_FILES:,})")
        if sum(m.file_size for m in members) > ZIP_LIMIT_BYTES:
            raise SystemExit(f"{path.name} would unpack to more than {ZIP_LIMIT_BYTES >> 30} GB")
        last = {m.filename: i for i, m in enumerate(members)}
        for i, member in enumerate(members):
            name = Path(member.filename)
            if member.is_dir():
                continue
            if last[member.filename] != i:  # a later entry of the same name wins; this one is reported
                broken[f"{member.filename} (entry {i + 1})"] = SKIPPED_DUPLICATE
                continue
            if name.is_absolute() or ".." in name.parts or (member.external_attr >> 16) & 0o170000 == 0o120000:
                notes.append(f"skipped unsafe archive entry {member.filename!r}")
                broken[member.filename] = "an unsafe archive entry (absolute path, '..' or a link): not extracted"
                continue
            out = target / name
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except Exception as exc:  # noqa: BLE001 - bad CRC, encryption, compression, a clash with a folder
                out.unlink(missing_ok=True) if out.is_file() else None
                broken[name.as_posix()] = f"the archive entry could not be read ({type(exc).__name__}: {str(exc)[:120]})"
    return notes, broken


def _content_assignment(path: Path, sources: dict) -> str | None:
    """Which assignment a notebook is, from its cells (grade ids, or sources when metadata was lost)."""
    nb, _, _ = prep.read_submission(path)
    if nb is None:
        return None
    ids = {prep._nbgrader(c).get("grade_id") for c in nb.cells}
    texts = {prep._norm(c.source) for c in nb.cells}
    best, best_score = None, 0
    for name, source in sources.items():  # locked cells read the same in the source and the release
        score = sum(1 for c in source.cells if prep._nbgrader(c).get("grade_id") in ids)
        score += sum(1 for c in source.cells if prep._kind(c) == "locked" and prep._norm(c.source) in texts)
        if score > best_score:
            best, best_score = name, score
    return best


def _walk(folder: Path):
    """Every entry under ``folder`` without following links: (relative path, kind, why skipped)."""
    for top, dirs, files in os.walk(folder, followlinks=False):
        rel_top = Path(top).relative_to(folder)
        for d in list(dirs):
            rel = rel_top / d
            full = Path(top) / d
            if full.is_symlink():
                dirs.remove(d)
                yield rel, "skip", "a symbolic link, not followed"
            elif d in SKIPPED_FOLDERS:
                dirs.remove(d)
                for sub_top, _, sub_files in os.walk(full, followlinks=False):
                    for f in sub_files:
                        yield Path(sub_top).relative_to(folder) / f, "skip", SKIPPED_FOLDERS[d]
            elif d.endswith(".ipynb"):
                yield rel, "broken", "a folder named like a notebook, not a notebook"
        for f in files:
            rel = rel_top / f
            try:
                mode = os.lstat(Path(top) / f).st_mode
            except OSError as exc:
                yield rel, "broken" if f.endswith(".ipynb") else "skip", f"cannot be read: {exc.strerror}"
                continue
            if stat.S_ISLNK(mode):
                yield rel, "skip", "a symbolic link, not followed"
            elif not stat.S_ISREG(mode):
                yield rel, "skip", "not a regular file"
            elif f in SYSTEM_FILES or f.startswith("._"):
                yield rel, "skip", "an operating system's metadata file"
            elif not f.endswith(".ipynb"):
                yield rel, "skip", "not a notebook (.ipynb)"
            else:
                yield rel, "notebook", ""


def _student_of(rel: Path, assignment: str | None, skipped: bool = False) -> str:
    """The student an export entry belongs to: its top folder, or its file name less the assignment's
    (``alice_05_quantization.ipynb``). A skipped entry in a system folder (``__MACOSX``) has none."""
    if len(rel.parts) > 1:
        top = rel.parts[0]
        return "" if skipped and (top in SKIPPED_FOLDERS or top.startswith(".")) else top
    stem = rel.name[:-len(".ipynb")] if rel.name.endswith(".ipynb") else rel.name
    student = stem.replace(assignment, "") if assignment else stem
    student = student.strip("_- .") or stem
    return "" if skipped and (rel.name in SYSTEM_FILES or rel.name.startswith(".")) else student


def discover(folder: Path, names: list[str], sources: dict, broken: dict[str, str] | None = None
             ) -> tuple[list[Submission], list[Submission], list[str]]:
    """Find (student, assignment, file) in an export folder: (submissions, skipped entries, notes).
    ``broken`` names archive entries that could not be extracted; they become failed submissions."""
    entries = [(rel, kind, why) for rel, kind, why in _walk(folder)]
    entries += [(Path(name), "skip" if why == SKIPPED_DUPLICATE else "broken", why)
                for name, why in sorted((broken or {}).items())]
    skipped, found, notes = [], {}, []
    for rel, kind, why in entries:
        text = rel.as_posix()
        named = [n for n in names if n in text]
        assignment = max(named, key=len) if named else (names[0] if len(names) == 1 else None)
        if kind == "skip":
            skipped.append(Submission("", assignment or "", text, name=_student_of(rel, assignment, skipped=True),
                                      status="skipped", reason=why))
            continue
        if assignment is None and kind == "notebook":
            assignment = _content_assignment(folder / rel, sources)
        student = _student_of(rel, assignment)
        if assignment is None:
            skipped.append(Submission("", "", text, name=student, status="skipped",
                                      reason="cannot tell which assignment this is"))
            continue
        found.setdefault((student, assignment), []).append((rel, kind, why))
    ids = student_ids([student for student, _ in found])
    for row in skipped:  # the same id a graded row of that name has (or would have)
        row.student = (ids.get(row.name) or student_ids([*ids, row.name])[row.name]) if row.name else ""
    submissions = []
    for (student, assignment), items in sorted(found.items()):
        def mtime(item):
            try:
                return os.lstat(folder / item[0]).st_mtime if item[1] == "notebook" else -1.0
            except OSError:
                return -1.0

        chosen = max(items, key=lambda item: (mtime(item), item[0].as_posix()))
        sub = Submission(ids[student], assignment, str(folder / chosen[0]), name=student)
        if chosen[1] == "broken":
            sub.status, sub.reason = "failed", chosen[2]
        if ids[student] != student:
            sub.notes.append(f"student {student!r} is graded as {ids[student]!r}")
        for other in items:
            if other is not chosen:
                sub.flags.append(f"{len(items)} files for this assignment; graded the newest ({chosen[0].as_posix()})")
                skipped.append(Submission(ids[student], assignment, other[0].as_posix(), name=student, status="skipped",
                                          reason=f"an older file for the same student and assignment; graded "
                                                 f"{chosen[0].as_posix()}"))
        submissions.append(sub)
    return submissions, skipped, notes


def read_input(inputs: Path, work: Path) -> tuple[Path, list[str], dict[str, str]]:
    """The folder to read: ``inputs`` itself, or a zip extracted into ``work``. Returns (folder, notes,
    {archive entry: why it could not be read})."""
    if inputs.is_file() and zipfile.is_zipfile(inputs):
        folder = work / "unzipped"
        folder.mkdir()
        notes, broken = extract_zip(inputs, folder)
        return folder, notes, broken
    if inputs.is_dir():
        return inputs, [], {}
    raise SystemExit(f"{inputs} is neither a folder nor a zip file")

"""Reading an export never stops and never loses a file: random corruptions of a valid export, read
the way the grading command reads it (`autograder.ingest.discover` and `autograder.prepare.prepare`, no
kernels), always complete, and every entry of the export is graded, failed or skipped with a reason.
Also: student ids are unique and stable, and preparing a huge notebook stays fast."""

from __future__ import annotations

import os
import random
import sys
import time
import unicodedata
from pathlib import Path

import nbformat
import pytest

from notebooks import COURSE, ROOT, SOLUTIONS

sys.path.insert(0, str(ROOT))
from autograder import prepare as prep  # noqa: E402
from autograder.ingest import discover, student_ids  # noqa: E402

NAME = "01_memory_math"
SOURCE = nbformat.read(SOLUTIONS / NAME / f"{NAME}.ipynb", as_version=4)
RELEASE = nbformat.read(COURSE / NAME / f"{NAME}.ipynb", as_version=4)
VALID = (COURSE / NAME / f"{NAME}.ipynb").read_text()


def _truncate(path, rng):
    data = path.read_bytes()
    path.write_bytes(data[: rng.randrange(len(data))])


def _flip_bytes(path, rng):
    data = bytearray(path.read_bytes())
    for _ in range(rng.randrange(1, 50)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    path.write_bytes(bytes(data))


def _dangling_link(path, rng):
    path.unlink()
    path.symlink_to(path.parent / "nowhere.ipynb")


def _link_to_secret(path, rng):
    path.unlink()
    path.symlink_to("/etc/passwd")


def _fifo(path, rng):
    path.unlink()
    os.mkfifo(path)


def _folder(path, rng):
    path.unlink()
    path.mkdir()
    (path / "inside.txt").write_text("x")


def _deep(path, rng):
    depth = rng.choice([1_000, 100_000])
    path.write_text('{"cells": ' + "[" * depth + "]" * depth + "}")


def _empty(path, rng):
    path.write_bytes(b"")


def _not_utf8(path, rng):
    path.write_bytes(b"\xff\xfe" + os.urandom(200))


def _json_but_not_a_notebook(path, rng):
    path.write_text(rng.choice(['{"cells": 3}', '{"cells": [1, "x", null]}', "[]", '"text"', '{"worksheets": {}}',
                                '{"cells": [{"cell_type": "code", "source": 5, "metadata": 7}]}']))


def _junk_beside(path, rng):
    (path.parent / rng.choice([".DS_Store", "._note", "readme.md", "Thumbs.db"])).write_text("junk")


def _checkpoint_copy(path, rng):
    folder = path.parent / ".ipynb_checkpoints"
    folder.mkdir(exist_ok=True)
    (folder / f"{NAME}-checkpoint.ipynb").write_text(VALID)


def _duplicate(path, rng):
    (path.parent / f"copy_{NAME}.ipynb").write_text(VALID)


def _unicode_name(path, rng):
    target = path.parent.parent / unicodedata.normalize(rng.choice(["NFC", "NFD"]), "Zoë " + rng.choice("αβγ"))
    if not target.exists():
        path.parent.rename(target)


CORRUPTIONS = [_truncate, _flip_bytes, _dangling_link, _link_to_secret, _fifo, _folder, _deep, _empty, _not_utf8,
               _json_but_not_a_notebook, _junk_beside, _checkpoint_copy, _duplicate, _unicode_name]


def _entries(folder: Path) -> set[str]:
    """Every file-like entry of the export (links and special files too), as relative paths."""
    found = set()
    for top, dirs, files in os.walk(folder, followlinks=False):
        for name in files + [d for d in dirs if d.endswith(".ipynb") or (Path(top) / d).is_symlink()]:
            found.add((Path(top) / name).relative_to(folder).as_posix())
    return found


@pytest.mark.parametrize("seed", range(30))
def test_random_corruptions_never_stop_reading_and_lose_nothing(tmp_path, seed):
    rng = random.Random(seed)
    folder = tmp_path / "export"
    for i in range(6):
        (folder / f"student{i}").mkdir(parents=True)
        (folder / f"student{i}" / f"{NAME}.ipynb").write_text(VALID)
    (folder / f"loose_{NAME}.ipynb").write_text(VALID)
    for _ in range(rng.randrange(1, 8)):
        notebooks = [p for p in folder.rglob("*.ipynb") if p.is_file() and not p.is_symlink()
                     and ".ipynb_checkpoints" not in p.parts]
        if notebooks:
            rng.choice(CORRUPTIONS)(rng.choice(notebooks), rng)
    submissions, skipped, _ = discover(folder, [NAME], {NAME: SOURCE})
    for sub in submissions:
        if sub.status != "failed":
            prepared = prep.prepare(Path(sub.file), SOURCE, RELEASE)
            assert prepared.failed == (prepared.notebook is None)
            assert prepared.notebook is not None or prepared.reason
    reported = {Path(s.file).relative_to(folder).as_posix() if Path(s.file).is_absolute() else s.file
                for s in submissions + skipped}
    missing = _entries(folder) - reported
    assert not missing, f"entries missing from the report: {missing}"
    assert all(s.reason for s in skipped)
    ids = [s.student for s in submissions]
    assert len(ids) == len(set(ids)), "one row per student and assignment"


def test_student_ids_are_unique_stable_and_safe():
    names = ["alice", "Alice", "alice bob", "alice_bob", "José", "Jose", "José".encode().decode(), "Zoë",
             unicodedata.normalize("NFD", "Zoë"), "a" * 80 + "1", "a" * 80 + "2", ".hidden", "李雷", "韩梅梅", "",
             "x/y", "../up", "alice_bob-00000000"]
    ids = student_ids(names)
    assert len(set(ids.values())) == len(set(names))
    assert len({i.lower() for i in ids.values()}) == len(set(names)), "unique even on a case-insensitive disk"
    assert ids == student_ids(list(reversed(names))), "the same names give the same ids, whatever the order"
    assert ids["alice_bob"] == "alice_bob" and ids["alice bob"].startswith("alice_bob-")
    assert ids["alice"] == "alice" and ids["Alice"].startswith("Alice-"), "a name with capitals gets a hash"
    assert student_ids(["alice", "bob"]) == {"alice": "alice", "bob": "bob"}
    assert student_ids(["alice"])["alice"] == student_ids(["alice", "Alice", "ALICE"])["alice"], \
        "a new name beside an old one never renames the old one"
    for sid in ids.values():
        assert sid and len(sid) <= 60 and all(c.isascii() and (c.isalnum() or c in "_.@-") for c in sid), sid
        assert not sid.startswith(".")


def test_preparing_a_huge_notebook_is_linear(tmp_path):
    """20,000 extra cells took 31 s when matching was quadratic. Four times the cells must take well
    under sixteen times as long (linear measured 4.5x, 2,000 -> 8,000 cells; best of two runs of the
    small one, whose time noise matters most)."""
    def best_seconds(extra: int, runs: int) -> float:
        nb = nbformat.reads(VALID, as_version=4)
        nb.cells += [nbformat.v4.new_code_cell(f"x{i} = {i}") for i in range(extra)]
        path = tmp_path / f"huge-{extra}.ipynb"
        nbformat.write(nb, path)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            prepared = prep.prepare(path, SOURCE, RELEASE)
            times.append(time.perf_counter() - start)
        assert prepared.notebook is not None
        assert sum("student-added" in c.metadata.get("tags", []) for c in prepared.notebook.cells) == extra
        return min(times)

    small, large = best_seconds(2_000, runs=2), best_seconds(8_000, runs=1)
    assert large < 9 * small + 1, f"2,000 cells: {small:.2f} s, 8,000 cells: {large:.2f} s (quadratic?)"


def test_skipped_and_failed_rows_name_their_student(tmp_path):
    """A skipped or failed row carries the student's id and name, found as for a graded row."""
    folder = tmp_path / "export"
    for student in ("alice", "Bob Smith", "carol"):
        (folder / student).mkdir(parents=True)
    (folder / "alice" / f"{NAME}.ipynb").write_text(VALID)
    (folder / "Bob Smith" / f"{NAME}.ipynb").symlink_to("/etc/passwd")      # skipped: a link
    (folder / "carol" / f"{NAME}.ipynb").write_text("{ not json")            # failed later, when read
    (folder / "carol" / "notes.txt").write_text("x")                         # skipped: not a notebook
    (folder / f"dave_{NAME}.ipynb").symlink_to(folder / "alice" / f"{NAME}.ipynb")
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._alice").write_text("x")
    submissions, skipped, _ = discover(folder, [NAME], {NAME: SOURCE})
    rows = {s.file if not Path(s.file).is_absolute() else Path(s.file).relative_to(folder).as_posix(): s
            for s in submissions + skipped}
    bob = rows[f"Bob Smith/{NAME}.ipynb"]
    assert bob.status == "skipped" and bob.name == "Bob Smith" and bob.student.startswith("Bob_Smith-"), bob
    assert (rows["carol/notes.txt"].name, rows["carol/notes.txt"].student) == ("carol", "carol")
    assert rows[f"carol/{NAME}.ipynb"].student == "carol"
    dave = rows[f"dave_{NAME}.ipynb"]
    assert (dave.status, dave.name, dave.student, dave.assignment) == ("skipped", "dave", "dave", NAME)
    assert rows["__MACOSX/._alice"].student == "" and rows["__MACOSX/._alice"].name == ""

"""Which answers use the tests' reference code, read from the notebook's source in the grader.

The tests compare a student's answer with a reference (`peftlab.reference`: the real libraries, or
the lab's own prediction). An answer that calls that reference, or the library the reference wraps
where an exercise asks for the student's own implementation, has not done the exercise: every test
that calls it scores no points and the grading report flags it, so that a person can look.

What counts, per notebook:

- ``peftlab.reference``, everywhere;
- what the instructor's notebook lists in its metadata, ``{"peftlab": {"answers_must_not_use": [...]}}``:
  dotted names of modules or their members (``"peft"`` in the notebooks whose exercises rebuild
  peft, ``"peftlab.lab"`` in the lab, whose functions hold the reference prediction).

An answer cell or a code cell of the student's own uses a listed name when it imports it, names it
through an imported module (``lab.predict_for``, ``hardware.precision``), loads a reference function by
its bare name, or spells the name in a string (``importlib.import_module("peftlab.reference")``,
``getattr(peftlab, "reference")``). A cell that uses a name bound by such a cell uses it too.

The reading itself is `peftlab.rules`, which the notebooks' visible tests share; here it is applied in
the grader to the prepared notebook. It complements, and
does not replace, the sandbox, in which `peftlab.reference` is replaced by stubs that raise
(`autograder.sandbox`), so that code that hides its way there still finds nothing to call.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

from peftlab.rules import REFERENCE, _imports, bound_names, direct_use, free_names, reference_names

META_KEY = "answers_must_not_use"


@dataclass
class Use:
    """Result of `find`: student-bound name -> why it counts, cell id -> why."""

    names: dict[str, str] = field(default_factory=dict)
    cells: dict[str, str] = field(default_factory=dict)

    def zeroed(self, test_source: str) -> tuple[str, str] | None:
        """``(name, why)`` when a test cell calls a name that uses the reference, else None."""
        for name in sorted(free_names(test_source) & set(self.names)):
            return name, self.names[name]
        return None


def forbidden(nb) -> list[str]:
    meta = nb.get("metadata", {}).get("peftlab", {}) if isinstance(nb.get("metadata"), dict) else {}
    listed = meta.get(META_KEY, []) if isinstance(meta, dict) else []
    return [REFERENCE] + [str(name) for name in listed if isinstance(name, str) and name]


def left_out(nb) -> list[str]:
    """The libraries the notebook's kernel runs without in the grading sandbox: those its metadata
    lists whole (an entry with no dot: ``"peft"``, not ``"peft.tuners"``), so that no name built at
    run time, which the reading of the source cannot follow, reaches them either. The notebook's own
    cells must then not import them, demonstrations (never graded) excepted."""
    return sorted({name for name in forbidden(nb)[1:] if "." not in name and name != "peftlab"})


def _kind(cell) -> str:
    meta = cell.get("metadata", {})
    nbgrader = meta.get("nbgrader", {}) if isinstance(meta.get("nbgrader"), dict) else {}
    if nbgrader.get("solution"):
        return "student"
    if "student-added" in (meta.get("tags") or []):
        return "student"
    if nbgrader.get("grade") and not nbgrader.get("solution"):
        return "test"
    return "instructor"


def find(nb) -> Use:
    """Which of the notebook's student cells (answers, and code cells of the student's own) use a
    listed name, directly or through a name another such cell binds."""
    entries = forbidden(nb)
    references = reference_names()
    origins: dict[str, str] = {}
    student = []
    for index, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else str(source)
        kind = _kind(cell)
        if kind == "instructor":
            try:
                origins.update(_imports(ast.parse(source)))
            except SyntaxError:
                pass
        elif kind == "student":
            student.append((str(cell.get("id") or f"cell {index}"), source, bound_names(source), free_names(source)))
    own = set().union(*(bound for _, _, bound, _ in student)) if student else set()
    use = Use()
    for cell_id, source, bound, _ in student:
        if why := direct_use(source, origins, entries, own, references):
            use.cells[cell_id] = why
    changed = True
    while changed:  # a cell that uses what a flagged cell binds is flagged too
        changed = False
        for cell_id, source, bound, free in student:
            if cell_id not in use.cells:
                hit = sorted(free & set(use.names))
                if hit:
                    use.cells[cell_id] = f"uses {hit[0]}, which {use.names[hit[0]]}"
                    changed = True
            if cell_id in use.cells:
                for name in bound:
                    if name not in use.names:
                        use.names[name] = use.cells[cell_id]
                        changed = True
    return use

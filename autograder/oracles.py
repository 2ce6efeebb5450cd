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

This is a reading of the source, made in the grader from the prepared notebook; it complements, and
does not replace, the sandbox, in which `peftlab.reference` is replaced by stubs that raise
(`autograder.sandbox`), so that code that hides its way there still finds nothing to call.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

REFERENCE = "peftlab.reference"
META_KEY = "answers_must_not_use"
_DOTTED = re.compile(r"[A-Za-z_][\w.]*")


def _reference_names() -> frozenset[str]:
    try:
        from peftlab import reference
    except Exception:  # noqa: BLE001 - the grader still reads imports and strings without it
        return frozenset()
    return frozenset(getattr(reference, "__all__", ()))


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


def _matches(dotted: str, entries: list[str]) -> str | None:
    for entry in entries:
        if dotted == entry or dotted.startswith(entry + "."):
            return entry
    return None


def _imports(tree) -> dict[str, str]:
    """name -> dotted origin, for the imports at any level of ``tree``."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    found[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    found[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                found[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return found


def _docstrings(tree) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _patched(tree) -> set[int]:
    """Nodes that only name what an assignment replaces (``transformers.X.y = ...``): patching a library is
    tampering, which other flags report, not using it for an answer."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
            found |= {id(inner) for inner in ast.walk(node.value)}
    return found


def _chain(node) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None when the base is not a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id] + parts[::-1]
    return None


def direct_use(source: str, origins: dict[str, str], entries: list[str], own: set[str],
               reference_names: frozenset[str] = frozenset()) -> str | None:
    """Why ``source`` uses a listed name by itself (None when it does not). ``origins``: what the
    notebook's own imports bound; ``own``: names the student's cells bind (never counted bare)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    local = {**origins, **_imports(tree)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _matches(alias.name, entries):
                    return f"imports {alias.name}"
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if _matches(f"{node.module}.{alias.name}", entries):
                    return f"imports {alias.name} from {node.module}"
    strings = _docstrings(tree)
    patched = _patched(tree)
    for node in ast.walk(tree):
        if id(node) in patched:
            continue
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            chain = _chain(node)
            if chain and chain[0] in local:
                dotted = ".".join([local[chain[0]]] + chain[1:])
                if _matches(dotted, entries):
                    return f"uses {'.'.join(chain)} ({dotted})"
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if node.id in local and _matches(local[node.id], entries):
                return f"uses {node.id} ({local[node.id]})"
            if node.id in reference_names and node.id not in own and node.id not in local:
                return f"calls {node.id} of {REFERENCE}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in strings:
            text = node.value.strip()
            if _DOTTED.fullmatch(text) and (_matches(text, entries) or text == REFERENCE.rsplit(".", 1)[-1]):
                return f"names {text!r} in a string"
    return None


def free_names(source: str) -> set[str]:
    """Names a cell loads but never binds itself (arguments, locals and definitions excluded)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    loaded, bound = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {a.asname or a.name.split(".")[0] for a in node.names}
    return loaded - bound


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
    from autograder.judge import bound_names

    entries = forbidden(nb)
    reference_names = _reference_names()
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
        if why := direct_use(source, origins, entries, own, reference_names):
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

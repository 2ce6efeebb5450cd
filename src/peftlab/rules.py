"""The rule every graded answer keeps: it is the student's own work, not the tests' reference code
(`peftlab.reference`) nor the library its exercise rebuilds (each notebook lists those in its metadata,
``answers_must_not_use``, and declares them in its imports cell with `answers_must_not_use`).

One reading of the source serves both sides: the grader (`autograder.oracles`, over the notebook it
prepared) and a notebook's visible tests (`check_observed`, over the cells the kernel has run), so that
a learner in JupyterLab or Colab meets the rule, with the same message, before any grading does.

A cell uses a listed name when it imports it, names it through an imported module
(``lab.predict_for``, ``hardware.precision``), loads a reference function by its bare name, or spells
the name in a string (``importlib.import_module("peftlab.reference")``). A name a test calls uses it
when the cell that defines it does, directly or through another name defined in the notebook.
"""

from __future__ import annotations

import ast
import functools
import re

REFERENCE = "peftlab.reference"
_DOTTED = re.compile(r"[A-Za-z_][\w.]*")
_DECLARED: list[str] = []


@functools.lru_cache(maxsize=1024)
def _parse(source: str) -> ast.Module | None:
    """A cell's syntax tree (None when it does not parse), read once: a notebook's visible tests read
    the same cells again at every call. Callers never change the tree."""
    try:
        return ast.parse(source)
    except SyntaxError:
        return None


def reference_names() -> frozenset[str]:
    """The public names of the tests' reference module (bare calls of them count as using it)."""
    try:
        from peftlab import reference
    except Exception:  # noqa: BLE001 - the source can still be read for imports and strings without it
        return frozenset()
    return frozenset(getattr(reference, "__all__", ()))


def message(name: str, why: str) -> str:
    """What a test that calls ``name`` says, in a notebook and in the grader's feedback."""
    return (f"{name} {why}: an answer must be your own work, not the tests' reference code or the library "
            "its exercise rebuilds, so it scores no points for this test")


def bound_names(source: str) -> set[str]:
    """Names a cell binds in the notebook's namespace (definitions, assignments, imports at its top
    level, not the local variables of the functions it defines)."""
    tree = _parse(source)
    if tree is None:
        return set()
    names = set()

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            return
        if isinstance(node, ast.Lambda):
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


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
    tree = _parse(source)
    if tree is None:
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
    free = _free(tree)  # a name the cell binds itself (an argument, a local) is not the reference's
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
            if node.id in reference_names and node.id in free and node.id not in own and node.id not in local:
                return f"calls {node.id} of {REFERENCE}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in strings:
            text = node.value.strip()
            if _DOTTED.fullmatch(text) and (_matches(text, entries) or text == REFERENCE.rsplit(".", 1)[-1]):
                return f"names {text!r} in a string"
    return None


def free_names(source: str) -> set[str]:
    """Names a cell loads but never binds itself (arguments, locals and definitions excluded)."""
    tree = _parse(source)
    return _free(tree) if tree is not None else set()


def _free(tree) -> set[str]:
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


def _defined(source: str) -> set[str]:
    """Names a cell binds other than by importing them."""
    tree = _parse(source)
    return bound_names(source) - set(_imports(tree)) if tree is not None else set()


def observed_names(test_source: str) -> set[str]:
    """The global names the ``@observe`` functions of a test cell load: what the test calls of the answers."""
    tree = _parse(test_source)
    names = set()
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id == "observe"
                for d in node.decorator_list):
            names |= _free(ast.Module(body=node.body, type_ignores=[])) - {a.arg for a in node.args.args}
    return names


def global_names(code) -> set[str]:
    """The global names a function's code (and the code nested in it) loads: not its attributes."""
    import dis

    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            names |= global_names(const)
    return names


def violation(names: set[str], cells: list[str], entries: list[str],
              references: frozenset[str] = frozenset()) -> tuple[str, str] | None:
    """``(name, why)`` when one of ``names`` (what a test's @observe function loads) is defined by one of
    ``cells`` (the cells run before the test, in order) that uses a listed name, directly or through
    another name defined there; None otherwise."""
    origins, definers = {}, {}
    for source in cells:
        tree = _parse(source)
        if tree is None:
            continue
        origins.update(_imports(tree))
        for name in _defined(source):
            definers[name] = source
    own, memo = set(definers), {}

    def why_of(name: str) -> str | None:
        if name in memo:
            return memo[name]
        memo[name] = None  # a cycle uses nothing more
        source = definers[name]
        why = direct_use(source, origins, entries, own, references)
        for other in ([] if why else sorted((free_names(source) & own) - {name})):
            if inner := why_of(other):
                why = f"uses {other}, which {inner}"
                break
        memo[name] = why
        return why

    for name in sorted(set(names) & own):
        if why := why_of(name):
            return name, why
    return None


def answers_must_not_use(*entries: str) -> None:
    """Declare a notebook's rule (its imports cell does): what an answer must not use, besides the tests'
    reference code. Each visible test then checks the answers it calls (`check_observed`)."""
    _DECLARED[:] = [REFERENCE, *entries]


def check_observed(func) -> None:
    """In a notebook: fail the running test when its @observe function ``func`` calls an answer that breaks
    the declared rule. The cells are IPython's input history, the running test cell last; outside IPython
    nothing is checked."""
    if not _DECLARED:
        return
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    history = list(shell.user_ns.get("In", [])) if shell is not None else []
    if len(history) < 2:
        return
    hit = violation(global_names(func.__code__), history[:-1], list(_DECLARED), reference_names())
    if hit:
        raise AssertionError(message(*hit))

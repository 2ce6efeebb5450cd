"""The GPU lab's decisions on the GPUs learners have, with faked devices: torch.cuda's device queries
patched to report a T4 (7.5, 15 GiB), an A100 (8.0, 40 or 80 GiB), an H100 (9.0, 80 GiB) or two GPUs,
for Llama-3.2-1B, Llama-3.2-3B and Llama-3-8B built on the meta device. The memory model's terms are
checked against the models' own counts; its activations against what autograd really keeps."""

from __future__ import annotations

import types

import pytest
import torch

from peftlab import hardware, lab, reference
from peftlab.hardware import GiB, KNOWN_GPUS, Device
from peftlab.models import family_config, tiny_llama

MODELS = ["Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B"]  # Llama-3-8B has Llama-3.1-8B's architecture


@pytest.fixture()
def fake_gpu(monkeypatch):
    """Make torch.cuda report ``device`` (``count`` of them); record set_device and peak resets."""
    calls = []

    def install(device: Device, count: int = 1):
        props = types.SimpleNamespace(name=device.name, major=device.capability[0], minor=device.capability[1],
                                      total_memory=device.total_memory)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # the T4 trap
        monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: calls.append(("reset_peak", None)))
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (device.total_memory // 10, device.total_memory))
        return calls

    return install


@pytest.mark.parametrize("name, expected", [("T4", "fp16"), ("A100-40GB", "bf16"), ("A100-80GB", "bf16"), ("H100", "bf16")])
def test_precision_comes_from_compute_capability(fake_gpu, name, expected):
    fake_gpu(KNOWN_GPUS[name])
    device = hardware.current_device()
    assert device.capability == KNOWN_GPUS[name].capability and device.total_memory == KNOWN_GPUS[name].total_memory
    assert hardware.precision(device) == expected, "a T4 reports bf16 'supported' only by emulation: fp16 there"
    env = lab.environment()
    assert env["precision"] == expected and env["cuda"] and env["memory_gib"] == pytest.approx(device.total_memory / GiB)
    flags = lab.precision_flags(env)
    assert (flags["bf16"], flags["fp16"], flags["use_cpu"]) == (expected == "bf16", expected == "fp16", False)
    assert flags["optim"] == "paged_adamw_8bit"
    from peftlab.training import fast_bf16

    assert fast_bf16(torch.device("cuda")) == (expected == "bf16")
    from peftlab.env import device_summary

    assert f"compute capability {device.capability[0]}.{device.capability[1]}, {expected}" in device_summary()


def test_a_cpu_computes_in_fp32_with_plain_adamw():
    device = hardware.cpu_device()
    assert hardware.precision(device) == "fp32" and hardware.optimizer_for(device, True) == "adamw_torch"
    flags = lab.precision_flags({"cuda": False, "_device": device})
    assert flags == {"bf16": False, "fp16": False, "use_cpu": True, "optim": "adamw_torch"}


def _predictor(config, load_in_4bit=True, seq_len=512, optimizer="paged_adamw_8bit", dtype=torch.bfloat16):
    def predict(batch, checkpointing):
        return reference.predict_peak_bytes(config, batch_size=batch, seq_len=seq_len, r=16, load_in_4bit=load_in_4bit,
                                           compute_dtype=dtype, optimizer=optimizer,
                                           gradient_checkpointing=checkpointing, lora_dropout=0.05)["total"]
    return predict


@pytest.mark.parametrize("gpu", list(KNOWN_GPUS))
@pytest.mark.parametrize("model", MODELS)
def test_training_settings_fit_each_gpu(gpu, model):
    device = KNOWN_GPUS[gpu]
    config = family_config(model)
    dtype = hardware.compute_dtype(device)
    predict = _predictor(config, dtype=dtype)
    chosen = reference.training_settings(device, predict)
    budget = device.total_memory * 0.9 - hardware.CUDA_CONTEXT_BYTES
    assert chosen["precision"] == hardware.precision(device) and chosen["optimizer"] == "paged_adamw_8bit"
    batch, checkpointing = chosen["batch_size"], chosen["gradient_checkpointing"]
    assert batch >= 1, f"{model} in QLoRA fits {gpu} with at least one sequence of 512 tokens"
    assert predict(batch, checkpointing) <= budget, "the chosen batch fits"
    if not checkpointing:
        assert batch >= 8 and (batch == 16 or predict(2 * batch, False) > budget)
    else:
        assert predict(8, False) > budget, "checkpointing only when a batch of 8 does not fit without it"
        assert batch == 16 or predict(2 * batch, True) > budget, "the largest batch that fits"


def test_expected_choices_on_the_extremes():
    t4, h100 = KNOWN_GPUS["T4"], KNOWN_GPUS["H100"]
    eight = family_config("Llama-3.1-8B")
    on_t4 = reference.training_settings(t4, _predictor(eight, dtype=torch.float16))
    assert on_t4["precision"] == "fp16" and on_t4["gradient_checkpointing"] is True and 1 <= on_t4["batch_size"] < 8
    one = family_config("Llama-3.2-1B")
    on_h100 = reference.training_settings(h100, _predictor(one))
    assert on_h100 == {"precision": "bf16", "optimizer": "paged_adamw_8bit", "gradient_checkpointing": False, "batch_size": 16}
    big = reference.training_settings(Device("small", (8, 6), 4 * GiB), _predictor(eight))
    assert big["batch_size"] == 0, "8B does not fit 4 GiB: said, not attempted"


@pytest.mark.parametrize("model", MODELS)
def test_weight_terms_count_what_the_model_holds(model):
    config = family_config(model)
    from peftlab.models import meta_model
    from peftlab.reference import peft_lora_count

    meta = meta_model(config)
    linear = sum(m.weight.numel() for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    total = sum(p.numel() for p in meta.parameters())
    q = reference.predict_peak_bytes(config, batch_size=1, seq_len=128, r=16, load_in_4bit=True, optimizer="paged_adamw_8bit")
    assert q["quantized_weights"] == pytest.approx(linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8)
    assert q["unquantized_weights"] == (total - linear) * 4, "embeddings, lm_head and norms stay unquantized, in fp32"
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert q["trainable_parameters"] == peft_lora_count(config, 16, targets)
    assert q["adapter_weights"] == q["gradients"] == 4 * q["trainable_parameters"]
    assert q["optimizer_state"] == 2 * q["trainable_parameters"], "8-bit AdamW: two 1-byte moments"
    plain = reference.predict_peak_bytes(config, batch_size=1, seq_len=128, r=16, load_in_4bit=False,
                                        optimizer="adamw_torch", compute_dtype=torch.bfloat16)
    assert plain["quantized_weights"] == 0 and plain["unquantized_weights"] == total * 2
    assert plain["optimizer_state"] == 8 * plain["trainable_parameters"]
    if not config.tie_word_embeddings:
        assert q["unquantized_weights"] >= 2 * config.vocab_size * config.hidden_size * 4, "both tables count"


def test_gradient_checkpointing_cuts_activations():
    config = family_config("Llama-3.1-8B")
    full = reference.predict_peak_bytes(config, batch_size=4, seq_len=1024, r=16, gradient_checkpointing=False)
    ckpt = reference.predict_peak_bytes(config, batch_size=4, seq_len=1024, r=16, gradient_checkpointing=True)
    assert ckpt["activations"] < full["activations"] / 8
    assert ckpt["quantized_weights"] == full["quantized_weights"]


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_activations_are_what_autograd_keeps(dropout):
    """The activation term against the bytes autograd saves in a real forward (fp32, LoRA on every
    linear layer), counted with saved-tensor hooks: within 6 %."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"))
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(v for k, v in saved.items() if k not in params)
    predicted = reference.predict_peak_bytes(model.config, batch_size=4, seq_len=64, r=8, load_in_4bit=False,
                                            compute_dtype=torch.float32, optimizer="adamw_torch",
                                            gradient_checkpointing=False, lora_dropout=dropout)["activations"]
    assert abs(predicted / measured - 1) < 0.06, (predicted, measured)


def test_each_rank_selects_its_gpu_before_measuring(fake_gpu, monkeypatch):
    calls = fake_gpu(KNOWN_GPUS["A100-80GB"], count=2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 0)
    lab._select_device()
    meter = lab.MemoryMeter()
    meter.stop()
    assert calls[:2] == [("set_device", 1), ("reset_peak", None)], calls
    assert lab.environment()["gpus"] == 2


def test_a_small_gpu_merges_on_the_cpu(fake_gpu, monkeypatch):
    fake_gpu(KNOWN_GPUS["T4"])  # a tenth of its memory free beside the trained model
    monkeypatch.setattr(lab, "_base_parameters", lambda config: 8_030_261_248)
    assert lab.merge_device(lab.LabConfig()) == "cpu"
    monkeypatch.setattr(lab, "_base_parameters", lambda config: 135_000_000)
    assert lab.merge_device(lab.LabConfig()) == "gpu"
    assert lab.merge_device(lab.LabConfig(merge_on="cpu")) == "cpu"


def test_defaults_follow_the_model_size():
    small = hardware.default_hyperparameters(135e6, gpu=False)
    assert small == {"learning_rate": 2e-3, "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "max_grad_norm": 1.0}
    assert hardware.default_hyperparameters(8e9, gpu=True)["learning_rate"] == 2e-4
    assert hardware.default_hyperparameters(65e9, gpu=True)["learning_rate"] == 1e-4
    assert hardware.default_hyperparameters(8e9, gpu=True)["warmup_ratio"] == 0.03


def test_a_simulated_gpu_builds_gpu_settings_and_leaves_nothing_behind():
    """`simulated_gpu` lets 07's tests build `TrainingArguments(bf16=True)` for an A100 on a CPU; after
    it, torch, transformers' cached checks and accelerate's process state describe the CPU again."""
    from accelerate.state import PartialState
    from transformers import TrainingArguments

    with hardware.simulated_gpu(KNOWN_GPUS["A100-80GB"]) as device:
        assert torch.cuda.is_available() and hardware.current_device() == device
        args = TrainingArguments(output_dir="unused", bf16=True, optim="paged_adamw_8bit", report_to="none")
        assert args.bf16 and args.optim.value == "paged_adamw_8bit"
    assert not torch.cuda.is_available()
    with pytest.raises(ValueError, match="bf16"):
        TrainingArguments(output_dir="unused", bf16=True, report_to="none")
    assert str(TrainingArguments(output_dir="unused", use_cpu=True, report_to="none").device) == "cpu"
    assert PartialState().device.type == "cpu"
    with hardware.simulated_gpu(hardware.cpu_device()):
        assert not torch.cuda.is_available()

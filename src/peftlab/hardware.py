"""What a LoRA or QLoRA run needs from a device: the precision (from the GPU's compute capability),
the optimizer, the shapes and parameter inventory of a model, the bytes of each storage format, and the
learning-rate recipe. The memory prediction and the choice of batch size and checkpointing, which
notebook 07 asks the learner to write, are the tests' reference code (`peftlab.reference`
`predict_peak_bytes` and `training_settings`); the GPU lab (`peftlab.lab`) uses them from there.

Devices are plain descriptions (`Device`): what `torch.cuda.get_device_properties` reports, or the
CPU. GPU memory is sold in binary units: an "80 GB" A100 has 80 GiB = 85.9e9 bytes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class Device:
    """A device as the lab sees it: name, CUDA compute capability (None for a CPU), memory, count."""

    name: str
    capability: tuple[int, int] | None
    total_memory: int
    count: int = 1

    @property
    def is_gpu(self) -> bool:
        return self.capability is not None


# The GPUs learners meet, with the memory nvidia-smi shows in whole GiB (torch reports 1 to 2 % less:
# about 79.2 GiB for an 80 GB A100 or H100, 14.7 GiB for a T4), for tests and examples.
KNOWN_GPUS = {
    "T4": Device("Tesla T4", (7, 5), 15 * GiB),
    "A100-40GB": Device("NVIDIA A100-SXM4-40GB", (8, 0), 40 * GiB),
    "A100-80GB": Device("NVIDIA A100-SXM4-80GB", (8, 0), 80 * GiB),
    "H100": Device("NVIDIA H100 80GB HBM3", (9, 0), 80 * GiB),
}


def cpu_device() -> Device:
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return Device("CPU", None, memory)


@contextlib.contextmanager
def simulated_gpu(device: Device):
    """While inside, `torch.cuda` describes ``device`` (available, its name, capability and memory;
    bf16 "supported" on every GPU, as torch says even of a T4 that only emulates it), and so do
    transformers' cached checks of it, and accelerate's process state is put back afterwards: enough to build the objects a GPU run is configured with
    (`TrainingArguments(bf16=True)`) on a machine without one. Nothing can run on the simulated GPU.
    ``device`` a CPU changes nothing."""
    import types

    import torch

    if not device.is_gpu:
        yield device
        return
    props = types.SimpleNamespace(name=device.name, major=device.capability[0], minor=device.capability[1],
                                  total_memory=device.total_memory, multi_processor_count=1)
    fakes = {"is_available": lambda: True, "device_count": lambda: device.count, "current_device": lambda: 0,
             "get_device_properties": lambda index=0: props, "get_device_capability": lambda index=0: device.capability,
             "get_device_name": lambda index=0: device.name, "is_bf16_supported": lambda including_emulation=True: True, "set_device": lambda index: None}
    import transformers.training_args  # noqa: F401 - imported first: bitsandbytes, which it imports, sets up CUDA
    from accelerate.state import AcceleratorState, PartialState

    saved = {name: getattr(torch.cuda, name) for name in fakes}
    shared = {state: dict(state._shared_state) for state in (PartialState, AcceleratorState)}
    _clear_transformers_checks()
    try:
        for name, fake in fakes.items():
            setattr(torch.cuda, name, fake)
        yield device
    finally:
        for name, real in saved.items():
            setattr(torch.cuda, name, real)
        for state, before in shared.items():  # accelerate's process-wide state must not keep the GPU
            state._shared_state.clear()
            state._shared_state.update(before)
        _clear_transformers_checks()


def _clear_transformers_checks() -> None:
    """Forget transformers' remembered answers about the machine (`is_torch_bf16_gpu_available` and
    the like are cached)."""
    import sys

    module = sys.modules.get("transformers.utils.import_utils")
    for value in vars(module).values() if module else ():
        if callable(getattr(value, "cache_clear", None)) and getattr(value, "__module__", "") == module.__name__:
            value.cache_clear()


def current_device(index: int | None = None) -> Device:
    """The GPU this process uses (``index``, else the current one), or the CPU when there is none."""
    import torch

    if not torch.cuda.is_available():
        return cpu_device()
    index = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(index)
    return Device(props.name, (props.major, props.minor), props.total_memory, torch.cuda.device_count())


def precision(device: Device) -> str:
    """"bf16" from compute capability 8.0 (Ampere and newer, which compute bf16 natively), "fp16" on
    older GPUs (a T4, 7.5: `torch.cuda.is_bf16_supported()` says True there only because it counts
    emulation), "fp32" on a CPU."""
    if not device.is_gpu:
        return "fp32"
    return "bf16" if device.capability >= (8, 0) else "fp16"


def compute_dtype(device: Device):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision(device)]


# Optimizer state per trainable parameter, in bytes: AdamW keeps two fp32 moments; bitsandbytes'
# 8-bit AdamW keeps them in 8 bits (block constants add under 2 %; tensors under 4,096 elements, its
# min_8bit_size, keep 32-bit state, a small share for LoRA matrices); SGD without momentum keeps none.
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2,
                         "paged_adamw_8bit": 2, "sgd": 0}
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8     # NF4 with double quantization (notebook 05)
CUDA_CONTEXT_BYTES = GiB // 2                      # CUDA's own memory, outside PyTorch's allocator


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _dim(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def shapes(config) -> dict:
    """The sizes the memory model needs, for Llama-, GPT-2-, Phi- or Falcon-style configs."""
    c = _text_config(config)
    hidden = _dim(c, "hidden_size", "n_embd", "d_model")
    heads = _dim(c, "num_attention_heads", "n_head")
    head_dim = _dim(c, "head_dim", default=None) or hidden // heads
    return {"hidden": hidden, "layers": _dim(c, "num_hidden_layers", "n_layer"), "heads": heads,
            "kv_heads": _dim(c, "num_key_value_heads", "n_head_kv", "num_kv_heads", default=heads) or heads,
            "head_dim": head_dim, "intermediate": _dim(c, "intermediate_size", "n_inner", "ffn_hidden_size",
                                                       default=None) or 4 * hidden,
            "vocab": _dim(c, "vocab_size"), "gated_mlp": _dim(c, "hidden_act", "activation_function", default="")
            in ("silu", "swiglu") or hasattr(c, "mlp_bias")}


def meta_inventory(config) -> dict:
    """Parameter counts (cached per configuration) of the model built from ``config`` on the meta device (no memory): all, and
    those of linear layers bitsandbytes quantizes (every ``nn.Linear`` but the output layer); the
    linear layers themselves as ``{name: (in, out)}``."""
    key = config.to_json_string() if hasattr(config, "to_json_string") else None
    if key is not None and key in _INVENTORY:
        return _INVENTORY[key]
    import torch

    from peftlab.models import meta_model

    model = meta_model(config)
    output = model.get_output_embeddings()
    linear = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and m is not output}
    conv1d = {name: tuple(m.weight.shape) for name, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    linear.update(conv1d)  # GPT-2 writes its linear layers as Conv1D (weight in x out)
    quantized = sum(i * o for i, o in linear.values())
    found = {"total": sum(p.numel() for p in model.parameters()), "quantized": quantized, "linear": linear}
    if key is not None:
        _INVENTORY[key] = found
    return found


_INVENTORY: dict[str, dict] = {}


def optimizer_for(device: Device, load_in_4bit: bool) -> str:
    """Paged 8-bit AdamW on a GPU (its state a quarter of AdamW's; paged to CPU memory under pressure),
    plain AdamW on a CPU (paging is a GPU feature)."""
    return "paged_adamw_8bit" if device.is_gpu else "adamw_torch"


def default_hyperparameters(n_params: int, gpu: bool) -> dict:
    """Learning rate, warmup and schedule for a model of ``n_params`` parameters. The QLoRA paper's
    recipe (Dettmers et al., 2023, appendix B: constant schedule, 2e-4 for 7B and 13B, 1e-4 for 33B and
    65B, gradients clipped at 0.3). On a GPU the course warms up over 3 % of the steps
    (``constant_with_warmup``): the paper's scripts pass ``--warmup_ratio 0.03`` with a ``constant``
    schedule, which the Trainer runs without warmup, so that part is the course's choice. For models under a
    billion parameters the course's own choice, 2e-3 with the Trainer's default clipping (1.0), which
    takes SmolLM2-135M far on the course task in 20 CPU steps (the lab's results say how far)."""
    small = n_params < 1e9
    lr = 2e-3 if small else 2e-4 if n_params < 20e9 else 1e-4
    return {"learning_rate": lr, "lr_scheduler_type": "constant_with_warmup" if gpu else "constant",
            "warmup_ratio": 0.03 if gpu else 0.0, "max_grad_norm": 1.0 if small else 0.3}


__all__ = ["Device", "GiB", "KNOWN_GPUS", "OPTIMIZER_STATE_BYTES", "compute_dtype", "cpu_device", "current_device",
           "default_hyperparameters", "meta_inventory", "optimizer_for", "precision", "shapes", "simulated_gpu"]

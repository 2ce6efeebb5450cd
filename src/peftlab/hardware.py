"""What a LoRA or QLoRA run needs from a device, decided in one place: the precision (from the GPU's
compute capability), the optimizer, gradient checkpointing, a batch size that fits, and a memory
prediction whose terms are named. The GPU lab (`peftlab.lab`) uses these functions; notebook 07 asks
the learner to write `predict_peak_bytes` and `training_settings` and checks them against these.

Devices are plain descriptions (`Device`): what `torch.cuda.get_device_properties` reports, or the
CPU. GPU memory is sold in binary units: an "80 GB" A100 has 80 GiB = 85.9e9 bytes.
"""

from __future__ import annotations

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


# The GPUs learners meet (memory as torch reports it, rounded to whole GiB), for tests and examples.
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
# 8-bit AdamW keeps them in 8 bits (block constants add under 2 %); SGD without momentum keeps none.
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
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
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


def _targets(linear: dict, target_modules) -> dict:
    if target_modules in ("all-linear", None):
        return dict(linear)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    return {name: shape for name, shape in linear.items() if name.split(".")[-1] in set(target_modules)}


def predict_peak_bytes(config, *, batch_size: int, seq_len: int, r: int, target_modules="all-linear",
                       load_in_4bit: bool = True, compute_dtype=None, optimizer: str = "paged_adamw_8bit",
                       gradient_checkpointing: bool = True, lora_dropout: float = 0.0) -> dict:
    """Peak memory of one training step of LoRA (``load_in_4bit=False``) or QLoRA, in bytes, by term:

    - ``quantized_weights``: the frozen linear layers in NF4 with double quantization (4.127 bits each);
    - ``unquantized_weights``: every other base parameter (embeddings, the output layer, norms, biases),
      in fp32 under QLoRA (`prepare_model_for_kbit_training` casts them), else in the compute dtype;
    - ``adapter_weights`` and ``gradients``: fp32 LoRA matrices (peft keeps adapters in fp32);
    - ``optimizer_state``: per trainable parameter, `OPTIMIZER_STATE_BYTES` of the optimizer named;
    - ``activations``: what autograd keeps for the backward pass (below), with gradient checkpointing
      only each layer's input plus one layer recomputed at a time;
    - ``logits``: the model's output logits (kept with the output, in the compute dtype) and their
      fp32 gradient in the backward pass;
    - ``dequantized_weight``: under QLoRA the backward pass dequantizes a whole 4-bit weight to the
      compute dtype before its matrix product (bitsandbytes' MatMul4Bit): the largest one;
    - ``total``: their sum, what PyTorch's allocator holds at the peak (``torch.cuda.max_memory_allocated``
      on a GPU); the CUDA context comes on top (`training_settings` reserves it).

    Activations per token of one decoder layer, with the base frozen (PyTorch keeps no input of a
    linear layer whose weight needs no gradient, and bitsandbytes keeps none of a 4-bit one): the two
    norms' fp32 inputs (2 x 4h bytes); attention's queries, keys, values (repeated to every head) and
    output (4 x heads x head_dim elements); the gated MLP's gate, up and product (3 x intermediate);
    for every adapted layer, the fp32 input of its lora_A and
    the r values of its A product (dropout adds an fp32 mask a layer). Per token, the output layer's logits in the compute dtype, their fp32
    copy and the loss's log-probabilities (4 + 4 bytes a vocabulary entry on top).
    """
    import torch

    dtype = compute_dtype or torch.bfloat16
    cd = torch.empty((), dtype=dtype).element_size()
    s = shapes(config)
    inv = meta_inventory(config)
    targets = _targets(inv["linear"], target_modules)
    trainable = sum(r * (i + o) for i, o in targets.values())
    quantized = inv["quantized"] if load_in_4bit else 0
    terms = {
        "quantized_weights": quantized * NF4_BYTES,
        "unquantized_weights": (inv["total"] - quantized) * (4 if load_in_4bit else cd),
        "adapter_weights": trainable * 4,
        "gradients": trainable * 4,
        "optimizer_state": trainable * OPTIMIZER_STATE_BYTES[optimizer],
    }
    tokens = batch_size * seq_len
    h, heads, kv, e, inter = s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["intermediate"]
    per_layer = (2 * 4 * h                                     # the two norms' fp32 inputs
                 + (2 * heads + 2 * kv) * e * cd + heads * 4   # attention: q, k, v, output; log-sum-exp
                 + (3 if s["gated_mlp"] else 1) * inter * cd)  # MLP: gate, up, their product
    per_layer += _lora_inputs(targets, s["layers"], r, cd, lora_dropout)
    logits = s["vocab"] * 4                                    # the loss keeps fp32 log-probabilities
    if gradient_checkpointing:
        activations = tokens * (s["layers"] * h * cd + per_layer + logits)
    else:
        activations = tokens * (s["layers"] * per_layer + logits)
    terms["activations"] = activations
    terms["logits"] = tokens * s["vocab"] * (cd + 4)  # the output's logits, and their fp32 gradient
    largest = max((i * o for i, o in inv["linear"].values()), default=0)
    terms["dequantized_weight"] = largest * cd if load_in_4bit else 0
    terms["total"] = sum(terms.values())
    terms["trainable_parameters"] = trainable
    return terms


def _lora_inputs(targets: dict, layers: int, r: int, cd: int, dropout: float) -> float:
    """Bytes per token and layer that LoRA adds: every adapted layer's lora_A keeps its input in fp32
    (its own copy, cast from the compute dtype or through dropout, which also keeps its fp32 mask; in
    fp32 without dropout, layers reading the same input share it: q, k and v; gate and up), and lora_B
    keeps the r values of the A product."""
    in_blocks = {name: shape for name, shape in targets.items() if any(f".{b}." in name for b in ("layers", "h", "blocks"))}
    shared = cd == 4 and dropout == 0
    groups = {}
    for name, (i, _) in in_blocks.items():
        leaf = name.split(".")[-1]
        key = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "mlp", "up_proj": "mlp"}.get(leaf, leaf)
        groups.setdefault((name.rsplit(".", 2)[0], key if shared else leaf), i)
    inputs = sum(i * (8 if dropout > 0 else 4) for i in groups.values())
    return (inputs + len(in_blocks) * r * 4) / max(layers, 1)


def optimizer_for(device: Device, load_in_4bit: bool) -> str:
    """Paged 8-bit AdamW on a GPU (its state a quarter of AdamW's; paged to CPU memory under pressure),
    plain AdamW on a CPU (paging is a GPU feature)."""
    return "paged_adamw_8bit" if device.is_gpu else "adamw_torch"


def training_settings(device: Device, predicted_bytes, *, batch_sizes=(16, 8, 4, 2, 1), headroom: float = 0.9) -> dict:
    """Precision, optimizer, gradient checkpointing and the batch size for ``device``.

    ``predicted_bytes(batch_size, gradient_checkpointing)`` is the run's predicted peak (what PyTorch
    allocates). A GPU offers ``headroom`` of its memory (the rest for fragmentation and what the
    prediction leaves out) less the CUDA context. Without checkpointing (faster) when a batch of at
    least 8 fits; else with checkpointing, the largest batch that fits. ``batch_size`` 0 means not even
    one sequence fits."""
    settings = {"precision": precision(device), "optimizer": optimizer_for(device, True)}
    budget = device.total_memory * headroom - CUDA_CONTEXT_BYTES
    if not device.is_gpu:
        settings.update(gradient_checkpointing=False, batch_size=8)
        return settings
    for checkpointing in (False, True):
        for batch in batch_sizes:
            if checkpointing is False and batch < 8:
                break
            if predicted_bytes(batch, checkpointing) <= budget:
                settings.update(gradient_checkpointing=checkpointing, batch_size=batch)
                return settings
    settings.update(gradient_checkpointing=True, batch_size=0)
    return settings


def default_hyperparameters(n_params: int, gpu: bool) -> dict:
    """Learning rate, warmup and schedule for a model of ``n_params`` parameters. The QLoRA paper's
    recipe (Dettmers et al., 2023, appendix B: constant schedule, 2e-4 for 7B and 13B, 1e-4 for 33B and
    65B; its scripts warm up for 3 % of the steps and clip gradients at 0.3); for models under a
    billion parameters the course's own choice, 2e-3 with the Trainer's default clipping (1.0), which
    takes SmolLM2-135M far on the course task in 20 CPU steps (the lab's results say how far)."""
    small = n_params < 1e9
    lr = 2e-3 if small else 2e-4 if n_params < 20e9 else 1e-4
    return {"learning_rate": lr, "lr_scheduler_type": "constant_with_warmup" if gpu else "constant",
            "warmup_ratio": 0.03 if gpu else 0.0, "max_grad_norm": 1.0 if small else 0.3}


__all__ = ["Device", "GiB", "KNOWN_GPUS", "OPTIMIZER_STATE_BYTES", "compute_dtype", "cpu_device", "current_device",
           "default_hyperparameters", "meta_inventory", "optimizer_for", "precision", "predict_peak_bytes",
           "shapes", "training_settings"]

"""The tests' reference code: what the graded tests compare a student's answer with.

Each function here computes what an exercise asks for with the real libraries (`peft`, `transformers`,
`bitsandbytes`) or, for notebook 07, the lab's own memory prediction and settings. So none of it may
be an answer, and none of it is in a student's reach as one:

- the test cells import from here; after every cell `peftlab.checks` takes these names (and this
  module) out of the notebook's namespace again, so ``return peft_lora_count(...)`` is a NameError;
- while work is graded, the kernel runs in a sandbox in which this file is replaced by stubs that
  raise `ReferenceUnavailable` (`autograder.sandbox`), and the tests themselves run in the grader;
- an answer that imports or names this module scores no points for the tests of that exercise, and
  the grading report flags it (`autograder.oracles`).

Anything a notebook legitimately needs outside its tests lives elsewhere (`peftlab.models`,
`peftlab.hardware`, `peftlab.quant`).
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from peftlab import hardware
from peftlab.models import meta_model, param_count


def _per_config(count):
    """Remember a count by the config's content and the other arguments: the counts are pure, and
    peft's injection on a meta model still takes about 0.25 s of Python per call (the tests call
    them for several configs, the test suite's mutants for the same configs again)."""
    done: dict = {}

    @functools.wraps(count)
    def remembered(config, *args):
        key = (config.to_json_string(use_diff=False), *(tuple(a) if isinstance(a, (list, tuple, set)) else a for a in args))
        if key not in done:
            done[key] = count(config, *args)
        return done[key]

    return remembered


@_per_config
def real_param_count(config) -> int:
    """Parameters of a real LlamaForCausalLM built from ``config`` (meta device: shapes only, no memory);
    tied tables are counted once."""
    return param_count(meta_model(config))


# -- peft (notebooks 02, 03, 04 and 06) -----------------------------------------------------------

class _Holder(nn.Module):
    """A one-layer module so that peft can wrap a lone nn.Linear."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def peft_lora_layer(base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    seed: int = 0, random_b: bool = True):
    """peft's LoRA layer around a copy of ``base_layer``. With ``random_b`` its lora_B is filled with
    seeded random values (peft starts it at zero, which would make every comparison trivial)."""
    from peft import LoraConfig, get_peft_model

    holder = _Holder(copy.deepcopy(base_layer))
    wrapped = get_peft_model(holder, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                target_modules=["layer"]))
    layer = wrapped.base_model.model.layer
    if random_b:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layer.lora_B["default"].weight.normal_(0, 0.1)
    return layer


def peft_dora_layer(base_layer: nn.Linear, r: int, lora_alpha: float, seed: int = 0, random_b: bool = True):
    """peft's DoRA layer (``LoraConfig(use_dora=True)``) around a copy of ``base_layer``. With
    ``random_b`` its lora_B and its magnitude are moved off their start with seeded random values (at
    the start DoRA computes the base layer exactly, which would make every comparison trivial)."""
    from peft import LoraConfig, get_peft_model

    holder = _Holder(copy.deepcopy(base_layer))
    wrapped = get_peft_model(holder, LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["layer"], use_dora=True))
    layer = wrapped.base_model.model.layer
    if random_b:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layer.lora_B["default"].weight.normal_(0, 0.1)
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.mul_(1 + 0.1 * torch.randn_like(magnitude))
    return layer


def peft_lora_model(model, target_modules, r: int, lora_alpha: float, seed: int = 0, random_b: bool = True):
    """``peft.get_peft_model`` on a deep copy of ``model``, lora_B randomised as in `peft_lora_layer`."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=lora_alpha,
                                                               target_modules=list(target_modules)))
    if random_b:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name, p in wrapped.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 0.1)
    return wrapped


@_per_config
def peft_lora_count(config, r: int, target_modules) -> int:
    """Trainable parameters of ``peft.get_peft_model`` with LoRA on a Llama of ``config`` (meta device)."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(meta_model(config), LoraConfig(r=r, target_modules=list(target_modules)))
    return param_count(wrapped, trainable_only=True)


def lora_weights(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path in the original model: (lora_A weight, lora_B weight)}`` of a peft LoRA model."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in peft_model.named_parameters():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.default.weight"
            if name.endswith(marker):
                path = name[: -len(marker)].removeprefix("base_model.model.")
                found.setdefault(path, {})[part] = p.detach()
    return {path: (w["lora_A"], w["lora_B"]) for path, w in found.items()}


def peft_prompt_tuning(model, num_virtual_tokens: int, prompt: torch.Tensor | None = None, **config):
    """peft's prompt tuning on a deep copy of ``model``; ``prompt`` (P x hidden) sets its vectors.
    Extra keyword arguments go to ``PromptTuningConfig`` (e.g. the TEXT initialisation)."""
    from peft import PromptTuningConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(model), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, **config))
    if prompt is not None:
        with torch.no_grad():
            wrapped.prompt_encoder["default"].embedding.weight.copy_(prompt)
    return wrapped


@_per_config
def peft_prompt_count(config, num_virtual_tokens: int) -> int:
    """Trainable parameters of peft's prompt tuning on a Llama of ``config`` (meta device)."""
    from peft import PromptTuningConfig, get_peft_model

    wrapped = get_peft_model(meta_model(config), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                   num_virtual_tokens=num_virtual_tokens))
    return param_count(wrapped, trainable_only=True)


def peft_prompt_vectors(peft_model) -> torch.Tensor:
    """The (P x hidden) soft prompt of a peft prompt-tuning model."""
    return peft_model.prompt_encoder["default"].embedding.weight.detach().clone()


def peft_prefix_tuning(model, num_virtual_tokens: int, seed: int = 0):
    """peft's prefix tuning (no projection) on a deep copy of ``model``, with seeded random prefixes."""
    from peft import PrefixTuningConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped.prompt_encoder["default"].embedding.weight.normal_()
    return wrapped


def peft_prefixes(peft_model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer (keys, values) of a peft prefix-tuning model, each (P x kv_heads * head_dim).

    peft stores one row per virtual token holding, for every layer in turn, the key then the value."""
    config = peft_model.peft_config["default"]
    weight = peft_model.prompt_encoder["default"].embedding.weight.detach()
    layout = weight.view(config.num_virtual_tokens, config.num_layers * 2, config.token_dim)
    keys = [layout[:, 2 * i].clone() for i in range(config.num_layers)]
    values = [layout[:, 2 * i + 1].clone() for i in range(config.num_layers)]
    return keys, values


@_per_config
def peft_prefix_count(config, num_virtual_tokens: int) -> int:
    """Trainable parameters of peft's prefix tuning on a Llama of ``config`` (meta device)."""
    from peft import PrefixTuningConfig, get_peft_model

    wrapped = get_peft_model(meta_model(config), PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                   num_virtual_tokens=num_virtual_tokens))
    return param_count(wrapped, trainable_only=True)


# -- bitsandbytes (notebooks 05 and 06) ------------------------------------------------------------

def nf4_table() -> torch.Tensor:
    """bitsandbytes' own NF4 table (16 float32 values on the CPU)."""
    import bitsandbytes.functional as bnbf

    return bnbf.get_4bit_type("nf4", device="cpu")


def bnb_nf4(w: torch.Tensor, blocksize: int = 64) -> dict[str, torch.Tensor]:
    """Quantize ``w`` with ``bitsandbytes.functional.quantize_4bit`` (NF4, no double quantization)
    and return what a hand-written NF4 should reproduce: ``packed`` (1-D uint8, two codes a byte),
    ``codes`` (1-D uint8, one per element), ``absmax`` (float32 per block) and ``dequantized``
    (``dequantize_4bit``, float32, ``w``'s shape).

    The weight is handed to bitsandbytes flattened. Blocks run over the flattened tensor either way
    (the codes and absmax are the same), but bitsandbytes 0.50's AVX-512 CPU kernel for
    ``dequantize_4bit`` cuts blocks per row instead, so a 2-D weight whose rows are not a multiple of
    the block size comes back wrong on such CPUs (measured: largest round-trip error 0.092 instead of
    0.024 for a 96 x 80 weight; its scalar and PyTorch paths, and the planned AVX2 one, index blocks over
    the flattened tensor: bitsandbytes pull request #2072)."""
    import bitsandbytes.functional as bnbf

    w = w.detach().float().cpu().contiguous()
    packed, state = bnbf.quantize_4bit(w.reshape(-1), blocksize=blocksize, quant_type="nf4")
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[: w.numel()]
    return {"packed": flat.clone(), "codes": codes, "absmax": state.absmax.clone(),
            "dequantized": bnbf.dequantize_4bit(packed, state).reshape(w.shape)}


def bnb_storage_bits(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> float:
    """Bits per parameter that bitsandbytes actually stores for ``w`` in NF4: packed codes plus the
    block constants (with double quantization: 8-bit absmax, plus the float32 scale of each group of
    256 of those and their mean offset). Lookup tables, shared by every weight, are left out."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w.detach().float().cpu().contiguous(), blocksize=blocksize,
                                       quant_type="nf4", compress_statistics=double_quant)
    bits = packed.numel() * packed.element_size() * 8 + state.absmax.numel() * state.absmax.element_size() * 8
    if double_quant:
        bits += state.state2.absmax.numel() * state.state2.absmax.element_size() * 8
    return bits / w.numel()


# -- the GPU lab's prediction and settings (notebook 07) ------------------------------------------

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
    norms' fp32 inputs (2 x 4h bytes); attention's queries and output (2 x heads x head_dim elements)
    and its keys and values at the key-value heads' width (2 x kv_heads x head_dim: without a padding mask
    scaled_dot_product_attention takes them unrepeated; with one, transformers repeats them to every head
    first, about 3 % more on SmolLM2, not counted); the gated MLP's gate, up and product (3 x intermediate);
    for every adapted layer, the fp32 input of its lora_A and
    the r values of its A product (dropout adds an fp32 mask a layer). Per token, the output layer's logits in the compute dtype, their fp32
    copy and the loss's log-probabilities (4 + 4 bytes a vocabulary entry on top).
    """
    import torch

    dtype = compute_dtype or torch.bfloat16
    cd = torch.empty((), dtype=dtype).element_size()
    s = hardware.shapes(config)
    inv = hardware.meta_inventory(config)
    targets = _targets(inv["linear"], target_modules)
    trainable = sum(r * (i + o) for i, o in targets.values())
    quantized = inv["quantized"] if load_in_4bit else 0
    terms = {
        "quantized_weights": quantized * hardware.NF4_BYTES,
        "unquantized_weights": (inv["total"] - quantized) * (4 if load_in_4bit else cd),
        "adapter_weights": trainable * 4,
        "gradients": trainable * 4,
        "optimizer_state": trainable * hardware.OPTIMIZER_STATE_BYTES[optimizer],
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


def training_settings(device: hardware.Device, predicted_bytes, *, batch_sizes=(16, 8, 4, 2, 1), headroom: float = 0.9) -> dict:
    """Precision, optimizer, gradient checkpointing and the batch size for ``device``.

    ``predicted_bytes(batch_size, gradient_checkpointing)`` is the run's predicted peak (what PyTorch
    allocates). A GPU offers ``headroom`` of its memory (the rest for fragmentation and what the
    prediction leaves out) less the CUDA context. Without checkpointing (faster) when a batch of at
    least 8 fits; else with checkpointing, the largest batch that fits. ``batch_size`` 0 means not even
    one sequence fits."""
    settings = {"precision": hardware.precision(device), "optimizer": hardware.optimizer_for(device, True)}
    budget = device.total_memory * headroom - hardware.CUDA_CONTEXT_BYTES
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


# --- notebook 07: the QLoRA training recipe, piece by piece (what `peftlab.lab` runs) -------------------
# ``settings`` is what `training_settings` returns (precision, optimizer, gradient_checkpointing,
# batch_size: how the run computes); ``config`` a `peftlab.lab.LabConfig` (what it trains, for how long).

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAB_BOOKKEEPING = {"logging_steps": 1, "save_strategy": "no", "report_to": "none", "remove_unused_columns": False,
                   "dataloader_num_workers": 0}


def qlora_quantization_config(settings: dict):
    """QLoRA's storage (NF4, double quantization) computing in the settings' precision."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=COMPUTE_DTYPES[settings["precision"]])


def load_in_4bit(path: str, settings: dict, device_map="cpu"):
    """The causal LM at ``path`` with every linear layer but the output layer in 4 bits."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=qlora_quantization_config(settings),
                                                device_map=device_map)


def add_lora(model, config, settings: dict):
    """`prepare_model_for_kbit_training` (fp32 for what is not 4-bit, the base frozen, non-reentrant
    checkpointing when the settings ask for it), then LoRA on ``config.target_modules``."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(settings["gradient_checkpointing"]),
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(task_type="CAUSAL_LM", r=config.r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=config.target_modules)
    return get_peft_model(model, lora)


@functools.lru_cache(maxsize=16)
def loaded_4bit_layout(path: str | None, precision: str) -> dict:
    """`peftlab.checks.describe_4bit` of `load_in_4bit` on ``path`` (None: `peftlab.models.tiny_llama`
    with seed 0), remembered: a grader compares every submission with the same load."""
    import tempfile

    from peftlab.checks import describe_4bit
    from peftlab.models import tiny_llama

    if path is not None:
        return describe_4bit(load_in_4bit(path, {"precision": precision}))
    with tempfile.TemporaryDirectory() as folder:
        tiny_llama(seed=0).save_pretrained(folder)
        return describe_4bit(load_in_4bit(folder, {"precision": precision}))


def layout_for(config, precision: str) -> dict:
    """What `load_in_4bit` gives for the model ``config`` describes, without loading it: its linear
    layers (from the meta device) in the format the real load of the tiny Llama gives, the output
    layer as that load leaves it. A grader checks a learner's SmolLM2 load against this, so that it
    holds no 4-bit SmolLM2 of its own (1.1 GB at its peak, against 0.6 GB for every other check)."""
    from torch import nn

    from peftlab.models import meta_model

    tiny = loaded_4bit_layout(None, precision)
    quantized = next(layer for layer in tiny["layers"].values() if layer["kind"] == "4-bit")
    model = meta_model(config)
    output = model.get_output_embeddings()
    layers = {name: dict(tiny["layers"]["lm_head"]) if m is output else dict(quantized)
              for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {"class": type(model).__name__, "layers": layers, "devices": tiny["devices"]}


def adapter_layout(config: dict, settings: dict) -> dict:
    """`peftlab.checks.describe_adapter` of `add_lora` on `peftlab.quant.tiny_llama_4bit`, for a
    `peftlab.lab.LabConfig` given as a dict (remembered by its values)."""
    key = (tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items())),
           tuple(sorted(settings.items())))
    return _adapter_layout(key)


@functools.lru_cache(maxsize=32)
def _adapter_layout(key) -> dict:
    from peftlab.checks import describe_adapter
    from peftlab.lab import LabConfig
    from peftlab.quant import tiny_llama_4bit

    config = {k: list(v) if isinstance(v, tuple) else v for k, v in key[0]}
    return describe_adapter(add_lora(tiny_llama_4bit(), LabConfig(**config), dict(key[1])))


def collate_examples(examples, tokenizer, max_seq_len: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 over the prompt and the
    padding) for course-task examples, each cut to its first ``max_seq_len`` tokens."""
    from peftlab.training import collate, encode

    encoded = [tuple(part[:max_seq_len] for part in encode(tokenizer, example)) for example in examples]
    return collate(encoded, tokenizer.pad_token_id)


def training_argument_values(config, settings: dict) -> dict:
    """What `training_arguments` passes to `transformers.TrainingArguments`: precision and optimizer
    from the settings (``use_cpu`` when they compute in fp32), the batch and checkpointing from the
    settings, the schedule from the config (its warmup ratio as a float ``warmup_steps``), and the
    lab's bookkeeping."""
    precision = settings["precision"]
    return dict(
        output_dir=f"{config.output_dir}/trainer", max_steps=config.max_steps, seed=config.seed,
        per_device_train_batch_size=settings["batch_size"], learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type, warmup_steps=float(config.warmup_ratio),
        max_grad_norm=config.max_grad_norm, optim=settings["optimizer"],
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=precision == "fp32",
        activation_checkpointing=bool(settings["gradient_checkpointing"]),
        activation_checkpointing_kwargs={"use_reentrant": False}, **LAB_BOOKKEEPING)


def training_arguments(config, settings: dict):
    """`transformers.TrainingArguments` for the lab's run (`training_argument_values`)."""
    from transformers import TrainingArguments

    return TrainingArguments(**training_argument_values(config, settings))

__all__ = ["adapter_layout", "add_lora", "bnb_nf4", "collate_examples", "layout_for", "load_in_4bit", "loaded_4bit_layout", "bnb_storage_bits", "lora_weights", "nf4_table", "peft_lora_count", "peft_lora_layer", "peft_lora_model", "peft_prefix_count", "peft_prefix_tuning", "peft_prefixes", "peft_prompt_count", "peft_prompt_tuning", "peft_prompt_vectors", "predict_peak_bytes", "qlora_quantization_config", "real_param_count", "training_argument_values", "training_arguments", "training_settings"]

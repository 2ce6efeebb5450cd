"""Reference objects built with the real libraries, for the notebooks' tests to compare against.

These wrap `peft` and `transformers`; they contain no solution to an exercise. Students can use them
too, to see what the library does with the same inputs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def meta_model(config):
    """A LlamaForCausalLM with ``config``'s shapes on PyTorch's meta device: no memory, milliseconds."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


def param_count(model, trainable_only: bool = False) -> int:
    """Parameters of a module (tied tables once), or only those that require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


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


def peft_prefix_count(config, num_virtual_tokens: int) -> int:
    """Trainable parameters of peft's prefix tuning on a Llama of ``config`` (meta device)."""
    from peft import PrefixTuningConfig, get_peft_model

    wrapped = get_peft_model(meta_model(config), PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                   num_virtual_tokens=num_virtual_tokens))
    return param_count(wrapped, trainable_only=True)

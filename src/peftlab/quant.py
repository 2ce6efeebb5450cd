"""Helpers for notebooks 05 (quantization) and 06 (QLoRA): held-out text for measuring what
quantization costs, weights with outliers, 4-bit loading of SmolLM2 that is safe to train on a CPU,
and what a quantized model stores. The bitsandbytes references the tests compare a hand-written
quantizer with are in `peftlab.reference`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

# Held-out English text, written for this course (so no model was trained on it), to measure how much
# a quantized model's next-token loss rises over the full-precision one.
HELD_OUT_TEXT = (
    "The river that runs past the old mill floods almost every spring. When the snow melts in the hills, "
    "the water rises over the footpath and the ducks swim where people usually walk their dogs.",
    "To make a simple loaf of bread, mix flour, water, salt and a little yeast, knead the dough for ten "
    "minutes, let it rise until it has doubled, shape it, and bake it in a hot oven until the crust is brown.",
    "A library card is one of the cheapest ways to learn something new. Most public libraries lend books, "
    "films and music, and many also offer free courses, language lessons and quiet rooms for study.",
    "The train to the coast leaves at a quarter past eight. If you miss it, the next one is an hour later, "
    "so it is worth arriving at the station a few minutes early and buying the ticket in advance.",
    "Bees visit thousands of flowers in a single day. As they collect nectar they carry pollen from one "
    "plant to the next, which is why many fruit farmers rent hives for the few weeks their trees bloom.",
    "When you write a letter of complaint, say clearly what went wrong, when it happened and what you "
    "would like the company to do about it. A short, polite letter is more likely to get a quick answer.",
)


def outlier_weights(n: int = 4096, outliers: int = 0, outlier_scale: float = 20.0, seed: int = 0,
                    std: float = 0.02) -> torch.Tensor:
    """A seeded weight-like vector: normal values with ``outliers`` of them ``outlier_scale`` times larger
    (large language models have a few such features, Dettmers et al., 2022, LLM.int8())."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * std
    if outliers:
        idx = torch.randperm(n, generator=g)[:outliers]
        w[idx] = torch.randn(outliers, generator=g).sign() * std * outlier_scale
    return w


@torch.no_grad()
def lm_loss(model, tokenizer, texts: Sequence[str] = HELD_OUT_TEXT) -> float:
    """Mean next-token cross-entropy of ``model`` over ``texts``, weighted by tokens (lower is better)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
        n = ids.shape[1] - 1
        total += model(ids, labels=ids).loss.item() * n
        count += n
    return total / count


@torch.no_grad()
def round_trip_linear_weights(model: nn.Module, round_trip: Callable[[torch.Tensor], torch.Tensor],
                              skip: Sequence[str] = ("lm_head",)) -> int:
    """Replace, in place, every ``nn.Linear`` weight ``w`` of ``model`` (except those named in ``skip``)
    by ``round_trip(w)``, a quantize-then-dequantize function; return how many weights were replaced."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] not in skip:
            new = round_trip(module.weight.detach()).reshape(module.weight.shape).to(module.weight.dtype)
            module.weight.copy_(new)
            count += 1
    return count


def disable_cpu_weight_repacking(model: nn.Module) -> int:
    """Work around a silent bitsandbytes bug; return how many 4-bit layers were changed.

    On CPUs with AVX512-BF16, the first forward pass through a ``bnb.nn.Linear4bit`` in eval mode with
    an input that needs no gradient (evaluation, ``generate``: bitsandbytes 0.50 checks
    ``not self.training and not x.requires_grad``) repacks its weight into an inference-only layout, and
    from then on training silently loses the gradient through that layer (PyTorch's autograd fallback
    then warns "an autograd kernel was not registered" for ``gemv_4bit``). Turning the repacking off
    costs some inference speed on those CPUs and changes nothing elsewhere.
    """
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_4bit(path: str, quantization_config, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path)`` in 4-bit through bitsandbytes, safe to train: on a
    machine without a GPU it loads to the CPU and disables the weight repacking that breaks gradients
    there (see `disable_cpu_weight_repacking`)."""
    from transformers import AutoModelForCausalLM

    from peftlab.models import _quiet_progress

    kwargs.setdefault("device_map", "auto" if torch.cuda.is_available() else "cpu")
    with _quiet_progress(True):
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_config, **kwargs)
    disable_cpu_weight_repacking(model)
    return model


def load_smollm2_4bit(quantization_config):
    """SmolLM2-135M-Instruct in 4-bit (offline from the course's cache), with `load_4bit`'s CPU fix."""
    from peftlab.models import smollm2_path

    return load_4bit(smollm2_path(), quantization_config)


def tiny_llama_4bit(dtype=torch.bfloat16, seed: int = 0):
    """`peftlab.models.tiny_llama` loaded in 4 bits (NF4) by transformers, its other weights in
    ``dtype`` (bf16: as a GPU load gives them), safe to train (`load_4bit`): a real 4-bit model in a
    second, for tests."""
    import tempfile

    from transformers import BitsAndBytesConfig

    from peftlab.models import tiny_llama

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory() as folder:
        tiny_llama(seed=seed).save_pretrained(folder)
        return load_4bit(folder, quantization, dtype=dtype)


def model_factory(path: str):
    """A function that loads a fresh copy of the model at ``path`` on every call:
    ``factory()`` in fp32, ``factory(quantization_config=...)`` in 4 bits through `load_4bit`."""

    def factory(quantization_config=None):
        if quantization_config is not None:
            return load_4bit(path, quantization_config)
        from transformers import AutoModelForCausalLM

        from peftlab.models import _quiet_progress

        with _quiet_progress(True):
            return AutoModelForCausalLM.from_pretrained(path)

    return factory


def smollm2_factory():
    """`model_factory` for SmolLM2-135M-Instruct (offline, from the course's cache)."""
    from peftlab.models import smollm2_path

    return model_factory(smollm2_path())


def tiny_llama_factory(seed: int = 0, **overrides):
    """`model_factory` for a seeded tiny Llama (saved once per process to a temporary folder)."""
    import atexit
    import shutil
    import tempfile

    from peftlab.models import tiny_llama

    key = (seed, tuple(sorted(overrides.items())))
    if key not in _TINY_FOLDERS:
        folder = tempfile.mkdtemp(prefix="peftlab-tiny-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        tiny_llama(seed=seed, **overrides).save_pretrained(folder)
        _TINY_FOLDERS[key] = folder
    return model_factory(_TINY_FOLDERS[key])


_TINY_FOLDERS: dict = {}


def stored_bytes(model: nn.Module, frozen_only: bool = False) -> int:
    """Bytes the model's parameters and buffers occupy, 4-bit weights as stored (packed codes plus
    their block constants, which `get_memory_footprint` leaves out); ``frozen_only``: only the
    parameters that do not train."""
    total = sum(p.numel() * p.element_size() for p in model.parameters() if not (frozen_only and p.requires_grad))
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    for module in model.modules():  # 4-bit layers keep their block constants beside the weight
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            total += _quant_state_bytes(state)
    return total


def frozen_bytes(model: nn.Module) -> int:
    """Bytes of everything in the model that does not train (see `stored_bytes`)."""
    return stored_bytes(model, frozen_only=True)


def _quant_state_bytes(state) -> int:
    total = state.absmax.numel() * state.absmax.element_size()
    if getattr(state, "state2", None) is not None:
        total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total



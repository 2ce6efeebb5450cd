"""The memory calculator's logic and widget, driven by a reference memory function."""

import pytest

from peftlab import widgets
from peftlab.plots import GB


def reference_memory(n_params, n_trainable=None, weight_bytes=2, grad_bytes=2, optimizer_bytes=8):
    n_trainable = n_params if n_trainable is None else n_trainable
    return round(n_params * weight_bytes + n_trainable * (grad_bytes + optimizer_bytes))


MIXED = "mixed bf16 + fp32 master copy, Adam (16 B)"


def test_full_fine_tuning_breakdown_matches_the_formula():
    parts = widgets.memory_breakdown(reference_memory, 7e9, "full fine-tuning", MIXED)
    assert parts == {"weights": 14e9, "gradients": 14e9, "optimizer state": 84e9}
    assert sum(parts.values()) == reference_memory(7e9, optimizer_bytes=12)


def test_lora_and_qlora_pay_optimizer_state_for_adapters_only():
    lora = widgets.memory_breakdown(reference_memory, 7e9, "LoRA", MIXED, adapter_share=0.01)
    assert lora["gradients"] == 7e7 * 2 and lora["optimizer state"] == 7e7 * 12
    assert lora["weights"] == 7e9 * 2 + 7e7 * 2
    qlora = widgets.memory_breakdown(reference_memory, 7e9, "QLoRA", MIXED, adapter_share=0.01)
    assert qlora["weights"] == pytest.approx(7e9 * 4.127 / 8 + 7e7 * 2, abs=1)
    assert qlora["optimizer state"] == lora["optimizer state"]


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method"):
        widgets.memory_breakdown(reference_memory, 1e9, "full", MIXED)


def test_verdicts():
    assert widgets.fit_verdict(10 * GB, 80).startswith("Fits")
    assert widgets.fit_verdict(75 * GB, 80).startswith("Only just")
    verdict = widgets.fit_verdict(1120 * GB, 80)
    assert verdict.startswith("Does not fit") and "at least 14" in verdict


def test_widget_follows_its_controls():
    box = widgets.will_it_fit(reference_memory)
    model, precision, method, share, gpu, verdict, plot = box.children
    model.value, method.value, gpu.value = "7B", "full fine-tuning", "A100 80 GB"
    assert verdict.value.startswith("<b>Does not fit: 112.0 GB")
    method.value = "QLoRA"
    assert "Fits" in verdict.value
    gpu.value = "T4 (16 GB)"
    assert "of 16 GB" in verdict.value
    assert share.disabled is False
    method.value = "full fine-tuning"
    assert share.disabled is True


def test_widget_asks_for_the_function_before_it_exists():
    def stub(*args, **kwargs):
        raise NotImplementedError()

    box = widgets.will_it_fit(stub)
    assert "Implement" in box.children[5].value

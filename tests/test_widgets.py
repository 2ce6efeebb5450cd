"""The memory calculator's logic and widget, driven by a reference memory function."""

import pytest

from peftlab import widgets
from peftlab.plots import GB
from peftlab.reference import peft_lora_count


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
    assert widgets.fit_verdict(80 * GB, 80).startswith("Only just"), "an 80 GB card holds 80 GiB = 85.9e9 bytes"
    assert widgets.fit_verdict(85 * GB, 80).startswith("Only just")
    assert widgets.fit_verdict(86 * GB, 80).startswith("Does not fit")
    assert "80 GiB (85.9 GB)" in widgets.fit_verdict(10 * GB, 80)
    verdict = widgets.fit_verdict(1120 * GB, 80)
    assert verdict.startswith("Does not fit") and "at least 14" in verdict  # 1120 / 85.9 = 13.04


def test_widget_follows_its_controls():
    box = widgets.will_it_fit(reference_memory)
    model, precision, method, share, gpu, batch, seq_len, attention, checkpointing, verdict, plot = box.children
    model.value, method.value, gpu.value = "7B", "full fine-tuning", "A100 80 GB"
    # 112 GB of training state and 34 s b h L = 34 x 2,048 x 4,096 x 32 bytes = 9.1 GB of activations
    assert verdict.value.startswith("<b>Does not fit: 121.1 GB"), verdict.value
    assert "activations 9.13 GB" in verdict.value
    method.value = "QLoRA"
    assert "Fits" in verdict.value and "activations 5.37 GB" in verdict.value  # the frozen base: 20 s b h L
    gpu.value = "T4 (15 GiB)"
    assert "of 15 GiB" in verdict.value
    assert share.disabled is False
    method.value = "full fine-tuning"
    assert share.disabled is True
    checkpointing.value = True
    assert "activations 0.82 GB" in verdict.value  # 2 s b h per layer kept, one layer recomputed
    checkpointing.value, attention.value = False, "standard"
    assert "activations 30.60 GB" in verdict.value  # the attention scores: 5 a s / h more per layer
    batch.value, seq_len.value, attention.value = 4, 512, "memory-efficient"
    assert "activations 9.13 GB" in verdict.value  # only batch x sequence length counts


def test_activation_memory_follows_korthikanti_et_al():
    h, layers, heads = widgets.MODEL_SHAPES["8B"]
    sbh = 2048 * h
    assert widgets.activation_bytes(h, layers, heads, 1, 2048) == layers * 34 * sbh
    assert widgets.activation_bytes(h, layers, heads, 1, 2048, attention="standard") == layers * sbh * (34 + 5 * heads * 2048 / h)
    assert widgets.activation_bytes(h, layers, heads, 1, 2048, frozen_base=True) == layers * 20 * sbh
    assert widgets.activation_bytes(h, layers, heads, 1, 2048, checkpointing=True) == layers * 2 * sbh + 34 * sbh
    assert widgets.activation_bytes(h, layers, heads, 2, 1024) == widgets.activation_bytes(h, layers, heads, 1, 2048)
    with pytest.raises(ValueError):
        widgets.activation_bytes(h, layers, heads, 1, 2048, attention="flash")
    with pytest.raises(ValueError):
        widgets.activation_bytes(h, layers, heads, 0, 2048)
    assert set(widgets.MODEL_SHAPES) == set(widgets.MODEL_SIZES)


def test_model_shapes_match_the_family_configs():
    from peftlab.models import family_config

    for size, name in [("1B", "Llama-3.2-1B"), ("3B", "Llama-3.2-3B"), ("8B", "Llama-3.1-8B"), ("13B", "Llama-2-13B"),
                       ("70B", "Llama-3.1-70B")]:
        config = family_config(name)
        assert widgets.MODEL_SHAPES[size] == (config.hidden_size, config.num_hidden_layers, config.num_attention_heads)


def test_widget_asks_for_the_function_before_it_exists():
    def stub(*args, **kwargs):
        raise NotImplementedError()

    box = widgets.will_it_fit(stub)
    assert "Implement" in box.children[-2].value


_PEFT_COUNTS: dict = {}


def reference_lora_count(config, r, target_modules):
    """What peft itself trains, remembered per model, rank and targets (the explorer asks for every
    rank at each change, and peft builds a model each time)."""
    key = (config.to_json_string(), r, tuple(target_modules))
    if key not in _PEFT_COUNTS:
        _PEFT_COUNTS[key] = peft_lora_count(config, r, target_modules)
    return _PEFT_COUNTS[key]


def test_family_configs_give_the_published_sizes():
    from peftlab.models import LLAMA_FAMILY, family_config
    from peftlab.models import meta_model, param_count

    sizes = {name: param_count(meta_model(family_config(name))) for name in LLAMA_FAMILY}
    assert sizes["SmolLM2-135M"] == 134_515_008
    assert round(sizes["Llama-3.2-1B"] / 1e9, 2) == 1.24
    assert round(sizes["Llama-3.1-8B"] / 1e9, 2) == 8.03
    assert round(sizes["Llama-2-13B"] / 1e9, 1) == 13.0
    assert round(sizes["Llama-3.1-70B"] / 1e9, 1) == 70.6


def test_lora_summary_uses_the_given_count():
    s = widgets.lora_summary(reference_lora_count, "SmolLM2-135M", 8, 16, ("q_proj", "v_proj"))
    assert s["trainable"] == 460_800 and s["total"] == 134_515_008
    assert s["share_percent"] == pytest.approx(100 * 460_800 / 134_515_008)
    assert s["adapter_mb_fp32"] == pytest.approx(1.8432) and s["scaling"] == 2.0
    assert s["rslora_scaling"] == pytest.approx(16 / 8 ** 0.5)


def test_lora_explorer_follows_its_controls():
    box = widgets.lora_explorer(reference_lora_count)
    (controls, targets), report, _ = box.children[0].children, box.children[1], box.children[2]
    model, rank, alpha = controls.children
    model.value, rank.value = "SmolLM2-135M", 8
    assert "<b>460,800 trainable parameters</b>" in report.value
    targets.value = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert "<b>921,600 trainable parameters</b>" in report.value  # STACK_NOTES: r=8 on q,k,v,o
    rank.value = 16
    assert "<b>1,843,200 trainable parameters</b>" in report.value


def test_log_axes_are_labelled_in_plain_text(monkeypatch):
    """Widget plots keep tick labels off matplotlib's mathtext parser (see widgets._redraw) and still
    label every log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []

    def show(*_, **__):
        fig = plt.gcf()
        fig.canvas.draw()
        drawn.append([[t.get_text() for t in axis.get_majorticklabels() + axis.get_minorticklabels()]
                      for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) if axis.get_scale() == "log"])

    monkeypatch.setattr(plt, "show", show)
    widgets.lora_explorer(reference_lora_count)
    assert drawn and len(drawn[-1]) == 4, "the LoRA explorer's two plots are on log-log axes"
    for labels in drawn[-1]:
        assert any(labels), "a log axis without any tick label"
        assert not any("$" in label for label in labels), labels


def test_lora_explorer_plots_what_alpha_does(monkeypatch):
    """The alpha control moves a curve (the update's scale against the rank), not only a number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    monkeypatch.setattr(plt, "show", lambda *_, **__: curves.append(
        {line.get_label(): list(line.get_ydata()) for line in plt.gcf().axes[1].get_lines()}))
    box = widgets.lora_explorer(reference_lora_count)
    model, rank, alpha = box.children[0].children[0].children
    alpha.value, rank.value = 16, 8
    before = curves[-1]["alpha / r (LoRA, peft default)"]
    assert before == pytest.approx([16 / r for r in rank.options])
    assert curves[-1]["alpha / sqrt(r) (rsLoRA)"] == pytest.approx([16 / r ** 0.5 for r in rank.options])
    alpha.value = 64
    assert curves[-1]["alpha / r (LoRA, peft default)"] == pytest.approx([4 * v for v in before])
    assert "scaling alpha/r = 8" in box.children[1].value

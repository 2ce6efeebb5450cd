"""Interactive calculators. Each takes the student's own functions as arguments, so what a student
sees moving is their code at work (and a wrong function shows up as a wrong chart)."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

from peftlab.plots import GB, stacked_memory_bars

# GPU memory in GiB, as nvidia-smi reports the cards: vendors sell GPU memory in binary units, so an
# "80 GB" A100 holds 80 GiB = 85.9e9 bytes, about 7 % more than 80e9. Two cards report less than their
# label: a T4, sold as 16 GB, shows 15,360 MiB (15 GiB), and an H200, sold as 141 GB, 143,771 MiB
# (140 GiB). torch.cuda.get_device_properties reports 1 to 2 % less again (about 79.2 GiB for an 80 GB
# card), and the CUDA context takes some of that: the verdicts leave room for both.
GPUS = {
    "T4 (15 GiB)": 15,
    "RTX 4090 (24 GiB)": 24,
    "A100 40 GB": 40,
    "A100 80 GB": 80,
    "H100 80 GB": 80,
    "H200 (140 GiB)": 140,
}
GiB = 2**30

# Bytes per parameter for the weight, its gradient and its optimizer state (Adam keeps two moments).
PRECISIONS = {
    "mixed bf16 + fp32 master copy, Adam (16 B)": dict(weight_bytes=2, grad_bytes=2, optimizer_bytes=12),
    "fp32 everything, Adam (16 B)": dict(weight_bytes=4, grad_bytes=4, optimizer_bytes=8),
    "bf16 weights, fp32 Adam moments (12 B)": dict(weight_bytes=2, grad_bytes=2, optimizer_bytes=8),
    "bf16 weights, 8-bit Adam (6 B)": dict(weight_bytes=2, grad_bytes=2, optimizer_bytes=2),
}

# NF4 with double quantization: 4 bits per weight plus about 0.127 bits of block constants
# (Dettmers et al., 2023, QLoRA, section 3). Notebook 05 derives this figure.
NF4_DOUBLE_QUANT_BYTES = 4.127 / 8

METHODS = ("full fine-tuning", "LoRA", "QLoRA")

MODEL_SIZES = {
    "SmolLM2-135M": 134_515_008,
    "1B": 1e9,
    "3B": 3e9,
    "7B": 7e9,
    "8B": 8e9,
    "13B": 13e9,
    "34B": 34e9,
    "70B": 70e9,
    "175B (GPT-3)": 175e9,
}

# Hidden size, layers and attention heads of a model of each size, for activation memory: the Llama
# named (Llama 2 and 3 model cards and configs; Code Llama for 34B) and GPT-3 (Brown et al., 2020, Table 2.1).
MODEL_SHAPES = {
    "SmolLM2-135M": (576, 30, 9),
    "1B": (2048, 16, 32),            # Llama-3.2-1B
    "3B": (3072, 28, 24),            # Llama-3.2-3B
    "7B": (4096, 32, 32),            # Llama-2-7B
    "8B": (4096, 32, 32),            # Llama-3.1-8B
    "13B": (5120, 40, 40),           # Llama-2-13B
    "34B": (8192, 48, 64),           # Code Llama 34B
    "70B": (8192, 80, 64),           # Llama-3.1-70B
    "175B (GPT-3)": (12288, 96, 96),
}

ATTENTION = ("memory-efficient", "standard")


def activation_bytes(hidden: int, layers: int, heads: int, batch_size: int, seq_len: int, *,
                     frozen_base: bool = False, attention: str = "memory-efficient",
                     checkpointing: bool = False) -> float:
    """Activation memory of a training step (what the forward pass keeps for the backward pass), by
    Korthikanti et al. (2022, section 4.1): per transformer layer ``s b h (34 + 5 a s / h)`` bytes
    with 16-bit activations and 1-byte dropout masks. The ``5 a s / h`` part is the attention scores;
    memory-efficient attention (FlashAttention, PyTorch's scaled_dot_product_attention) does not keep
    them. With the base frozen, the four linear layers no longer keep their inputs (a linear layer
    needs its input only for its weight's gradient): 34 becomes 20 (adapters add their own inputs on
    top). With gradient checkpointing each layer keeps only its input (2 s b h) and one layer at a
    time is recomputed in full during the backward pass."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    if min(hidden, layers, heads, batch_size, seq_len) < 1:
        raise ValueError("sizes must be positive")
    tokens = batch_size * seq_len
    per_layer = tokens * hidden * ((20 if frozen_base else 34) + (5 * heads * seq_len / hidden if attention == "standard" else 0))
    if checkpointing:
        return layers * 2 * tokens * hidden + per_layer
    return layers * per_layer


def memory_breakdown(memory_fn: Callable, n_params: float, method: str, precision: str,
                     adapter_share: float = 0.005) -> dict[str, float]:
    """Bytes of weights, gradients and optimizer state, each computed with ``memory_fn``.

    ``memory_fn`` has the signature of notebook 01's ``training_memory_bytes``. For LoRA and QLoRA
    the frozen base keeps only its weights (bf16 or NF4) and ``adapter_share`` of the model's size
    is added as trainable adapter parameters.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    sizes = PRECISIONS[precision]
    wb, gb, ob = sizes["weight_bytes"], sizes["grad_bytes"], sizes["optimizer_bytes"]
    if method == "full fine-tuning":
        base_bytes, n_trainable, n_adapter = wb, n_params, 0
    else:
        base_bytes = wb if method == "LoRA" else NF4_DOUBLE_QUANT_BYTES
        n_trainable = n_adapter = round(n_params * adapter_share)
    n_base = round(n_params)

    def only(n, weight=0, grad=0, opt=0):
        return memory_fn(n, n_trainable=n if (grad or opt) else 0, weight_bytes=weight,
                         grad_bytes=grad, optimizer_bytes=opt)

    return {
        "weights": only(n_base, weight=base_bytes) + only(n_adapter, weight=wb),
        "gradients": only(n_trainable, grad=gb),
        "optimizer state": only(n_trainable, opt=ob),
    }


def fit_verdict(total_bytes: float, gpu_gib: float, activations: bool = False) -> str:
    """A one-line verdict for ``total_bytes`` on one GPU of ``gpu_gib`` GiB: training state only, or
    (``activations``) training state and activations."""
    total_gb, capacity_gb = total_bytes / GB, gpu_gib * GiB / GB
    card = f"{gpu_gib:g} GiB ({capacity_gb:,.1f} GB)"
    rest = "the CUDA context and fragmentation" if activations else "activations and the CUDA context"
    if total_gb > capacity_gb:
        gpus = math.ceil(total_gb / capacity_gb)
        return (f"Does not fit: {total_gb:,.1f} GB needed on a GPU of {card} "
                f"(at least {gpus} such GPUs with the state sharded across them"
                f"{'' if activations else ', before activations'}).")
    left = capacity_gb - total_gb
    if left < 0.1 * capacity_gb:
        return (f"Only just: {total_gb:,.1f} GB of {card}, leaving {left:,.1f} GB for "
                f"{rest}; expect out-of-memory errors.")
    return f"Fits: {total_gb:,.1f} GB of {card}, leaving {left:,.1f} GB for {'the rest' if activations else 'activations'}."


def will_it_fit(memory_fn: Callable):
    """The "Will it fit?" calculator: model, precision, method, GPU, batch size, sequence length,
    attention and gradient checkpointing -> stacked bar (training state and activations) and verdict."""
    import ipywidgets as widgets

    style = {"description_width": "110px"}
    layout = widgets.Layout(width="480px")
    model = widgets.Dropdown(options=list(MODEL_SIZES), value="7B", description="Model size",
                             style=style, layout=layout)
    precision = widgets.Dropdown(options=list(PRECISIONS), description="Precision", style=style,
                                 layout=layout)
    method = widgets.ToggleButtons(options=METHODS, description="Method", style=style)
    share = widgets.FloatLogSlider(value=0.5, base=10, min=-2, max=1, step=0.1,
                                   description="Adapter % ", readout_format=".2f", style=style,
                                   layout=layout)
    gpu = widgets.Dropdown(options=list(GPUS), value="A100 80 GB", description="GPU", style=style,
                           layout=layout)
    batch = widgets.Dropdown(options=[1, 2, 4, 8, 16, 32, 64], value=1, description="Batch size", style=style,
                             layout=layout)
    seq_len = widgets.Dropdown(options=[256, 512, 1024, 2048, 4096, 8192, 16384], value=2048,
                               description="Sequence length", style=style, layout=layout)
    attention = widgets.ToggleButtons(options=ATTENTION, description="Attention", style=style)
    checkpointing = widgets.Checkbox(value=False, description="Gradient checkpointing", style=style)
    verdict = widgets.HTML()
    plot = widgets.Output()

    def update(*_):
        share.disabled = method.value == "full fine-tuning"
        try:
            parts = memory_breakdown(memory_fn, MODEL_SIZES[model.value], method.value,
                                     precision.value, share.value / 100)
        except NotImplementedError:
            verdict.value = "<b>Implement <code>training_memory_bytes</code> above first.</b>"
            return
        parts["activations"] = activation_bytes(*MODEL_SHAPES[model.value], batch.value, seq_len.value,
                                                frozen_base=method.value != "full fine-tuning",
                                                attention=attention.value, checkpointing=checkpointing.value)
        total = sum(parts.values())
        detail = ", ".join(f"{k} {v / GB:,.2f} GB" for k, v in parts.items())
        verdict.value = (f"<b>{fit_verdict(total, GPUS[gpu.value], activations=True)}</b><br>"
                         f"<span style='font-size:90%'>{detail}</span>")
        with _redraw(plot, figsize=(7, 1.9)) as ax:
            stacked_memory_bars(ax, [f"{model.value}, {method.value}"], [parts],
                                {gpu.value: GPUS[gpu.value] * GiB / GB}, horizontal=True)
            ax.set_xlim(0, max(total / GB, GPUS[gpu.value] * GiB / GB) * 1.08)

    controls = (model, precision, method, share, gpu, batch, seq_len, attention, checkpointing)
    box = widgets.VBox([*controls, verdict, plot])
    return _show(box, "peftlab-will-it-fit", controls, update)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_summary(lora_count_fn: Callable, model_name: str, r: int, lora_alpha: float,
                 target_modules) -> dict[str, float]:
    """Trainable LoRA parameters (from the student's ``llama_lora_param_count``), share of the model
    and adapter size, for a model of `peftlab.models.LLAMA_FAMILY`."""
    from peftlab.models import family_config

    config = family_config(model_name)
    total = _model_total(model_name)
    trainable = lora_count_fn(config, r, tuple(target_modules))
    return {"total": total, "trainable": trainable, "share_percent": 100 * trainable / total,
            "adapter_mb_fp32": trainable * 4 / 1e6, "adapter_mb_bf16": trainable * 2 / 1e6,
            "model_gb_bf16": total * 2 / GB, "scaling": lora_alpha / r, "rslora_scaling": lora_alpha / r ** 0.5}


_TOTALS: dict[str, int] = {}


def _model_total(model_name: str) -> int:
    if model_name not in _TOTALS:
        from peftlab.models import family_config, meta_model, param_count

        _TOTALS[model_name] = param_count(meta_model(family_config(model_name)))
    return _TOTALS[model_name]


def lora_explorer(lora_count_fn: Callable):
    """Rank, alpha, target modules and model size -> trainable parameters, share, adapter size."""
    import ipywidgets as widgets

    from peftlab.models import LLAMA_FAMILY

    style = {"description_width": "110px"}
    model = widgets.Dropdown(options=list(LLAMA_FAMILY), value="Llama-3.1-8B", description="Model",
                             style=style)
    rank = widgets.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128, 256], value=16,
                                   description="Rank r", style=style)
    alpha = widgets.IntSlider(value=32, min=1, max=512, description="lora_alpha", style=style)
    targets = widgets.SelectMultiple(options=LORA_TARGETS, value=("q_proj", "v_proj"), rows=7,
                                     description="Targets", style=style)
    report = widgets.HTML()
    plot = widgets.Output()

    def update(*_):
        chosen = targets.value or ("q_proj",)
        try:
            s = lora_summary(lora_count_fn, model.value, rank.value, alpha.value, chosen)
        except NotImplementedError:
            report.value = "<b>Implement <code>llama_lora_param_count</code> above first.</b>"
            return
        report.value = (
            f"<b>{s['trainable']:,} trainable parameters</b> = {s['share_percent']:.3f} % of "
            f"{s['total']:,}<br>adapter file: {s['adapter_mb_fp32']:,.1f} MB in fp32, "
            f"{s['adapter_mb_bf16']:,.1f} MB in bf16 (the model: {s['model_gb_bf16']:,.1f} GB in bf16)<br>"
            f"scaling alpha/r = {s['scaling']:.3g} (rsLoRA alpha/sqrt(r) = {s['rslora_scaling']:.3g})")
        ranks = rank.options
        shares = [lora_summary(lora_count_fn, model.value, r, alpha.value, chosen)["share_percent"] for r in ranks]
        with _redraw(plot, figsize=(10, 3), ncols=2) as (ax, scale_ax):
            ax.loglog(ranks, shares, marker="o")
            ax.scatter([rank.value], [s["share_percent"]], s=120, zorder=3, color="C3", label=f"r = {rank.value}")
            ax.set_xlabel("rank r")
            ax.set_ylabel("trainable share of the model (%)")
            ax.set_title(f"{model.value}, targets: {', '.join(chosen)}", fontsize=9)
            ax.legend()
            # What alpha does: it multiplies the update BA. With alpha fixed, alpha / r shrinks the update
            # as the rank grows; rsLoRA's alpha / sqrt(r) shrinks it more slowly.
            scale_ax.loglog(ranks, [alpha.value / r for r in ranks], marker="o", label="alpha / r (LoRA, peft default)")
            scale_ax.loglog(ranks, [alpha.value / math.sqrt(r) for r in ranks], marker="s", linestyle="--",
                            label="alpha / sqrt(r) (rsLoRA)")
            scale_ax.scatter([rank.value], [s["scaling"]], s=120, zorder=3, color="C3")
            scale_ax.set_xlabel("rank r")
            scale_ax.set_ylabel("scale of the update BA")
            scale_ax.set_title(f"lora_alpha = {alpha.value}: the update is multiplied by {s['scaling']:.3g} at r = {rank.value}",
                               fontsize=9)
            scale_ax.legend(fontsize=8)

    box = widgets.VBox([widgets.HBox([widgets.VBox([model, rank, alpha]), targets]), report, plot])
    return _show(box, "peftlab-lora-explorer", (model, rank, alpha, targets), update)


def virtual_token_explorer(prompt_count_fn: Callable | None = None, prefix_count_fn: Callable | None = None):
    """Number of virtual tokens and model size -> trainable parameters and share of the model, for
    prompt tuning (``prompt_count_fn(config, P)``) and/or prefix tuning (``prefix_count_fn``): each
    notebook passes only the student's own functions."""
    import ipywidgets as widgets

    from peftlab.models import LLAMA_FAMILY, family_config

    style = {"description_width": "130px"}
    model = widgets.Dropdown(options=list(LLAMA_FAMILY), value="SmolLM2-135M", description="Model", style=style)
    tokens = widgets.IntSlider(value=16, min=1, max=256, description="Virtual tokens P", style=style)
    report = widgets.HTML()
    plot = widgets.Output()
    methods = {name: fn for name, fn in (("prompt tuning", prompt_count_fn), ("prefix tuning", prefix_count_fn))
               if fn is not None}
    if not methods:
        raise ValueError("give prompt_count_fn, prefix_count_fn or both")

    def update(*_):
        config, total = family_config(model.value), _model_total(model.value)
        try:
            counts = {name: fn(config, tokens.value) for name, fn in methods.items()}
        except NotImplementedError:
            report.value = "<b>Implement the parameter count above first.</b>"
            return
        report.value = "<br>".join(
            f"<b>{name}</b>: {n:,} trainable parameters = {100 * n / total:.5f} % of {total:,}"
            f" ({n * 4 / 1e6:,.2f} MB in fp32)" for name, n in counts.items())
        sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256]
        with _redraw(plot, figsize=(6, 3)) as ax:
            for name, fn in methods.items():
                ax.loglog(sizes, [100 * fn(config, p) / total for p in sizes], marker="o", label=name)
                ax.scatter([tokens.value], [100 * counts[name] / total], s=100, zorder=3, color="C3")
            ax.set_xlabel("virtual tokens P")
            ax.set_ylabel("trainable share (%)")
            ax.set_title(model.value, fontsize=9)
            ax.legend()

    box = widgets.VBox([model, tokens, report, plot])
    return _show(box, "peftlab-virtual-tokens", (model, tokens), update)


@contextmanager
def _redraw(plot, figsize: tuple[float, float], ncols: int = 1):
    """Replace the figure in the ``plot`` Output widget: yields a fresh Axes (``ncols`` of them when
    more than one), then lays out, shows and closes the figure (the inline backend has drawn it; keeping every redraw would leak memory).

    Log axes get plain-text labels ("100", "0.01") instead of matplotlib's default mathtext ones
    ("$10^{2}$"): a redraw of the quantization explorer failed inside the mathtext parser
    ("Expected end of text, found '$'", matplotlib 3.11.2, pyparsing 3.3.3) once in CI and in 3 of
    about 20 browser runs here with the CPUs loaded, always on the main thread and never re-entered;
    plain labels keep the plot off that code path. An error is shown in the widget's output,
    never raised into the kernel's message handler.
    """
    import matplotlib.pyplot as plt

    with plot:
        plot.clear_output(wait=True)
        fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
        axes = list(axes[0])
        try:
            yield axes[0] if ncols == 1 else axes
            for ax in axes:
                _plain_log_labels(ax)
            fig.tight_layout()
            plt.show()
        finally:
            plt.close(fig)


def _plain_log_labels(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogFormatter

    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":
            axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,g}"))
            axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _show(box, css_class: str, controls, update):
    """Wire each control to ``update``, draw once, tag the widget for tests and styling, display it."""
    from IPython.display import display

    for control in controls:
        control.observe(update, names="value")
    update()
    box.add_class(css_class)
    display(box)
    return box


QUANT_BLOCK_SIZES = {"whole tensor": None, "16": 16, "32": 32, "64": 64, "128": 128, "256": 256, "1024": 1024}


def quantization_error(quantize_fn: Callable, dequantize_fn: Callable, weights, bits: int,
                       blocksize: int | None) -> dict:
    """Round-trip ``weights`` through the student's blockwise quantizer (``blocksize=None``: one block for
    the whole tensor) and return the errors and their summary."""
    n = weights.numel()
    size = n if blocksize is None else blocksize
    q, absmax = quantize_fn(weights, blocksize=size, bits=bits)
    restored = dequantize_fn(q, absmax, weights.shape, blocksize=size, bits=bits)
    error = (restored - weights).reshape(-1)
    rms = weights.pow(2).mean().sqrt().item()
    return {"error": error, "rms_error": error.pow(2).mean().sqrt().item(),
            "max_error": error.abs().max().item(), "relative_rms": error.pow(2).mean().sqrt().item() / rms,
            "zeroed": int(((restored == 0) & (weights != 0)).sum())}


def quantization_explorer(quantize_fn: Callable, dequantize_fn: Callable, n: int = 4096):
    """Bits, block size and outliers -> histogram of the round-trip error of the student's blockwise
    quantizer, next to the same data quantized with one scale for the whole tensor."""
    import ipywidgets as widgets

    from peftlab.quant import outlier_weights

    style = {"description_width": "110px"}
    bits = widgets.IntSlider(value=4, min=2, max=8, description="Bits", style=style)
    block = widgets.Dropdown(options=list(QUANT_BLOCK_SIZES), value="64", description="Block size", style=style)
    outliers = widgets.IntSlider(value=4, min=0, max=64, description="Outliers", style=style)
    scale = widgets.FloatLogSlider(value=20, base=10, min=0, max=2.5, description="Outlier size (x)", style=style)
    report = widgets.HTML()
    plot = widgets.Output()

    def update(*_):
        w = outlier_weights(n, outliers.value, scale.value)
        try:
            ours = quantization_error(quantize_fn, dequantize_fn, w, bits.value, QUANT_BLOCK_SIZES[block.value])
            whole = quantization_error(quantize_fn, dequantize_fn, w, bits.value, None)
        except NotImplementedError:
            report.value = "<b>Implement <code>quantize_blockwise</code> and <code>dequantize_blockwise</code> first.</b>"
            return
        report.value = (
            f"<b>block size {block.value}</b>: RMS error {ours['rms_error']:.2e} ({ours['relative_rms']:.1%} of the "
            f"weights' RMS), {ours['zeroed']:,} of {n:,} weights rounded to zero<br>"
            f"<b>whole tensor</b>: RMS error {whole['rms_error']:.2e} ({whole['relative_rms']:.1%}), "
            f"{whole['zeroed']:,} rounded to zero")
        with _redraw(plot, figsize=(7, 3)) as ax:
            limit = max(whole["max_error"], ours["max_error"], 1e-12)
            bins = _linspace(-limit, limit, 81)
            ax.hist(whole["error"].tolist(), bins=bins, alpha=0.5, label="one scale for the whole tensor")
            chosen = "the same (block size: whole tensor)" if block.value == "whole tensor" else f"blocks of {block.value}"
            ax.hist(ours["error"].tolist(), bins=bins, alpha=0.7, label=chosen)
            ax.set_yscale("log")
            ax.set_xlabel("dequantized - original")
            ax.set_ylabel("weights")
            ax.set_title(f"{bits.value}-bit absmax quantization of {n:,} weights, {outliers.value} outliers", fontsize=9)
            ax.legend(fontsize=8)

    box = widgets.VBox([widgets.HBox([widgets.VBox([bits, block]), widgets.VBox([outliers, scale])]), report, plot])
    return _show(box, "peftlab-quantization-explorer", (bits, block, outliers, scale), update)


def _linspace(start: float, stop: float, steps: int) -> list[float]:
    return [start + (stop - start) * i / (steps - 1) for i in range(steps)]

"""The course's explanatory diagrams, drawn with matplotlib.

`autograder/release.py` renders each one to PNG and attaches it to the solutions' markdown cell that
shows it (``![text alternative](attachment:NAME.png)``), so a diagram shows before any cell runs, in
JupyterLab, Colab and nbgrader's feedback, offline. (PNG, not SVG: JupyterLab 4 renders a markdown
attachment only in the raster image types.) Data plots are not here: the notebooks draw them
from what their cells measure (`peftlab.plots`).
"""

from __future__ import annotations

import base64
import io

FROZEN, TRAINABLE, DATA, BACKWARD, INK = "#B8C0CC", "#F28E2B", "#9DBBE0", "#C44E52", "#222222"


def _axes(width: float, height: float, xlim: tuple[float, float], ylim: tuple[float, float]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


def _box(ax, x, y, w, h, text="", colour=FROZEN, size=9, **kw):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", facecolor=colour,
                                edgecolor=kw.pop("edge", INK), linewidth=kw.pop("lw", 1.0), **kw))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, color=INK)


def _arrow(ax, start, end, colour=INK, text="", style="-|>", dashed=False, size=8, offset=(0, 0.12)):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle=style, color=colour, lw=1.2,
                                                          linestyle="--" if dashed else "-", shrinkA=2, shrinkB=2))
    if text:
        ax.text((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1], text,
                ha="center", va="bottom", fontsize=size, color=colour)


def _legend(ax, x, y, items, size=8):
    for i, (colour, label) in enumerate(items):
        _box(ax, x, y - i * 0.42, 0.3, 0.26, colour=colour)
        ax.text(x + 0.45, y - i * 0.42 + 0.13, label, va="center", fontsize=size, color=INK)


def lora_bypass():
    """04: the frozen weight and the trainable low-rank path beside it."""
    from matplotlib.patches import Circle, Polygon

    fig, ax = _axes(8.4, 3.9, (0, 12.6), (-0.9, 5.0))
    ax.text(0.5, 2.0, "x\n(in)", ha="center", va="center", fontsize=11)
    _box(ax, 3.2, 3.0, 3.4, 1.3, "W₀   out × in\nfrozen: no gradient,\nno optimizer state", FROZEN)
    ax.add_patch(Polygon([(2.6, 0.2), (2.6, 1.8), (3.9, 1.25), (3.9, 0.75)], closed=True,
                         facecolor=TRAINABLE, edgecolor=INK))
    ax.text(3.15, 1.0, "A", ha="center", va="center", fontsize=11, weight="bold")
    ax.text(3.25, -0.25, "r × in\nrandom start", ha="center", va="top", fontsize=8)
    ax.add_patch(Polygon([(4.6, 0.75), (4.6, 1.25), (5.9, 1.8), (5.9, 0.2)], closed=True,
                         facecolor=TRAINABLE, edgecolor=INK))
    ax.text(5.35, 1.0, "B", ha="center", va="center", fontsize=11, weight="bold")
    ax.text(5.25, -0.25, "out × r\nstarts at zero", ha="center", va="top", fontsize=8)
    ax.text(4.25, 1.0, "r", ha="center", va="center", fontsize=9, style="italic")
    _box(ax, 6.7, 0.6, 1.3, 0.8, "× α / r", "white")
    ax.add_patch(Circle((9.0, 2.0), 0.32, facecolor="white", edgecolor=INK))
    ax.text(9.0, 2.0, "+", ha="center", va="center", fontsize=14)
    ax.text(11.3, 2.0, "h (out)", ha="center", va="center", fontsize=11)
    _arrow(ax, (0.9, 2.2), (3.2, 3.6))
    _arrow(ax, (0.9, 1.8), (2.6, 1.0))
    _arrow(ax, (3.9, 1.0), (4.6, 1.0))
    _arrow(ax, (5.9, 1.0), (6.7, 1.0))
    _arrow(ax, (6.6, 3.6), (8.8, 2.25))
    _arrow(ax, (8.0, 1.0), (8.78, 1.78))
    _arrow(ax, (9.32, 2.0), (10.6, 2.0))
    ax.text(4.25, 4.75, "h = W₀ x + (α / r) · B A x", ha="center", fontsize=11)
    ax.text(10.1, 0.55, "trainable: r × (in + out)\nnumbers per layer;\nB = 0: the model starts\n"
            "exactly as the base", ha="center", va="top", fontsize=8)
    _legend(ax, 10.0, 4.6, [(FROZEN, "frozen"), (TRAINABLE, "trained")])
    return fig


def _grid(ax, x0, y0, columns, rows, labels, cell=0.62, gap=0.08):
    """A row of cells per layer: ``columns`` is a list of colours (None leaves a gap)."""
    for r in range(rows):
        y = y0 + r * (cell + 0.5)
        for c, colour in enumerate(columns):
            if colour:
                _box(ax, x0 + c * (cell + gap), y, cell, cell, labels[r][c] if labels else "", colour, size=7)


def virtual_tokens():
    """02 and 03: where prompt tuning and prefix tuning enter the model."""
    fig, ax = _axes(9.6, 5.6, (0, 19.2), (-1.6, 9.6))
    cell, gap, p, t = 0.62, 0.08, 2, 4
    step = cell + gap
    # prompt tuning: P trained vectors at the input, ordinary positions above
    ax.text(4.3, 9.0, "Prompt tuning (notebook 02)", ha="center", fontsize=11, weight="bold")
    x0 = 1.6
    for layer, y in (("embeddings", 0.0), ("layer 1", 1.6), ("layer L", 4.3)):
        ax.text(x0 - 0.2, y + cell / 2, layer, ha="right", va="center", fontsize=8)
        for c in range(p + t):
            colour = (TRAINABLE if c < p else DATA) if layer == "embeddings" else "white"
            _box(ax, x0 + c * step, y, cell, cell, "", colour)
    ax.text(x0 + 3 * step, 3.25, "⋮", ha="center", fontsize=14)
    for c in range(p + t):
        _arrow(ax, (x0 + c * step + cell / 2, 0.65), (x0 + c * step + cell / 2, 1.55), style="-")
    _box(ax, x0, 5.8, (p + t) * step - gap, 0.6, "logits: P + T positions", "white", size=8)
    ax.text(x0 + p * step / 2 - gap / 2, -0.25, "P virtual\ntokens", ha="center", va="top", fontsize=8)
    ax.text(x0 + (p + t / 2) * step, -0.25, "T input tokens", ha="center", va="top", fontsize=8)
    ax.text(4.3, 7.1, "trained: P × hidden size", ha="center", fontsize=9)
    # prefix tuning: P keys and values in every layer, no input positions added
    ax.text(14.0, 9.0, "Prefix tuning (notebook 03)", ha="center", fontsize=11, weight="bold")
    x1 = 11.6
    for layer, y in (("embeddings", 0.0), ("layer 1", 1.6), ("layer L", 4.3)):
        ax.text(x1 - 0.2, y + cell / 2, layer, ha="right", va="center", fontsize=8)
        for c in range(p + t):
            if c < p and layer == "embeddings":
                continue
            colour = TRAINABLE if c < p else (DATA if layer == "embeddings" else "white")
            _box(ax, x1 + c * step, y, cell, cell, "K,V" if c < p else "", colour, size=6)
    ax.text(x1 + 3 * step, 3.25, "⋮", ha="center", fontsize=14)
    _box(ax, x1 + p * step, 5.8, t * step - gap, 0.6, "logits: T positions", "white", size=8)
    ax.text(x1 + p * step / 2 - gap / 2, 2.45, "a pre-filled\nKV cache", ha="center", va="bottom", fontsize=7)
    ax.text(x1 + (p + t / 2) * step, -0.25, "T input tokens", ha="center", va="top", fontsize=8)
    ax.text(14.0, 7.1, "trained: 2 × L × P × (kv heads × head dim)", ha="center", fontsize=9)
    ax.text(14.2, -1.35, "prefix positions have keys and values only: no query, no output",
            ha="center", fontsize=8, style="italic")
    _legend(ax, 7.0, 8.1, [(TRAINABLE, "trained"), (DATA, "token embeddings (frozen)")])
    return fig


def kv_cache():
    """03: the cache and the attention mask while a left-padded batch is generated greedily."""
    fig, ax = _axes(9.6, 4.6, (0, 19.6), (-1.2, 7.9))
    cell, step = 0.8, 0.95
    columns = ["prefix"] * 2 + ["pad", "pad", "tok", "tok", "tok", "new", "new"]
    rows = [("sequence 1 (short)", columns),
            ("sequence 2 (long)", ["prefix"] * 2 + ["tok"] * 5 + ["new", "new"])]
    colours = {"prefix": TRAINABLE, "pad": "white", "tok": DATA, "new": "#C9E4C5"}
    x0 = 4.2
    for r, (label, kinds) in enumerate(rows):
        y = 4.6 - r * 2.4
        ax.text(x0 - 0.3, y + cell / 2, label, ha="right", va="center", fontsize=9)
        for c, kind in enumerate(kinds):
            _box(ax, x0 + c * step, y, cell, cell, "", colours[kind], edge="0.5" if kind == "pad" else INK)
            mask = 0 if kind == "pad" else 1
            ax.text(x0 + c * step + cell / 2, y - 0.35, str(mask), ha="center", va="center", fontsize=8,
                    color=BACKWARD if mask == 0 else INK)
        ax.text(x0 - 0.3, y - 0.35, "attention mask", ha="right", va="center", fontsize=7)
    top = 5.6
    for lo, hi, text in ((0, 2, "prefix (P)"), (2, 7, "prompt, left-padded"), (7, 9, "generated")):
        ax.annotate("", xy=(x0 + lo * step, top), xytext=(x0 + hi * step - 0.1, top),
                    arrowprops=dict(arrowstyle="-", color=INK))
        ax.text(x0 + (lo + hi) * step / 2, top + 0.15, text, ha="center", va="bottom", fontsize=8)
    ax.text(x0 + 4.5 * step, -1.0, "each layer's cache: keys and values of shape "
            "(batch, kv heads, P + prompt + steps, head dim)", ha="center", fontsize=8)
    _legend(ax, 13.6, 5.1, [(TRAINABLE, "prefix keys and values"), ("white", "padding (masked out)"),
                            (DATA, "prompt tokens"), ("#C9E4C5", "generated tokens")])
    ax.text(13.6, 2.9, "One forward pass over the prompt\nfills the cache; then each step runs\none new token per row.\n"
            "Left padding puts every last prompt\ntoken in the same column, so that\nnew token continues every row.",
            va="top", fontsize=8)
    return fig


def qlora_dataflow():
    """06: what a QLoRA layer stores, dequantizes, keeps for backward, and trains."""
    fig, ax = _axes(9.6, 4.8, (0, 19.2), (-0.8, 8.8))
    _box(ax, 0.2, 5.2, 4.4, 2.4, "stored (frozen)\n\nNF4 codes, 2 a byte\n+ block constants\n(8-bit, double quantized)",
         FROZEN, size=8)
    _box(ax, 6.0, 5.6, 3.6, 1.6, "dequantize\nto the compute dtype\n(bf16 or fp16)", "white", size=8)
    _box(ax, 11.0, 5.6, 2.6, 1.6, "W\ntemporary", DATA, size=8)
    _arrow(ax, (4.6, 6.4), (6.0, 6.4))
    _arrow(ax, (9.6, 6.4), (11.0, 6.4))
    ax.text(0.9, 3.4, "x", ha="center", va="center", fontsize=12)
    _box(ax, 11.0, 3.0, 2.6, 0.9, "W x", "white", size=9)
    _arrow(ax, (12.3, 5.6), (12.3, 3.9))
    _arrow(ax, (1.2, 3.45), (11.0, 3.45))
    _box(ax, 5.0, 0.6, 1.4, 1.0, "A", TRAINABLE, size=10)
    _box(ax, 7.6, 0.6, 1.4, 1.0, "B", TRAINABLE, size=10)
    _box(ax, 10.2, 0.6, 1.6, 1.0, "× α / r", "white", size=8)
    _arrow(ax, (1.2, 3.25), (5.0, 1.1))
    _arrow(ax, (6.4, 1.1), (7.6, 1.1))
    _arrow(ax, (9.0, 1.1), (10.2, 1.1))
    ax.text(15.0, 2.45, "+", ha="center", va="center", fontsize=16)
    _arrow(ax, (13.6, 3.45), (14.8, 2.6))
    _arrow(ax, (11.8, 1.1), (14.8, 2.3))
    ax.text(17.6, 2.45, "y", ha="center", va="center", fontsize=12)
    _arrow(ax, (15.2, 2.45), (17.3, 2.45))
    # backward
    _arrow(ax, (14.6, -0.2), (5.2, -0.2), BACKWARD, "backward: weight gradients for B and A only", dashed=True,
           offset=(0, -0.55))
    _arrow(ax, (10.8, 2.9), (1.4, 2.9), BACKWARD, "backward: to the input x, through W dequantized again", dashed=True,
           offset=(0, -0.5))
    ax.text(14.2, 7.9, "The optimizer (and its state) sees only A and B.\n"
            "For the backward pass autograd keeps x and A x;\n"
            "bitsandbytes' layer keeps the packed 4-bit weight,\nnot the dequantized W.", va="top", fontsize=8)
    _legend(ax, 14.2, 4.9, [(FROZEN, "4-bit, frozen"), (DATA, "compute dtype, temporary"), (TRAINABLE, "trained (16 or 32 bits)")])
    return fig


DIAGRAMS = {"lora_bypass.png": lora_bypass, "virtual_tokens.png": virtual_tokens, "kv_cache.png": kv_cache,
            "qlora_dataflow.png": qlora_dataflow}
DPI = 110


def png(name: str) -> bytes:
    """The diagram as PNG, the same bytes on every run with the pinned matplotlib (no metadata)."""
    import matplotlib
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"font.family": "DejaVu Sans"}):
        fig = DIAGRAMS[name]()
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
    return out.getvalue()


def attachment(name: str) -> dict:
    """A notebook cell attachment (nbformat: base64 data, as JupyterLab and nbconvert read it)."""
    return {"image/png": base64.b64encode(png(name)).decode()}

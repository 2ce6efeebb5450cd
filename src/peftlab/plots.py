"""Matplotlib helpers shared by the notebooks and widgets (no exercise logic lives here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

GB = 1e9  # decimal gigabytes, the course's unit for byte counts (GPU capacities are in GiB: widgets.GPUS)

# One colour per memory component, used by every memory chart in the course.
COMPONENT_COLOURS = {
    "weights": "#4C72B0",
    "gradients": "#DD8452",
    "optimizer state": "#55A868",
    "activations": "#C44E52",
}


def stacked_memory_bars(ax, labels: Sequence[str], breakdowns: Sequence[Mapping[str, float]],
                        limits: Mapping[str, float] | None = None, horizontal: bool = False):
    """Draw one stacked bar per label from ``{component: bytes}`` dicts, in GB.

    ``limits`` maps a name (e.g. a GPU) to a capacity in GB, drawn as a dashed line.
    """
    components = [c for c in COMPONENT_COLOURS if any(b.get(c, 0) for b in breakdowns)]
    bottoms = [0.0] * len(labels)
    positions = range(len(labels))
    for component in components:
        values = [b.get(component, 0) / GB for b in breakdowns]
        if horizontal:
            ax.barh(positions, values, left=bottoms, label=component,
                    color=COMPONENT_COLOURS[component])
        else:
            ax.bar(positions, values, bottom=bottoms, label=component,
                   color=COMPONENT_COLOURS[component])
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for name, capacity in (limits or {}).items():
        line = ax.axvline if horizontal else ax.axhline
        line(capacity, linestyle="--", color="0.3", linewidth=1)
        if horizontal:
            ax.annotate(f"{name} ({capacity:,.1f} GB)", (capacity, len(labels) - 0.5),
                        rotation=90, va="top", ha="right", fontsize=8, color="0.3")
        else:
            ax.annotate(f"{name} ({capacity:,.1f} GB)", (len(labels) - 0.5, capacity),
                        va="bottom", ha="right", fontsize=8, color="0.3")
    if horizontal:
        ax.set_yticks(list(positions), labels)
        ax.set_xlabel("memory (GB)")
    else:
        ax.set_xticks(list(positions), labels)
        ax.set_ylabel("memory (GB)")
    if horizontal:  # a single long bar: keep the legend off it
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    else:
        ax.legend(loc="best", fontsize=8)
    return ax


def levels_over_histogram(ax, values, levels, title: str, colour: str = "#C44E52"):
    """A histogram of block-normalised weights (``values`` in [-1, 1]) with a quantizer's ``levels``
    drawn over it as vertical lines: where the levels sit against where the weights are."""
    ax.hist(values, bins=160, range=(-1, 1), color="0.72")
    for level in levels:
        ax.axvline(float(level), color=colour, linewidth=0.9)
    ax.set_title(title, fontsize=9)
    ax.set_yticks([])
    ax.set_xlim(-1.05, 1.05)
    return ax


def predicted_vs_measured(ax, groups: Mapping[str, tuple[Mapping[str, float], Mapping[str, float] | float]],
                          unit: float = GB, unit_name: str = "GB"):
    """Two bars per group, the prediction and the measurement, each stacked by term where it has terms
    (a measurement given as one number is one grey bar). ``groups``: {label: (predicted, measured)}."""
    import matplotlib.pyplot as plt

    terms = list(dict.fromkeys(t for p, m in groups.values() for t in [*p, *(m if isinstance(m, Mapping) else [])]))
    palette = dict(zip(terms, plt.get_cmap("tab10").colors))
    ticks, names = [], []
    for g, (label, (predicted, measured)) in enumerate(groups.items()):
        for offset, (kind, parts) in zip((-0.2, 0.2), (("predicted", predicted), ("measured", measured))):
            x, bottom = 3 * g + offset * 3, 0.0
            if isinstance(parts, Mapping):
                for term, value in parts.items():
                    ax.bar(x, value / unit, 0.5, bottom=bottom, color=palette[term], edgecolor="white", linewidth=0.5)
                    bottom += value / unit
            else:
                ax.bar(x, parts / unit, 0.5, color="0.45", hatch="//", edgecolor="white")
            ticks.append(x)
            names.append(f"{kind}\n{label}" if offset < 0 else kind)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in palette.values()]
    if any(not isinstance(m, Mapping) for _, m in groups.values()):
        handles.append(plt.Rectangle((0, 0), 1, 1, color="0.45", hatch="//"))
        terms = [*terms, "measured (one total)"]
    ax.legend(handles, terms, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xticks(ticks, names, fontsize=8)
    ax.set_ylabel(f"memory ({unit_name})")
    return ax

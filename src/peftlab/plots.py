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

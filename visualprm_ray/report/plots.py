"""The report's plots: matplotlib figures rendered to PNG bytes with the Agg canvas.

No pyplot: figures are built as plain :class:`matplotlib.figure.Figure` objects on an Agg canvas, so
making a report never touches the process-wide backend (a notebook that calls it keeps its inline
plots) and nothing is left open between calls.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from visualprm_ray.report.data import MAX_POSITIONS, ReportError

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from visualprm_ray.report.data import Summary

INSTALL_HINT = "pip install 'visualprm-ray[report]'"

BLUE = "#3567a8"
ORANGE = "#e07b39"
GREY = "#6b7280"
DPI = 150
SIZE = (6.4, 3.5)  # inches: 960 x 525 px at DPI, shown at half that on a 2x screen
SCATTER_POINTS = 4000  # more would only blur into a blob and slow the page down


@dataclass(frozen=True)
class Plot:
    key: str
    title: str
    caption: str
    png: bytes


def require_matplotlib() -> None:
    """Fail with the install command when the optional plotting dependency is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError(
            f"the report draws its plots with matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None


def make_plots(summary: Summary, *, threshold: float | None = 0.5) -> list[Plot]:
    """Every plot the data allows, in page order; a plot without data is left out, not drawn empty."""
    import matplotlib

    style = {
        "font.size": 9,
        "axes.titlesize": 10,
        "axes.labelsize": 9,
        "axes.edgecolor": "#9ca3af",
        "axes.labelcolor": "#374151",
        "xtick.color": "#4b5563",
        "ytick.color": "#4b5563",
        "legend.frameon": False,
        "legend.fontsize": 8,
    }
    plots = []
    with matplotlib.rc_context(style):
        if len(summary.scores):
            plots.append(_score_histogram(summary, threshold))
        if len(summary.step_values):
            plots.append(_steps_by_position(summary, threshold))
        if len(summary.scores):
            plots.append(_score_vs_steps(summary, threshold))
        if len(summary.margins):
            plots.append(_margins(summary))
    return plots


# -------------------------------------------------------------------------------------------- helpers


def _figure() -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    # Fixed margins rather than a layout engine: every plot has the same frame, and a constrained
    # layout would draw each figure twice (half of the report's time).
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.14, top=0.92)
    ax = fig.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    return fig, ax


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    # No Software/date metadata: the same data gives the same bytes.
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return buffer.getvalue()


def _bucket_labels(values: np.ndarray) -> tuple[np.ndarray, list[int], list[str]]:
    """Values clipped to MAX_POSITIONS, the buckets present, and their tick labels ("24+" last)."""
    import numpy as np

    clipped = np.minimum(values, MAX_POSITIONS)
    present = sorted(int(v) for v in np.unique(clipped))
    labels = [f"{v}+" if v == MAX_POSITIONS and (values > MAX_POSITIONS).any() else str(v) for v in present]
    return clipped, present, labels


def _integer_counts(ax: Axes) -> None:
    """Whole numbers on a count axis, and headroom above the tallest bar for the legend."""
    from matplotlib.ticker import MaxNLocator

    ax.set_ylim(0, ax.get_ylim()[1] * 1.18)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 5, 10], integer=True))


def _threshold_line(ax: Axes, threshold: float | None, *, vertical: bool) -> None:
    if threshold is None:
        return
    draw = ax.axvline if vertical else ax.axhline
    draw(threshold, color=GREY, linestyle="--", linewidth=1, label=f"step threshold {threshold:g}")


def _boxes(ax: Axes, groups: list[np.ndarray], positions: list[int]) -> None:
    parts = ax.boxplot(
        groups,
        positions=positions,
        widths=0.6,
        showfliers=False,
        patch_artist=True,
        medianprops={"color": "#1f2937", "linewidth": 1.2},
        whiskerprops={"color": GREY},
        capprops={"color": GREY},
        boxprops={"edgecolor": BLUE, "linewidth": 1},
    )
    for box in parts["boxes"]:
        box.set_facecolor((0.78, 0.84, 0.93, 0.6))  # see-through: dots drawn behind stay visible
    means = [float(g.mean()) for g in groups]
    ax.plot(positions, means, color=ORANGE, marker="o", markersize=3.5, linewidth=1.2, label="mean")


def _counts_on_top(ax: Axes, positions: list[int], counts: list[int]) -> None:
    # In axes coordinates on y, so the labels stay above the plot whatever the data range.
    for x, n in zip(positions, counts, strict=True):
        ax.text(
            x,
            1.01,
            f"{n}",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=7,
            color=GREY,
        )


# ---------------------------------------------------------------------------------------------- plots


def _score_histogram(summary: Summary, threshold: float | None) -> Plot:
    import numpy as np

    fig, ax = _figure()
    bins = np.linspace(0.0, 1.0, 41)
    ax.hist(
        summary.scores, bins=bins, color=BLUE, alpha=0.85, label=f"all candidates (n={len(summary.scores)})"
    )
    ax.hist(
        summary.best_scores,
        bins=bins,
        histtype="step",
        color=ORANGE,
        linewidth=1.8,
        label=f"best-of-N picks (n={len(summary.best_scores)})",
    )
    _threshold_line(ax, threshold, vertical=True)
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (mean of the step scores)")
    ax.set_ylabel("candidates")
    _integer_counts(ax)
    ax.legend(loc="upper right")
    return Plot(
        "scores",
        "Score distribution",
        "Scores of every scored candidate, and of each group's best-of-N pick.",
        _png(fig),
    )


def _steps_by_position(summary: Summary, threshold: float | None) -> Plot:
    fig, ax = _figure()
    clipped, present, labels = _bucket_labels(summary.step_positions)
    groups = [summary.step_values[clipped == p] for p in present]
    _boxes(ax, groups, present)
    _threshold_line(ax, threshold, vertical=False)
    _counts_on_top(ax, present, [len(g) for g in groups])
    ax.set_xticks(present, labels)
    ax.set_ylim(0, 1)
    ax.set_xlabel("step position (1 = first step)")
    ax.set_ylabel("step score P(+)")
    ax.legend(loc="upper right")
    return Plot(
        "steps",
        "Step scores by step position",
        "Boxes: quartiles of the step scores at each position (whiskers 1.5 IQR); numbers on top: steps.",
        _png(fig),
    )


def _score_vs_steps(summary: Summary, threshold: float | None) -> Plot:
    import numpy as np

    fig, ax = _figure()
    clipped, present, labels = _bucket_labels(summary.num_steps)
    groups = [summary.scores[clipped == p] for p in present]
    rng = np.random.default_rng(0)  # a fixed seed: the same run gives the same picture
    pick = np.arange(len(clipped))
    if len(pick) > SCATTER_POINTS:
        pick = rng.choice(pick, SCATTER_POINTS, replace=False)
    jitter = rng.uniform(-0.22, 0.22, len(pick))
    ax.scatter(clipped[pick] + jitter, summary.scores[pick], s=9, color=GREY, alpha=0.5, linewidths=0)
    _boxes(ax, groups, present)
    _threshold_line(ax, threshold, vertical=False)
    _counts_on_top(ax, present, [len(g) for g in groups])
    ax.set_xticks(present, labels)
    ax.set_ylim(0, 1)
    ax.set_xlabel("number of scored steps")
    ax.set_ylabel("score")
    ax.legend(loc="upper right")
    return Plot(
        "score_vs_steps",
        "Score vs number of steps",
        "One dot per candidate (a sample of at most 4000), boxes per step count; numbers on top: candidates.",
        _png(fig),
    )


def _margins(summary: Summary) -> Plot:
    import numpy as np

    fig, ax = _figure()
    margins = summary.margins
    top = max(float(margins.max()), 0.05)
    ax.hist(margins, bins=np.linspace(0.0, top * 1.0001, 31), color=BLUE, alpha=0.85)
    median = float(np.median(margins))
    ax.axvline(median, color=ORANGE, linewidth=1.5, label=f"median {median:.3f}")
    ax.set_xlim(0, top * 1.04)  # the last bin stays clear of the frame
    ax.set_xlabel("best minus runner-up score")
    ax.set_ylabel("groups")
    _integer_counts(ax)
    ax.legend(loc="best")
    single = summary.single_candidate_groups
    note = f" {single} group(s) with a single scored candidate have no margin." if single else ""
    return Plot(
        "margins",
        "Best-of-N margin per group",
        f"How clearly the pick wins: {len(margins)} groups with two scored candidates or more.{note}",
        _png(fig),
    )

"""Reliability diagrams (matplotlib, Agg canvas: no display, no global pyplot state)."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vlcal_jax.eval import metrics


def reliability_diagram(
    confidence, correct, path: str | os.PathLike, n_bins: int = 10,
    title: str = "Reliability diagram", convention: str = "paper",
) -> float:
    """Writes a PNG reliability diagram of `confidence [N]` vs `correct [N]` to `path`; returns the ECE.

    Bars show each bin's accuracy, a hatched bar the gap to its mean confidence, the
    diagonal perfect calibration, and the number above each bar the responses in the bin.
    Bins follow `metrics.reliability_data(..., convention)`.
    """
    data = metrics.reliability_data(confidence, correct, n_bins, convention)
    ece = metrics.ece(confidence, correct, n_bins, convention)
    lower = data.lower.astype(np.float64)
    width = np.maximum(data.upper.astype(np.float64) - lower, 0.5 / n_bins)
    filled = data.count > 0

    figure = Figure(figsize=(5.0, 5.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="grey", linewidth=1.0, label="perfect calibration")
    axes.bar(lower[filled], data.accuracy[filled], width=width[filled], align="edge",
             color="tab:blue", edgecolor="black", linewidth=0.5, label="accuracy")
    gap = data.confidence[filled] - data.accuracy[filled]
    axes.bar(lower[filled], gap, bottom=data.accuracy[filled], width=width[filled], align="edge",
             color="tab:red", alpha=0.35, hatch="//", edgecolor="tab:red", linewidth=0.5, label="gap to confidence")
    for left, w, acc, conf, count in zip(lower[filled], width[filled], data.accuracy[filled],
                                          data.confidence[filled], data.count[filled]):
        axes.text(left + w / 2, max(acc, conf) + 0.02, str(int(count)), ha="center", va="bottom", fontsize=7)
    axes.set_xlim(0.0, 1.0 + (width[-1] if convention == "torchmetrics" else 0.0))
    axes.set_ylim(0.0, 1.1)
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.set_title(f"{title}\nECE = {ece:.3f} ({convention} bins, N = {data.n_total})", fontsize=10)
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(path, format="png")
    return ece

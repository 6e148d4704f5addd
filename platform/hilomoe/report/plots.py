"""The report's plots, as PNG files: AUC vs FLOPs with each variant's Pareto frontier, one
scaling law per axis with its 95% band, and the experts used per level.

matplotlib (Agg) is imported when a plot is drawn: importing this module stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hilomoe.report.pareto import Roi, fronts_by_variant, number, usable
from hilomoe.report.scaling import AxisFit

#: Fixed styles so a variant looks the same in every study's plot.
STYLES = {
    "dense": ("black", "s"), "hilomoe": ("tab:red", "o"), "flat": ("tab:blue", "^"),
    "sequential": ("tab:green", "v"), "dense_experts": ("tab:purple", "D"),
}
_SPARE_STYLES = [("tab:orange", "P"), ("tab:brown", "X"), ("tab:cyan", "*"), ("tab:olive", "h")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")   # no display on workers; set here so importing this module is cheap
    import matplotlib.pyplot as plt

    return plt


def plot_utilisation(rows: list[dict], path: Path) -> Path:
    """A heatmap: trials (rows) by level (columns), the share of the level's experts used."""
    plt = _pyplot()
    levels = max(len(r["routing"]["utilisation"]) for r in rows)
    grid = np.full((len(rows), levels), np.nan)
    for i, r in enumerate(rows):
        util = r["routing"]["utilisation"]
        grid[i, :len(util)] = util
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * levels, 1.2 + 0.38 * len(rows)))
    try:
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 else "black")
        ax.set_xticks(range(levels), [f"level {j + 1}" for j in range(levels)])
        ax.set_yticks(range(len(rows)), [f"{r.get('trial_id')} (L{r.get('levels')} "
                                         f"K{r.get('experts')})" for r in rows], fontsize=7)
        ax.set_title("experts used per level (validation)")
        fig.colorbar(image, ax=ax, fraction=0.05)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def plot_pareto(records: list[dict], headline: Roi | str, path: Path) -> Path:
    """AUC vs FLOPs (log x): each variant's trials and frontier, the baseline, pruned in grey."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    try:
        points = usable(records)
        positive = all(r["flops"] > 0 for r in points)
        pruned = [r for r in records if r.get("status") == "pruned"
                  and number(r.get("valid_auc")) is not None
                  and (number(r.get("flops")) or 0) > 0]
        if pruned:
            ax.scatter([r["flops"] for r in pruned], [r["valid_auc"] for r in pruned],
                       color="0.7", marker="x", label=f"pruned ({len(pruned)})", zorder=1)
        fronts = fronts_by_variant(points)
        spare = iter(_SPARE_STYLES * (1 + len(fronts)))
        for variant, front in fronts.items():
            colour, marker = STYLES.get(variant) or next(spare)
            mine = [r for r in points if str(r.get("variant") or "unknown") == variant]
            ax.scatter([r["flops"] for r in mine], [r["valid_auc"] for r in mine], color=colour,
                       marker=marker, alpha=0.55, label=f"{variant} ({len(mine)})", zorder=2)
            ax.step([r["flops"] for r in front], [r["valid_auc"] for r in front],
                    where="post", color=colour, linewidth=1.5, zorder=3)
        if isinstance(headline, Roi):
            ax.scatter([headline.baseline_flops], [headline.baseline_auc], s=220, marker="*",
                       facecolor="gold", edgecolor="black", zorder=4,
                       label=f"{headline.baseline} baseline")
        if positive:
            ax.set_xscale("log")
        _finish(fig, ax, path, "FLOPs per sample",
                "AUC vs FLOPs; lines: each variant's Pareto frontier")
    finally:
        plt.close(fig)
    return path


def _finish(fig, ax, path: Path, xlabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation AUC")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_scaling(fit: AxisFit, path: Path) -> Path:
    """One axis: the points, the law with its 95% band, and the held-out half marked."""
    plt = _pyplot()
    law = fit.law
    x, auc = np.asarray(fit.x, dtype=float), np.asarray(fit.auc, dtype=float)
    keep = np.isfinite(x) & np.isfinite(auc) & (x > 0)
    x, auc = x[keep], auc[keep]
    grid = np.geomspace(x.min(), x.max(), 200) if x.min() < x.max() else x
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if fit.unidentified:  # the points alone: a curve would claim what the data do not show
        try:
            ax.scatter(x, auc, color="black", zorder=3, label="trials")
            ax.set_xscale("log")
            _finish(fig, ax, path, fit.label, f"{fit.label}: law not identified")
        finally:
            plt.close(fig)
        return path
    try:
        band = law.band(grid)
        if band is not None:
            ax.fill_between(grid, band[0], band[1], color="tab:red", alpha=0.18,
                            label="95% band", linewidth=0)
        ax.plot(grid, law.auc(grid), color="tab:red",
                label=f"gap = {law.a:.3g} C^-{law.b:.3g} + {law.c:.3g}")
        held = np.zeros_like(x, dtype=bool)
        if fit.heldout is not None:
            held = x > fit.heldout.split
            ax.plot(grid, fit.heldout.law.auc(grid), color="0.3", linestyle="--", linewidth=1,
                    label=f"fit on smaller half (MAE {fit.heldout.mae:.4f})")
            ax.scatter(x[held], auc[held], facecolor="none", edgecolor="black", zorder=3,
                       label="held out")
        ax.scatter(x[~held], auc[~held], color="black", zorder=3, label="trials")
        # A loose band (few points) must not squash the data into a line.
        span = max(float(np.ptp(auc)), 1e-3)
        ax.set_ylim(float(auc.min()) - 0.5 * span, float(auc.max()) + 0.5 * span)
        ax.set_xscale("log")
        _finish(fig, ax, path, fit.label, f"Scaling along {fit.label}")
    finally:
        plt.close(fig)
    return path

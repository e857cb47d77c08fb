"""Figures (matplotlib, PNG): recovery curve, confusion heatmaps, human accuracy vs recovery, the
identifiability and open-set heatmaps, and the human-accuracy / recovery trade-off of studies."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _finish_heatmap(fig, ax, im, ticks, labels, title, path, colorbar=None) -> Path:
    """Tick labels (x, y), axis labels (x, y), title and colour bar of a models x models heatmap,
    then save it."""
    (xt, yt), (xl, yl) = ticks, labels
    ax.set_xticks(range(len(xt)), xt, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(yt)), yt, fontsize=8)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, **({"label": colorbar} if colorbar else {}))
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def markdown_image(path: Path, title: str) -> str:
    """Markdown embedding a PNG as a data URI, so it shows on the asset's page in the UI."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"**{title}** (`{path}`)\n\n![{title}](data:image/png;base64,{data})"


def recovery_curve(summary: pd.DataFrame, path: Path) -> Path:
    """Recovery accuracy (exact 95% CI) against training size, one line per criterion."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for crit, df in summary.groupby("criterion"):
        df = df.sort_values("n_train")
        x = df["n_train"].to_numpy()
        y = df["accuracy"].to_numpy()
        err = np.vstack([y - df["ci_low"].to_numpy(), df["ci_high"].to_numpy() - y])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"selected by {crit}")
    chance = float(summary["chance"].iloc[0])
    ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.2f})")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training triplets N")
    ax.set_ylabel("recovery accuracy")
    ax.legend(frameon=False)
    ax.set_title("Model recovery vs training size")
    return _save(fig, path)


def confusion_heatmap(confusion: pd.DataFrame, order: list[str], title: str, path: Path) -> Path:
    """Rows generator, columns winner, counts over simulations."""
    mat = (
        confusion.pivot(index="generator", columns="winner", values="count")
        .reindex(index=order, columns=order)
        .fillna(0)
        .to_numpy()
    )
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(order), 0.8 + 0.55 * len(order)))
    im = ax.imshow(mat, cmap="Blues", vmin=0)
    for i in range(len(order)):
        for j in range(len(order)):
            ax.text(j, i, f"{int(mat[i, j])}", ha="center", va="center", fontsize=8)
    return _finish_heatmap(fig, ax, im, (order, order), ("winner", "generator"), title, path)


def human_vs_recovery(df: pd.DataFrame, path: Path) -> Path:
    """Each generator's human test accuracy against how often it was recovered."""
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(df["human_test_accuracy"], df["recall"])
    for _, r in df.iterrows():
        ax.annotate(r["model"], (r["human_test_accuracy"], r["recall"]), fontsize=7)
    ax.set_xlabel("generator probe: human test accuracy")
    ax.set_ylabel("recovery rate (recall) at the largest N")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Human accuracy vs recovery")
    return _save(fig, path)


def _square(order: list[str]):
    return plt.subplots(figsize=(1.4 + 0.6 * len(order), 0.8 + 0.55 * len(order)))


def identifiability_heatmap(
    table: pd.DataFrame, order: list[str], title: str, path: Path, human: str | None = None
) -> Path:
    """P(generator | winner) at one N and criterion (docs/analyses.md §1): rows winner, columns
    generator, each row summing to 1. A model that never won has no posterior: its row is grey
    and says so (it is not zeros). ``human`` marks the winner on the human data."""
    mat = (
        table.pivot(index="winner", columns="generator", values="posterior")
        .reindex(index=order, columns=order)
        .to_numpy(dtype=float)
    )
    fig, ax = _square(order)
    cmap = plt.get_cmap("Purples").with_extremes(bad="0.88")
    im = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=0, vmax=1)
    k = len(order)
    for i in range(k):
        if np.isnan(mat[i]).all():
            ax.text((k - 1) / 2, i, "never won: no posterior", ha="center", va="center", fontsize=7)
            continue
        for j in range(k):
            color = "white" if mat[i, j] > 0.6 else "black"
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    labels = [f"{m} (human winner)" if m == human else m for m in order]
    axes = ("generator (the true model)", "winner")
    return _finish_heatmap(
        fig, ax, im, (order, labels), axes, title, path, colorbar="P(generator | winner)"
    )


def open_set_heatmap(
    winners: pd.DataFrame, order: list[str], nearest: Mapping[str, str], title: str, path: Path
) -> Path:
    """Open-set winners (docs/analyses.md §2): rows generator, columns the winner among the other
    candidates, counts over simulations; the diagonal is impossible (grey), each generator's
    nearest neighbour in representational geometry is outlined."""
    counts = (
        pd.crosstab(winners["generator"], winners["open_winner"])
        .reindex(index=order, columns=order)
        .fillna(0)
        .to_numpy(dtype=float)
    )
    k = len(order)
    np.fill_diagonal(counts, np.nan)
    fig, ax = _square(order)
    cmap = plt.get_cmap("Oranges").with_extremes(bad="0.88")
    im = ax.imshow(np.ma.masked_invalid(counts), cmap=cmap, vmin=0)
    for i in range(k):
        for j in range(k):
            text = "-" if i == j else f"{int(counts[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
        j = order.index(nearest[order[i]])
        ax.add_patch(
            plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2)
        )
    axes = (
        "open-set winner (outlined: the generator's nearest neighbour)",
        "generator (not a candidate)",
    )
    return _finish_heatmap(fig, ax, im, (order, order), axes, title, path)


def accuracy_tradeoff(points: pd.DataFrame, path: Path) -> Path:
    """One point per study (``recovery compare``): the human test accuracy of its winner on the
    human data against its recovery accuracy at its largest N, with the exact 95% interval."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for _, p in points.iterrows():
        err = [[p["recovery_accuracy"] - p["ci_low"]], [p["ci_high"] - p["recovery_accuracy"]]]
        ax.errorbar(p["human_test_accuracy"], p["recovery_accuracy"], yerr=err, fmt="o", capsize=3)
        label = f"{p['study']} ({p['family']}, {p['penalty']}; N = {p['n_train']:,})"
        ax.annotate(
            label,
            (p["human_test_accuracy"], p["recovery_accuracy"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    chance = points["chance"].unique()
    if len(chance) == 1:
        ax.axhline(chance[0], color="grey", ls="--", lw=1, label=f"chance ({chance[0]:.2f})")
        ax.legend(frameon=False)
    ax.set_ylim(-0.02, 1.08)
    ax.set_xlabel("human test accuracy of the winner on the human data")
    ax.set_ylabel("recovery accuracy at the largest N")
    ax.set_title("Fit to people against recovery, one point per study")
    return _save(fig, path)

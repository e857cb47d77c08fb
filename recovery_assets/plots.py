"""Figures (matplotlib, PNG): recovery curve, confusion heatmaps, human accuracy vs recovery."""

from __future__ import annotations

import base64
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


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
    ax.set_xticks(range(len(order)), order, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(order)), order, fontsize=8)
    ax.set_xlabel("winner")
    ax.set_ylabel("generator")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


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

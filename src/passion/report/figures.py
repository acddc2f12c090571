"""PNG figures (matplotlib, Agg backend: no display needed) shared by evaluate and reports."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..utils import atomic_path  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 130, tight: bool = True) -> Path:
    """Atomically save a figure as PNG and close it; tight=False keeps the figure's size (comparable pixels)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    finally:
        plt.close(fig)
    return path


def heatmap(values, row_labels: Sequence[str], col_labels: Sequence[str], path: str | Path, title: str = "",
            colorbar_label: str = "Dice", vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis",
            digits: int = 3, bold_rows: Sequence[int] = ()) -> Path:
    """Annotated heatmap (rows x columns) written to `path` as PNG."""
    values = np.asarray(values, dtype=float)
    if values.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"values {values.shape} do not match {len(row_labels)} rows x {len(col_labels)} columns")
    width = 2.6 + 1.05 * len(col_labels) + 0.07 * max((len(s) for s in row_labels), default=0)
    height = 1.6 + 0.36 * len(row_labels)
    fig, ax = plt.subplots(figsize=(width, height))
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels))
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    cm = plt.get_cmap(cmap)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            if not np.isfinite(v):
                continue
            rgba = cm((v - vmin) / (vmax - vmin) if vmax > vmin else 0.5)
            lum = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            ax.text(j, i, f"{v:.{digits}f}", ha="center", va="center", fontsize=8,
                    color="black" if lum > 0.5 else "white",
                    fontweight="bold" if i in bold_rows else "normal")
    for i in bold_rows:
        ax.get_yticklabels()[i].set_fontweight("bold")
    if len(row_labels) > 1 and bold_rows:
        for i in bold_rows:
            ax.axhline(i - 0.5, color="white", linewidth=2)
    cbar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03)
    cbar.set_label(colorbar_label)
    if title:
        ax.set_title(title, pad=12, fontsize=10)
    return save_figure(fig, path)


def subset_heatmap(results: dict, path: str | Path, title: str | None = None) -> Path:
    """Dice of every modality subset (rows, named by their modalities) x region, plus the mean row."""
    regions = list(results["regions"])
    rows = [s["dice"] for s in results["subsets"]] + [results["mean"]["dice"]]
    labels = [" + ".join(s["modalities"]) for s in results["subsets"]] + ["mean over subsets"]
    values = [[r[reg] for reg in regions] for r in rows]
    if title is None:
        title = f"Dice per modality subset ({results.get('split', '')}, {len(results.get('cases', []))} cases)"
    return heatmap(values, labels, regions, path, title=title, colorbar_label="Dice",
                   bold_rows=[len(labels) - 1])


# validation Dice per epoch (the trainer's epoch records with "val_dice", see engine/validation.py)
VAL_KINDS = (("full", "full subset", "-"), ("mean", "mean over subsets", "--"))


def val_dice_series(records: Sequence[dict], kind: str, region: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, Dice) of one region's "full" or "mean" validation Dice; epochs 1-based (epochs completed)."""
    pts = [(r["epoch"] + 1, r["val_dice"][kind][region]) for r in records
           if r.get("type") == "epoch" and isinstance(r.get("val_dice"), dict)
           and isinstance(r["val_dice"].get(kind, {}).get(region), (int, float))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    x, y = np.array(pts, dtype=float).T
    return x, y


def val_regions(records: Sequence[dict]) -> list[str]:
    """Regions that a run's validation records carry, in their order."""
    for r in records:
        if r.get("type") == "epoch" and isinstance(r.get("val_dice"), dict):
            return list(r["val_dice"].get("mean", r["val_dice"].get("full", {})))
    return []


def draw_val_dice(ax, runs: dict[str, Sequence[dict]], region: str, colors: Sequence | None = None) -> bool:
    """One region's validation Dice of every run on `ax`: full subset solid, mean over subsets dashed."""
    drawn = False
    for k, (label, records) in enumerate(runs.items()):
        color = colors[k % len(colors)] if colors else f"C{k}"
        for kind, name, style in VAL_KINDS:
            x, y = val_dice_series(records, kind, region)
            if len(x):
                ax.plot(x, y, style, marker="o", ms=3, color=color, label=f"{label} {name}")
                drawn = True
    ax.set_title(f"validation Dice {region}")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("Dice")
    ax.set_ylim(-0.02, 1.02)
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def val_dice_curves(runs: dict[str, Sequence[dict]], path: str | Path, regions: Sequence[str] | None = None,
                    title: str = "") -> Path | None:
    """Validation Dice per epoch, one panel per region (None when no run has validation records).

    `runs` maps a label to the run's metrics.jsonl records."""
    if regions is None:
        regions = next((val_regions(recs) for recs in runs.values() if val_regions(recs)), [])
    if not regions:
        return None
    fig, axes = plt.subplots(1, len(regions), figsize=(4.2 * len(regions), 3.4), squeeze=False)
    for ax, region in zip(axes[0], regions):
        draw_val_dice(ax, runs, region)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)

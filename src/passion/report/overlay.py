"""Slice overlays of segmentations: the reference as a contour, the prediction as a translucent fill.

Two figures: a run's worst/median/best test case x modality subsets (the comparison report),
and three orthogonal slices of one predicted case over each of its modalities (`predict --overlay`).
Arrays are indexed [x, y, z] (z = slices, the last axis) and drawn transposed with the origin
at the bottom, with the aspect ratio of the voxel spacing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..data.spec import DatasetSpec  # noqa: E402
from .figures import save_figure  # noqa: E402

FILL_ALPHA = 0.45
PANEL_INCHES = 2.4
DPI = 100
# background modality of a panel, by preference, among those the panel's subset has
BACKGROUND_PREFERENCE = ("flair", "t2f", "t2", "t2w")


def background_index(spec: DatasetSpec, present: Sequence[bool]) -> int:
    """The modality drawn under a panel: FLAIR/T2 if present, else the first present one."""
    names = [m for m, on in zip(spec.modalities, present) if on]
    for m in BACKGROUND_PREFERENCE:
        if m in names:
            return spec.modalities.index(m)
    return spec.modalities.index(names[0]) if names else 0


def _aspect(spacing, axes: tuple[int, int]) -> float:
    """imshow aspect (row height / column width) of a slice spanning `axes` (columns, rows)."""
    if not spacing:
        return 1.0
    return float(spacing[axes[1]]) / float(spacing[axes[0]])


def _window(image: np.ndarray) -> tuple[float, float]:
    values = image[image != 0]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def _fill_rgba(classes: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    rgba = np.zeros((*classes.shape, 4), dtype=np.float32)
    for k in range(1, spec.num_classes):
        rgba[classes == k] = to_rgba(spec.class_color(k), FILL_ALPHA)
    return rgba


def draw_panel(ax, image: np.ndarray, spec: DatasetSpec, prediction: np.ndarray | None = None,
               reference: np.ndarray | None = None, aspect: float = 1.0, window=None) -> None:
    """One 2D slice [x, y]: grey image, prediction fill, reference contours."""
    lo, hi = window or _window(image)
    ax.imshow(image.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect, interpolation="nearest")
    if prediction is not None and prediction.any():
        ax.imshow(_fill_rgba(prediction, spec).transpose(1, 0, 2), origin="lower", aspect=aspect,
                  interpolation="nearest")
    if reference is not None:
        for k in range(1, spec.num_classes):
            mask = reference == k
            if mask.any() and not mask.all():
                ax.contour(mask.T.astype(np.float32), levels=[0.5], colors=[spec.class_color(k)], linewidths=1.1,
                           origin="lower")
    ax.set_xticks([])
    ax.set_yticks([])


def legend_handles(spec: DatasetSpec, with_reference: bool = True) -> list:
    handles = [Patch(facecolor=to_rgba(spec.class_color(k), FILL_ALPHA), edgecolor=spec.class_color(k),
                     label=spec.class_names[k].replace("_", " ")) for k in range(1, spec.num_classes)]
    if with_reference:
        handles += [Patch(facecolor=(0.6, 0.6, 0.6, FILL_ALPHA), label="prediction (fill)"),
                    Line2D([], [], color="0.3", lw=1.1, label="reference (contour)")]
    return handles


def _legend_columns(n: int) -> int:
    return n if n <= 5 else (n + 1) // 2


def _dice_text(dice: dict, regions: Sequence[str]) -> str:
    def one(v):
        return "-" if v is None or v != v else f"{v:.2f}"

    return " ".join(f"{r} {one(dice.get(r))}" for r in regions)


def draw_cases(data, path: str | Path, title: str = "") -> Path:
    """Rows = subsets, columns = the run's chosen cases (engine.overlay_cases.OverlayData)."""
    spec = data.spec
    regions = [r for r in data.regions if r in spec.regions]  # the spec's own, not the post-processed one
    names = data.subset_names()
    rows, cols = max(1, len(names)), max(1, len(data.cases))
    # at least three panels wide, so that the title and legend fit with one or two cases
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_INCHES * max(cols, 3) + 0.4,
                                                  (PANEL_INCHES + 0.45) * rows + 1.1), squeeze=False)
    if not data.cases:
        for ax in axes.flat:
            ax.axis("off")
        axes[0][0].text(0.5, 0.5, "no evaluated case", ha="center", va="center")
    for c, case in enumerate(data.cases):
        aspect = _aspect(case.spacing, (0, 1))
        box = _content_box(case.image)
        for r, mask in enumerate(data.subsets):
            ax = axes[r][c]
            present = [m and a for m, a in zip(mask, case.available)]
            bg = case.image[background_index(spec, present)]
            draw_panel(ax, bg[box], spec, case.preds[r][box], case.label[box], aspect=aspect)
            text = f"{names[r]}\n{_dice_text(case.dice[r], regions)}"
            if r == 0:
                text = f"{case.role}: {case.name} (slice {case.slice})\nmean {data.rank_region} " \
                       f"{case.score:.2f}\n" + text
            ax.set_title(text, fontsize=7.5)
    handles = legend_handles(spec)
    fig.legend(handles=handles, loc="lower center", ncol=_legend_columns(len(handles)), fontsize=8, frameon=False)
    _finish(fig, title, legend_inches=0.6)
    return save_figure(fig, path, dpi=DPI, tight=False)


def _finish(fig, title: str, legend_inches: float) -> None:
    """Lay the panels out between the legend (bottom) and the title (top, about 0.17 inch per line)."""
    height = fig.get_figheight()
    top = 1.0
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")
        top = 1 - (0.1 + 0.17 * (title.count("\n") + 1)) / height
    fig.tight_layout(rect=(0, legend_inches / height, 1, top))


def tumour_centre(classes: np.ndarray) -> tuple[int, ...]:
    """Centre of mass of the foreground (rounded), or the volume centre when there is none."""
    idx = np.argwhere(classes > 0)
    if idx.size == 0:
        return tuple(s // 2 for s in classes.shape)
    return tuple(int(round(v)) for v in idx.mean(axis=0))


def _content_box(images: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    """Bounding box of the non-zero voxels of any modality (the head), so panels are not mostly air."""
    nonzero = np.any(images != 0, axis=0)
    if not nonzero.any():
        return tuple(slice(None) for _ in nonzero.shape)
    idx = np.argwhere(nonzero)
    lo, hi = idx.min(0), idx.max(0) + 1
    return tuple(slice(max(0, a - margin), min(s, b + margin)) for a, b, s in zip(lo, hi, nonzero.shape))


VIEWS = (("sagittal", 0), ("coronal", 1), ("axial", 2))


def draw_orthogonal(images: np.ndarray, available: Sequence[bool], classes: np.ndarray, spec: DatasetSpec,
                    path: str | Path, spacing: Sequence[float] | None = None, title: str = "") -> Path:
    """Three orthogonal slices through the predicted foreground's centre, one row per available modality.

    images [M, X, Y, Z] and classes [X, Y, Z] in the same geometry (2D datasets: the slice stack)."""
    box = _content_box(images[[i for i, a in enumerate(available) if a]])
    images, classes = images[(slice(None), *box)], classes[box]
    centre = tumour_centre(classes)
    mods = [i for i, a in enumerate(available) if a]
    fig, axes = plt.subplots(len(mods), 3, figsize=(3 * PANEL_INCHES + 0.4, (PANEL_INCHES + 0.3) * len(mods) + 1.0),
                             squeeze=False)
    for row, m in zip(axes, mods):
        window = _window(images[m])
        for ax, (view, axis) in zip(row, VIEWS):
            keep = tuple(a for a in range(3) if a != axis)
            cut = [slice(None)] * 3
            cut[axis] = centre[axis]
            draw_panel(ax, images[m][tuple(cut)], spec, classes[tuple(cut)],
                       aspect=_aspect(spacing, keep), window=window)
            ax.set_title(f"{spec.modalities[m]}: {view} {'xyz'[axis]}={centre[axis] + (box[axis].start or 0)}",
                         fontsize=8)
    handles = legend_handles(spec, with_reference=False)
    fig.legend(handles=handles, loc="lower center", ncol=_legend_columns(len(handles)), fontsize=8, frameon=False)
    _finish(fig, title, legend_inches=0.45)
    return save_figure(fig, path, dpi=DPI, tight=False)


def draw_message(path: str | Path, text: str, title: str = "") -> Path:
    """A small figure that says why there is no overlay (the report keeps one file per run)."""
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path, dpi=DPI, tight=False)


def overlay_file_name(label: str) -> str:
    """REPORT_DIR/overlay_<run-label>.png (a path separator in a label would leave the folder)."""
    return f"overlay_{label.replace('/', '_').replace(chr(92), '_')}.png"


def write_run_overlay(run_dir: str | Path, label: str, split: str, path: str | Path) -> str | None:
    """Draw a run's overlay figure from its evaluation; None, or why a placeholder was drawn instead.

    An evaluation made before overlays existed gets its chosen cases predicted once (and kept)."""
    from ..engine.evaluate import keep_overlay_cases
    from ..engine.overlay_cases import load_overlay, overlay_path
    from ..run_dir import RunDir
    from ..utils import PassionError

    kept = overlay_path(RunDir(run_dir).eval_dir(split))
    try:
        if not kept.is_file():
            keep_overlay_cases(run_dir, split)
        data = load_overlay(kept)
    except (PassionError, OSError, KeyError, ValueError) as exc:
        why = f"no overlay for {label}: {exc}"
        draw_message(path, why, title=label)
        return why
    draw_cases(data, path, title=f"{label} on {split}: worst, median and best case by mean {data.rank_region} "
                                 f"Dice\n(axial slice with the most reference foreground)")
    return None

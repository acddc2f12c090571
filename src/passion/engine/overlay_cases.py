"""The cases, slices and subsets that the report's overlay figure of a run shows.

Evaluation hands every scored case to an OverlayCollector, which keeps one axial slice of it
(slices along the last axis: BraTS volumes and 2D datasets' slice stacks alike). At the end
only the worst, the median and the best case by their mean Dice of the first region (WT) over
the evaluated subsets are written, as 2D slices of the images, the reference and the
predictions of the figure's subsets (full, each single modality, the two rarest training
modalities), to EVAL_DIR/overlay_cases.npz. Nothing else of the predictions is stored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.spec import DatasetSpec, Mask
from ..utils import PassionError, atomic_path

OVERLAY_FILE = "overlay_cases.npz"
FORMAT = "passion-overlay"
VERSION = 1
ROLES = ("worst", "median", "best")


def overlay_path(eval_dir: str | Path) -> Path:
    return Path(eval_dir) / OVERLAY_FILE


def rarest_pair(spec: DatasetSpec, missing_rate: dict | None) -> tuple[str, ...] | None:
    """The two modalities missing most often in training (in dataset order; ties: the first); None if unknown."""
    if not missing_rate or spec.num_modalities < 3:
        return None
    rates = [(-float(missing_rate.get(m, 0.0)), i) for i, m in enumerate(spec.modalities)]
    return tuple(spec.modalities[i] for i in sorted(i for _, i in sorted(rates)[:2]))


def figure_subsets(spec: DatasetSpec, evaluated: Sequence[Mask], rarest: Sequence[str] | None = None) -> list[int]:
    """Indices into `evaluated` of the figure's rows: full, each single modality, the rarest pair."""
    m = spec.num_modalities
    wanted = [tuple([True] * m)] + [tuple(i == k for i in range(m)) for k in range(m)]
    if rarest:
        wanted.append(spec.parse_subset("+".join(rarest)))
    masks = [tuple(bool(v) for v in mask) for mask in evaluated]
    rows = []
    for w in wanted:
        if w in masks and masks.index(w) not in rows:
            rows.append(masks.index(w))
    return rows or list(range(min(len(masks), 6)))


def choose_slice(reference: np.ndarray, prediction: np.ndarray | None = None) -> int:
    """The slice (last axis) with the most reference foreground; else the most predicted one; else the middle."""
    for volume in (reference, prediction):
        if volume is None:
            continue
        counts = (np.asarray(volume) > 0).reshape(-1, volume.shape[-1]).sum(axis=0)
        if counts.max() > 0:
            return int(np.argmax(counts))
    return int(reference.shape[-1] // 2)


def pick_cases(scores: dict[str, float]) -> list[tuple[str, str]]:
    """(role, case) for the worst, median and best score (NaN counts as worst); fewer with fewer cases."""
    order = sorted(scores, key=lambda n: (scores[n] if scores[n] == scores[n] else -1.0, n))
    picked = {"worst": order[0], "median": order[(len(order) - 1) // 2], "best": order[-1]}
    out, seen = [], set()
    for role in ROLES:
        if picked[role] not in seen:
            out.append((role, picked[role]))
            seen.add(picked[role])
    return out


@dataclass
class OverlayCase:
    name: str
    score: float  # mean Dice of the ranking region over the evaluated subsets
    slice: int
    image: np.ndarray  # [M, H, W] the slice of every modality (zeros where missing)
    label: np.ndarray  # [H, W] reference training classes
    preds: np.ndarray  # [R, H, W] predicted classes, one per figure subset
    dice: list[dict]  # per figure subset: {region: Dice}
    available: list[bool]
    spacing: list[float] | None = None
    role: str = ""


@dataclass
class OverlayData:
    """What the overlay figure of one run is drawn from."""

    spec: DatasetSpec
    regions: list[str]
    rank_region: str
    subsets: list[Mask]
    cases: list[OverlayCase] = field(default_factory=list)

    def subset_names(self) -> list[str]:
        return [self.spec.subset_name(m) for m in self.subsets]


def _rank_region(spec: DatasetSpec) -> str:
    return next(iter(spec.regions))


class OverlayCollector:
    """Keeps one slice per evaluated case; `save` writes the three chosen ones."""

    def __init__(self, spec: DatasetSpec, evaluated: Sequence[Mask], rarest: Sequence[str] | None = None):
        self.spec = spec
        self.evaluated = [tuple(bool(v) for v in m) for m in evaluated]
        self.rows = figure_subsets(spec, self.evaluated, rarest)
        self.regions = list(spec.regions)
        self.cases: dict[str, OverlayCase] = {}

    def add(self, name: str, image: np.ndarray, label: np.ndarray, classes: np.ndarray, rows: Sequence[dict],
            available: Sequence[bool], spacing=None, score: float | None = None) -> None:
        """classes: [S, *spatial] for every evaluated subset; rows: score_case's rows of this case."""
        rank = _rank_region(self.spec)
        if score is None:
            values = [float(r["dice"]) for r in rows if r["region"] == rank and r["dice"] == r["dice"]]
            score = float(np.mean(values)) if values else float("nan")
        full = next((k for k in self.rows if all(self.evaluated[k])), self.rows[0])
        z = choose_slice(label, classes[full])
        dice = []
        for k in self.rows:
            sub = self.spec.subset_name(self.evaluated[k])
            dice.append({r["region"]: r["dice"] for r in rows if r["subset"] == sub and r["region"] in self.regions})
        self.cases[name] = OverlayCase(
            name=name, score=score, slice=z, image=np.asarray(image[..., z], dtype=np.float16),
            label=np.asarray(label[..., z], dtype=np.uint8),
            preds=np.stack([np.asarray(classes[k][..., z], dtype=np.uint8) for k in self.rows]),
            dice=dice, available=[bool(a) for a in available],
            spacing=None if spacing is None else [float(s) for s in spacing])

    def chosen(self) -> OverlayData:
        data = OverlayData(self.spec, self.regions, _rank_region(self.spec), [self.evaluated[k] for k in self.rows])
        for role, name in pick_cases({n: c.score for n, c in self.cases.items()}) if self.cases else []:
            self.cases[name].role = role
            data.cases.append(self.cases[name])
        return data

    def save(self, path: str | Path) -> Path:
        return save_overlay(self.chosen(), path)


def save_overlay(data: OverlayData, path: str | Path) -> Path:
    meta = {"format": FORMAT, "version": VERSION, "spec": data.spec.to_dict(), "regions": data.regions,
            "rank_region": data.rank_region, "subsets": [[bool(v) for v in m] for m in data.subsets],
            "cases": [{"name": c.name, "role": c.role, "score": _num(c.score), "slice": c.slice,
                       "available": c.available, "spacing": c.spacing,
                       "dice": [{k: _num(v) for k, v in d.items()} for d in c.dice]} for c in data.cases]}
    arrays = {"meta": np.array(json.dumps(meta))}
    for k, c in enumerate(data.cases):
        arrays[f"image_{k}"], arrays[f"label_{k}"], arrays[f"preds_{k}"] = c.image, c.label, c.preds
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return path


def load_overlay(path: str | Path) -> OverlayData:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT:
                raise PassionError(f"{path}: not a passion overlay file")
            data = OverlayData(DatasetSpec.from_dict(meta["spec"]), meta["regions"], meta["rank_region"],
                               [tuple(m) for m in meta["subsets"]])
            for k, c in enumerate(meta["cases"]):
                data.cases.append(OverlayCase(
                    name=c["name"], role=c["role"], score=_nan(c["score"]), slice=int(c["slice"]),
                    image=z[f"image_{k}"].astype(np.float32), label=z[f"label_{k}"], preds=z[f"preds_{k}"],
                    dice=[{r: _nan(v) for r, v in d.items()} for d in c["dice"]], available=c["available"],
                    spacing=c.get("spacing")))
    except (OSError, KeyError, ValueError) as exc:
        raise PassionError(f"{path}: unreadable overlay file ({type(exc).__name__}: {exc})") from None
    return data


def _num(v):
    return None if v is None or v != v else float(v)


def _nan(v):
    return float("nan") if v is None else float(v)

"""`passion evaluate`: every case of a split x every modality subset -> results table.

Writes under RUN_DIR/eval/<split>/ (atomically, nothing half-written):
    per_case.csv   one row per case x subset x region (dice, hd95)
    results.json   per-subset means, the mean over subsets, checkpoint, config hash, conventions
    results.md     the paper-style table (present modalities ● / absent ○)
    heatmap.png    subsets x regions Dice
    overlay_cases.npz  slices of the worst/median/best case for the report's overlay figure
                   (engine/overlay_cases.py; only those cases and the figure's subsets)
Metrics are computed on the cropped volumes of the cache: the crop only removes voxels that are
background in every modality (and in the reference), and predictions outside the crop are
background, so every region metric equals the metric in the original geometry.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..run_dir import RESULTS_FILE, RunDir
from ..utils import PassionError, atomic_write_json, atomic_write_text, json_safe
from . import metrics as M

FORMAT = "passion-eval"
VERSION = 1


def _case_names(split: str, cfg, run: RunDir, cases: Sequence[str] | None) -> list[str]:
    from ..data.splits import read_case_list

    if cases is not None:
        return list(cases)
    if Path(split).suffix == ".txt" and Path(split).is_file():
        return read_case_list(split)
    split_dir = run.resolve(cfg.data.split, "data.split")
    f = split_dir / f"{split}.txt"
    if not f.is_file():
        raise PassionError(f"no case list for split {split!r}: {f} does not exist")
    return read_case_list(f)


def _nanmean(values) -> float:
    v = [x for x in values if x == x]
    return float(np.mean(v)) if v else float("nan")


def _nanstd(values) -> float:
    v = [x for x in values if x == x]
    return float(np.std(v)) if v else float("nan")


def score_case(name: str, classes: np.ndarray, label: np.ndarray, spec, masks, spacing=None,
               with_hd95: bool = True, after_subset=None) -> list[dict]:
    """One row per subset x region (dice, hd95) of a case's class maps [S, *spatial] against its label.

    Shared by `evaluate` and validation during training (which skips HD95); `after_subset(mask)`
    is called once each subset is scored (progress)."""
    rows = []
    for s, mask in enumerate(masks):
        res = M.region_metrics(classes[s], label, spec, spacing, with_hd95=with_hd95)
        for reg in M.region_names(spec):
            rows.append({"case": name, "subset_id": spec.subset_id(mask), "subset": spec.subset_name(mask),
                         "modalities": " ".join(M.subset_modalities(spec, mask)), "region": reg,
                         "dice": res[reg]["dice"], "hd95": res[reg]["hd95"]})
        if after_subset is not None:
            after_subset(mask)
    return rows


def summarise(rows: list[dict], spec, masks, regions) -> tuple[list[dict], dict]:
    """Per-subset means over cases, and the mean over subsets."""
    subsets = []
    for mask in masks:
        name = spec.subset_name(mask)
        sub = [r for r in rows if r["subset"] == name]
        entry = {"subset_id": spec.subset_id(mask), "subset": name, "mask": [bool(v) for v in mask],
                 "modalities": M.subset_modalities(spec, mask)}
        for key in ("dice", "hd95"):
            entry[key] = {reg: _nanmean([r[key] for r in sub if r["region"] == reg]) for reg in regions}
            entry[f"{key}_std"] = {reg: _nanstd([r[key] for r in sub if r["region"] == reg]) for reg in regions}
        subsets.append(entry)
    mean = {key: {reg: _nanmean([s[key][reg] for s in subsets]) for reg in regions} for key in ("dice", "hd95")}
    return subsets, mean


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = ["case", "subset_id", "subset", "modalities", "region", "dice", "hd95"]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**{k: r[k] for k in fields if k not in ("dice", "hd95")},
                    "dice": f"{r['dice']:.6f}", "hd95": f"{r['hd95']:.4f}"})
    return buf.getvalue()


def _markdown(results: dict) -> str:
    from ..report.tables import subset_table

    conv = results["conventions"]
    post = conv.get("postprocess")
    lines = [
        f"# Evaluation: {results['model']} + {results['objective']} on {results['split']} "
        f"({len(results['cases'])} cases, {len(results['subsets'])} modality subsets)",
        "",
        f"Checkpoint `{results['checkpoint']}` (epoch {results.get('epoch')}), config hash `{results['config_hash']}`.",
        "",
        subset_table(results),
        "● modality present, ○ missing. Dice in %, HD95 in mm; the last row is the mean over subsets.",
        "",
        "Conventions: sliding window of {roi} voxels, overlap {ov}, mean of softmax, argmax; "
        "empty reference and prediction: Dice {bd:g}, HD95 {bh:g}; exactly one empty: Dice {od:g}, "
        "HD95 {oh:g} mm.".format(roi="x".join(str(v) for v in conv["roi_size"]), ov=conv["overlap"],
                                  bd=conv["both_empty"]["dice"], bh=conv["both_empty"]["hd95"],
                                  od=conv["one_empty"]["dice"], oh=conv["one_empty"]["hd95"]),
    ]
    if post:
        lines.append(f"{post['name']}: {post['rule']}.")
    if results.get("checkpoint_name") == "best" and results.get("best"):
        best = results["best"]
        lines.append(f"Best checkpoint: val score {best['val_score']:.4f} (mean Dice over regions and subsets) "
                     f"at epoch {best['epoch'] + 1}.")
    return "\n".join(lines) + "\n"


def evaluate(run_dir: str | Path, checkpoint: str = "last", split: str = "test", subsets: str | Sequence = "all",
             overlap: float | None = None, precision: str | None = None, device: str | None = None,
             out_dir: str | Path | None = None, progress: bool = True, *, cases: Sequence[str] | None = None,
             cache: str | Path | None = None, subset_chunk: int | None = None, fuse_batch: int | None = None,
             sw_batch_size: int | None = None, overwrite: bool = False) -> dict:
    """Evaluate a run's checkpoint on every case of `split` for each modality subset.

    Returns the results dict (also written to OUT/results.json, OUT = RUN_DIR/eval/<split> by default).
    `subsets`: 'all' or e.g. 'flair+t1ce,t2'; `cases`/`cache` override the split's case list and the
    run's cache; `fuse_batch` (subsets per fusion call, default 5) and `subset_chunk` (subsets per
    sliding-window pass) trade memory for speed, see engine.inference.predict_subsets.
    """
    from ..data.cache import match_cache_names, read_case
    from ..utils import progress as progress_bar
    from .checkpoint import load_for_inference
    from .inference import DEFAULT_FUSE_BATCH, predict_classes
    from .overlay_cases import OverlayCollector, overlay_path, rarest_pair

    start = time.time()
    if not Path(run_dir).exists():
        raise PassionError(f"{run_dir}: no such run directory or checkpoint")
    setup = load_for_inference(run_dir, checkpoint, device=device, precision=precision, overlap=overlap)
    model, cfg, spec, ckpt, ckpt_path = setup.model, setup.cfg, setup.spec, setup.ckpt, setup.checkpoint
    dev, precision, overlap, run = setup.device, setup.precision, setup.overlap, setup.run
    try:
        masks = M.evaluation_subsets(spec, subsets)
    except ValueError as exc:
        raise PassionError(str(exc)) from None
    if not masks:
        raise PassionError(f"no modality subset selected by {subsets!r}")
    regions = M.region_names(spec)

    split_label = Path(split).stem if Path(split).suffix == ".txt" else str(split)
    out = Path(out_dir) if out_dir is not None else run.eval_dir(split_label)
    if (out / RESULTS_FILE).exists() and not overwrite:
        raise PassionError(f"{out / RESULTS_FILE} exists; pass --overwrite (overwrite=True) to replace it")
    cache_dir = Path(cache) if cache is not None else run.resolve(cfg.data.cache, "data.cache")
    names = match_cache_names(_case_names(split, cfg, run, cases), cache_dir)
    if not names:
        raise PassionError(f"split {split!r} has no cases")

    roi = list(cfg.model.patch_size)
    sw = int(sw_batch_size or cfg.eval.sw_batch_size or 1)
    rows: list[dict] = []
    overlay = OverlayCollector(spec, masks, rarest_pair(spec, training_missing_rates(cfg, run, spec)))
    with progress_bar(total=len(names) * len(masks), desc=f"evaluate {split_label}", disable=not progress) as bar:
        for name in names:
            case = read_case(cache_dir, name)
            if case.label is None:
                raise PassionError(f"case {name} in {cache_dir} has no label; it cannot be evaluated")
            avail = case.available
            for mask in masks:
                lacking = [spec.modalities[i] for i, (on, a) in enumerate(zip(mask, avail)) if on and not a]
                if lacking:
                    raise PassionError(f"case {name} has no {', '.join(lacking)} image, needed by subset "
                                       f"{spec.subset_name(mask)}; evaluate on complete cases or pick --subsets")
            bar.set_status(f"{name}: inference")
            classes = predict_classes(model, case.image, masks, roi_size=roi, available=avail, overlap=overlap,
                                      sw_batch_size=sw, device=dev, precision=precision, subset_chunk=subset_chunk,
                                      fuse_batch=fuse_batch or DEFAULT_FUSE_BATCH)
            case_rows = score_case(name, classes, np.asarray(case.label), spec, masks, case.meta.get("spacing"),
                                   after_subset=lambda mask: bar.update(1, status=f"{name}: {spec.subset_name(mask)}"))
            overlay.add(name, case.image, np.asarray(case.label), classes, case_rows, avail, case.meta.get("spacing"))
            rows += case_rows

    subset_entries, mean = summarise(rows, spec, masks, regions)
    conventions = M.conventions(spec)
    conventions.update({"overlap": overlap, "roi_size": roi, "blend": "mean of softmax over overlapping windows",
                        "precision": precision, "mean": "subset values are means over cases; 'mean' is the "
                        "mean over subsets"})
    if spec.spatial_dims == 2:
        conventions["slice_wise"] = ("2D windows on every slice (last axis) of a subject; Dice and HD95 are "
                                     "computed once per subject over its 3D slice stack with the voxel spacing")
    results = {
        "format": FORMAT, "version": VERSION,
        "run_dir": str(run.path), "checkpoint": str(ckpt_path), "checkpoint_name": Path(ckpt_path).stem,
        "epoch": ckpt.get("epoch"),
        "config_hash": ckpt.get("config_hash") or cfg.hash(),
        "model": cfg.model.name, "objective": cfg.objective.name, "dataset": spec.name,
        "split": split_label, "cases": names, "num_cases": len(names),
        "modalities": list(spec.modalities), "regions": regions,
        "subsets": subset_entries, "mean": mean, "conventions": conventions,
        "device": str(dev), "seconds": round(time.time() - start, 2),
    }
    if ckpt.get("best"):  # the training run's best validation so far: {"val_score", "epoch" (0-based), "step"}
        results["best"] = ckpt["best"]
    results = json_safe(results)
    out.mkdir(parents=True, exist_ok=True)
    from ..report.figures import subset_heatmap

    atomic_write_text(out / "per_case.csv", _csv_text(rows))
    overlay.save(overlay_path(out))
    atomic_write_text(out / "results.md", _markdown(results))
    subset_heatmap(results, out / "heatmap.png",
                   title=f"Dice per modality subset: {cfg.model.name} + {cfg.objective.name}, "
                         f"{split_label} ({len(names)} cases)")
    atomic_write_json(out / RESULTS_FILE, results)  # last: marks the evaluation complete
    return results


def training_missing_rates(cfg, run: RunDir, spec) -> dict | None:
    """{modality: realised missing rate} of the run's training split, None when it cannot be read."""
    from ..data.splits import training_description

    try:
        desc = training_description(run.resolve(cfg.data.split, "data.split"), spec)
    except (PassionError, OSError, ValueError, KeyError):
        return None
    return (desc or {}).get("missing_rate")


def keep_overlay_cases(run_dir: str | Path, split: str = "test", device: str | None = None) -> Path:
    """Write EVAL_DIR/overlay_cases.npz for an evaluation made without it (older runs).

    Ranks the cases by per_case.csv and predicts only the three chosen cases on the figure's subsets."""
    from ..data.cache import read_case
    from .checkpoint import load_for_inference
    from .inference import predict_classes
    from .overlay_cases import OverlayCollector, figure_subsets, overlay_path, pick_cases, rarest_pair

    run = RunDir.of(run_dir)
    out = run.eval_dir(split)
    table = out / "per_case.csv"
    if not table.is_file():
        raise PassionError(f"{table} does not exist; evaluate the run first")
    with open(table, newline="") as f:
        rows = [{**r, "dice": float(r["dice"])} for r in csv.DictReader(f)]
    results = run.read_results(split)
    setup = load_for_inference(run.path, results.get("checkpoint_name") or "last", device=device,
                               overlap=results["conventions"].get("overlap", 0.5), warn_precision=False)
    model, cfg, spec = setup.model, setup.cfg, setup.spec
    evaluated = [tuple(s["mask"]) for s in results["subsets"]]
    rarest = rarest_pair(spec, training_missing_rates(cfg, run, spec))
    masks = [evaluated[k] for k in figure_subsets(spec, evaluated, rarest)]  # predict only these
    overlay = OverlayCollector(spec, masks, rarest)
    rank = next(iter(spec.regions))
    scores = {n: _nanmean([r["dice"] for r in rows if r["case"] == n and r["region"] == rank])
              for n in dict.fromkeys(r["case"] for r in rows)}
    cache_dir = run.resolve(cfg.data.cache, "data.cache")
    for _, name in pick_cases(scores):
        case = read_case(cache_dir, name)
        classes = predict_classes(model, case.image, masks, roi_size=list(cfg.model.patch_size),
                                  available=case.available, overlap=setup.overlap,
                                  sw_batch_size=int(cfg.eval.sw_batch_size or 1), device=setup.device,
                                  precision=setup.precision)
        overlay.add(name, case.image, np.asarray(case.label), classes, [r for r in rows if r["case"] == name],
                    case.available, case.meta.get("spacing"), score=scores[name])
    return overlay.save(overlay_path(out))

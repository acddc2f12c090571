"""`passion predict`: segment new cases with whatever modalities they have.

INPUT is a BraTS-layout case folder (<case>/<case>_<modality>.nii.gz), a folder of such folders,
or explicit per-modality files. The modalities with a file are the available ones (any non-empty
subset). Preprocessing is the training one (crop to the non-zero box, z-score); the prediction is
put back into the ORIGINAL geometry (same shape, affine and header as the inputs) with raw label
values (BraTS: enhancing = 4) and written as OUT/<case>.nii.gz (uint8), optionally with the
softmax probabilities as OUT/<case>_probs.nii.gz (float32, classes on the last axis), and with
overlay=True a quick-look figure OUT/<case>.png (three orthogonal slices through the predicted
tumour's centre over each available modality, report/overlay.py).

All outputs are written into a temporary folder inside OUT and moved into place only when every
case has succeeded, so a bad input never leaves partial results behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..run_dir import RunDir
from ..utils import PassionError

DEFAULT_MIN_SIZE = 128


def _strip_ext(name: str) -> str:
    from ..data.nifti import EXTENSIONS

    for ext in EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _case_name_from_files(files: Mapping[str, Path], spec) -> str:
    from ..data.nifti import SEPARATORS

    modality, path = next(iter(files.items()))
    stem = _strip_ext(Path(path).name)
    i = spec.modality_index(modality)
    for suffix in (spec.suffixes[i], *spec.modality_aliases.get(modality, ())):
        for sep in SEPARATORS:
            if stem.lower().endswith(f"{sep}{suffix}".lower()) and len(stem) > len(suffix) + 1:
                return stem[: -len(suffix) - 1]
    return stem


def collect_cases(inputs: Sequence[str | Path], files: Mapping[str, str | Path] | None, spec) -> list:
    """CaseFiles for every requested case; bad input raises one clear PassionError."""
    from ..data.layouts import nnunet_test_cases
    from ..data.nifti import EXTENSIONS, CaseFiles, find_case_files

    cases = []
    for raw in inputs or []:
        d = Path(raw)
        if not d.exists():
            raise PassionError(f"{d}: no such file or directory")
        if not d.is_dir():
            raise PassionError(f"{d}: INPUT must be a case folder or a folder of case folders; "
                               "give single files with --flair/--t1ce/--t1/--t2 or --modality NAME=PATH")
        nnunet = nnunet_test_cases(d, spec)  # an nnU-Net imagesTs folder or dataset folder
        if nnunet is not None:
            cases.extend(nnunet)
            continue
        direct = find_case_files(d, spec, aliases=True)
        if direct.modalities:
            cases.append(direct)
            continue
        sub = [find_case_files(s, spec, aliases=True) for s in sorted(d.iterdir())
               if s.is_dir() and not s.name.startswith(".")]
        sub = [c for c in sub if c.modalities]
        if not sub:
            expected = f"<case>_<{'|'.join(spec.suffixes)}>.nii.gz"
            if any(p.name.endswith(EXTENSIONS) for p in d.iterdir()):
                raise PassionError(f"{d}: no modality file named {d.name}_<{'|'.join(spec.suffixes)}>.nii.gz "
                                   "(a case folder's files must start with the folder name)")
            raise PassionError(f"{d}: no modality file found (expected {d}/{expected} or {d}/<case>/{expected})")
        cases.extend(sub)
    if files:
        mods: dict[str, Path] = {}
        for name, path in files.items():
            index = spec.match_modality(str(name))  # its name, file suffix or an alias (t2f for flair)
            if index is None:
                raise PassionError(f"unknown modality {name!r} for dataset {spec.name}; expected one of "
                                   f"{', '.join(spec.modalities)} (or an alias of one)")
            modality = spec.modalities[index]
            if modality in mods:
                raise PassionError(f"modality {modality} given twice")
            p = Path(path)
            if not p.is_file():
                raise PassionError(f"{modality} file not found: {p}")
            mods[modality] = p
        if not mods:
            raise PassionError("no modality file given")
        cases.append(CaseFiles(_case_name_from_files(mods, spec), next(iter(mods.values())).parent, mods))
    if not cases:
        raise PassionError("nothing to predict: give a case folder, a folder of case folders, or modality files")
    seen: dict[str, Path] = {}
    for c in cases:
        if c.name in seen:
            raise PassionError(f"two inputs are both named {c.name!r} ({seen[c.name]} and {c.directory}); "
                               "their outputs would collide")
        seen[c.name] = c.directory
    return cases


def check_geometry(case, spec, strict: bool = False) -> None:
    """Cheap header-only checks of a case's files before any inference: readable, 3D, a usable affine,
    and under `strict` one grid for all of them."""
    import nibabel as nib

    from ..data.geometry import check_affine, same_grid
    from ..data.nifti import AFFINE_ATOL, grid_mismatch

    ref = None
    for modality, path in case.modalities.items():
        try:
            img = nib.load(str(path))
            shape = tuple(int(s) for s in img.shape)
        except Exception as exc:  # nibabel raises many types for corrupt files
            msg = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise PassionError(f"case {case.name}: cannot read {path}: {msg}") from None
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != spec.volume_dims:
            raise PassionError(f"case {case.name}: {path} is not a {spec.volume_dims}D volume (shape {shape})")
        check_affine(img.affine, f"case {case.name}: {path}")
        if ref is None:
            ref = (path, shape, img.affine)
        elif strict and not same_grid(shape, img.affine, ref[1], ref[2], AFFINE_ATOL):
            grid_mismatch(case.name, path, shape, img.affine, ref[0], ref[1], ref[2], AFFINE_ATOL)


def evaluation_hint(run: RunDir, modalities: Sequence[str]) -> str | None:
    """How this modality subset scored in the run's own evaluation, if there is one."""
    found = sorted(run.results_files(), key=lambda p: {"test": 0, "val": 1}.get(p.parent.name, 2))
    for path in found:
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for s in res.get("subsets", []):
            if list(s.get("modalities", [])) == list(modalities):
                dice = ", ".join(f"{k} {v:.3f}" for k, v in s.get("dice", {}).items() if v is not None)
                mean = res.get("mean", {}).get("dice", {})
                full = next((x for x in res["subsets"] if len(x.get("modalities", [])) == len(res.get("modalities", []))),
                            None)
                extra = ""
                if full is not None and full is not s:
                    extra = "; with all modalities: " + ", ".join(
                        f"{k} {v:.3f}" for k, v in full["dice"].items() if v is not None)
                elif mean:
                    extra = "; mean over subsets: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items() if v is not None)
                return (f"in this run's evaluation on {res.get('split', path.parent.name)} "
                        f"({len(res.get('cases', []))} cases) this subset reached Dice {dice}{extra}")
    return None


def predict(checkpoint: str | Path, inputs: Sequence[str | Path] = (), output_dir: str | Path = "predictions",
            files: Mapping[str, str | Path] | None = None, save_probabilities: bool = False,
            device: str | None = None, precision: str | None = None, *, overlap: float | None = None,
            overwrite: bool = False, postprocess: bool = False, progress: bool = True,
            log: Callable[[str], None] | None = print, overlay: bool = False, strict: bool = False,
            label_convention: str | None = None) -> list[Path]:
    """Segment every input case; returns the written paths (labels, then probability maps, then overlay
    figures, as asked).

    checkpoint: a checkpoint file or a run dir (its last checkpoint). files: {modality: path}
    for one case given as separate files. postprocess: apply the evaluation's small-ET removal.
    strict: refuse a case whose files lie on different grids instead of resampling them onto the first.
    label_convention: a dataset (preset or description file) whose raw label values the output uses,
    e.g. brats2023 (enhancing = 3) for a brats2020 model (enhancing = 4); default the model's own.
    Files are found under the model's suffixes or their aliases (a BraTS 2023 folder for a 2020 model).

    Each input is brought into the training orientation and spacing (the checkpoint's "preprocess"
    record), predicted there, and its probabilities are brought back onto the input's own grid.
    """
    from ..data.geometry import grid_map
    from ..data.nifti import load_case, write_label_map, write_nifti
    from ..data.preprocess import preprocess_for_spec, unmap_labels
    from ..data.preprocess import uncrop_pad as uncrop
    from ..utils import progress as progress_bar
    from .checkpoint import load_for_inference
    from .inference import predict_subsets
    from .metrics import postprocess_classes

    say = log or (lambda _msg: None)
    ckpt_arg = Path(checkpoint)
    if not ckpt_arg.exists():
        raise PassionError(f"checkpoint not found: {ckpt_arg}")
    setup = load_for_inference(ckpt_arg, "last", device=device, precision=precision, overlap=overlap)
    model, cfg, ckpt_path, dev, precision = setup.model, setup.cfg, setup.checkpoint, setup.device, setup.precision
    spec = with_preset_aliases(setup.spec)
    out_spec = output_convention(spec, label_convention)
    cases = collect_cases(inputs, files, spec)
    for case in cases:
        check_geometry(case, spec, strict)

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise PassionError(f"{out}: exists and is not a directory")
    targets = {c.name: out / f"{c.name}.nii.gz" for c in cases}
    prob_targets = {c.name: out / f"{c.name}_probs.nii.gz" for c in cases} if save_probabilities else {}
    png_targets = {c.name: out / f"{c.name}.png" for c in cases} if overlay else {}
    if not overwrite:
        existing = [str(p) for p in [*targets.values(), *prob_targets.values(), *png_targets.values()] if p.exists()]
        if existing:
            raise PassionError(f"{existing[0]} already exists; pass --overwrite to replace it")

    record = setup.preprocess
    min_size = record["min_size"] or DEFAULT_MIN_SIZE
    if record["spacing"] is None or not record["orientation"]:
        say(f"warning: {ckpt_path.name} records no training spacing/orientation (made before they were "
            "recorded); predicting on each input's own grid")
    roi = list(cfg.model.patch_size)
    created_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".passion-predict-", dir=out))
    written: list[tuple[Path, Path]] = []
    try:
        with progress_bar(total=len(cases), desc="predict", disable=not progress) as bar:
            for case in cases:
                bar.set_status(case.name)
                loaded = load_case(case, spec, strict=strict, log=say)
                gm = grid_map(loaded.spatial_shape, loaded.affine, record["spacing"], record["orientation"],
                              keep_last_axis=spec.spatial_dims == 2)
                used = [m for m, a in zip(spec.modalities, loaded.available) if a]
                missing = [m for m, a in zip(spec.modalities, loaded.available) if not a]
                fed = ", ".join(f"{m} <- {Path(case.modalities[m]).name}" for m in used)
                msg = (f"{case.name}: using {', '.join(used)} [{fed}]"
                       + (f" (missing: {', '.join(missing)})" if missing else ""))
                hint = evaluation_hint(setup.run, used)
                say(msg + (f"; {hint}" if hint else ""))
                image, box = preprocess_for_spec(gm.images(loaded.images), loaded.available, spec, min_size)
                probs = predict_subsets(model, image, [loaded.available], roi_size=roi, available=loaded.available,
                                        overlap=setup.overlap, sw_batch_size=int(cfg.eval.sw_batch_size or 1),
                                        device=dev, precision=precision)[0].cpu().numpy()
                if gm.resampled or save_probabilities:
                    native_probs = gm.back(_uncrop_probs(probs, box, gm.shape, uncrop))
                    full = native_probs.argmax(axis=0).astype(np.uint8)
                else:  # exact: no interpolation anywhere
                    full = gm.back_labels(uncrop(probs.argmax(axis=0).astype(np.uint8), box, gm.shape, fill=0))
                if postprocess:
                    full = postprocess_classes(full, spec, loaded.spacing)
                labels = unmap_labels(full, out_spec)
                dest = tmp / targets[case.name].name
                write_label_map(dest, labels, loaded.affine, loaded.header)
                written.append((dest, targets[case.name]))
                if save_probabilities:
                    dest_p = tmp / prob_targets[case.name].name
                    write_nifti(dest_p, np.ascontiguousarray(np.moveaxis(native_probs, 0, -1)), loaded.affine,
                                loaded.header, dtype=np.float32)
                    written.append((dest_p, prob_targets[case.name]))
                if overlay:
                    from ..report.overlay import draw_orthogonal

                    dest_png = tmp / png_targets[case.name].name
                    draw_orthogonal(loaded.images, loaded.available, full, spec, dest_png, loaded.spacing,
                                    title=f"{case.name}: prediction from {', '.join(used)}")
                    written.append((dest_png, png_targets[case.name]))
                bar.update(1)
        for src, dst in written:
            os.replace(src, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    probs_out = [dst for _, dst in written if dst in prob_targets.values()]
    pngs_out = [dst for _, dst in written if dst in png_targets.values()]
    labels_out = [dst for _, dst in written if dst in targets.values()]
    say(f"wrote {len(labels_out)} label map(s) to {out}" + (f" and {len(probs_out)} probability map(s)"
                                                             if probs_out else "")
        + (f" and {len(pngs_out)} overlay figure(s)" if pngs_out else ""))
    return labels_out + probs_out + pngs_out


def _uncrop_probs(probs: np.ndarray, box, shape, uncrop) -> np.ndarray:
    """Softmax of the crop placed on the whole grid: outside the crop is certain background."""
    p = uncrop(probs.astype(np.float32), box, shape, fill=0.0)
    p[0] = uncrop(probs[0].astype(np.float32), box, shape, fill=1.0)
    return p


def with_preset_aliases(spec):
    """A model's spec with the aliases of the preset of the same name and modalities (checkpoints
    saved before specs carried aliases)."""
    from dataclasses import replace

    from ..data.spec import get_spec

    if spec.modality_aliases:
        return spec
    try:
        preset = get_spec(spec.name)
    except ValueError:
        return spec
    if preset.modalities != spec.modalities:
        return spec
    return replace(spec, modality_aliases=dict(preset.modality_aliases), class_aliases=dict(preset.class_aliases))


def output_convention(spec, convention: str | None):
    """`spec` writing the raw label values of dataset `convention`, matched class by class by name."""
    from dataclasses import replace

    from ..data.spec import get_spec

    if not convention:
        return spec
    try:
        other = get_spec(convention)
    except ValueError as exc:
        raise PassionError(f"--label-convention: {exc}") from None
    raw_of = other.inverse_label_map
    label_map = {}
    for cls, name in enumerate(spec.class_names):
        index = other.match_class(name)
        if index is None:
            raise PassionError(f"--label-convention {other.name}: it has no class {name!r} of the model's "
                               f"{spec.name} classes ({', '.join(spec.class_names)})")
        label_map[raw_of[index]] = cls
    return replace(spec, label_map=label_map)

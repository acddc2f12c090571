"""NIfTI input/output for BraTS-layout folders: RAW/<case>/<case>_<suffix>.nii.gz.

Every check raises a one-line PassionError naming the case and the file, because raw clinical
folders are messy and a user must be able to find the bad file without a traceback.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..utils import PassionError
from .geometry import check_affine, resample_to_grid, same_grid, voxel_spacing
from .spec import DatasetSpec

EXTENSIONS = (".nii.gz", ".nii")
SEPARATORS = ("_", "-")  # BraTS 2020 uses <case>_flair, BraTS 2023 uses <case>-t2f
AFFINE_ATOL = 1e-3  # mm; scanners and converters disagree in the last digits


@dataclass
class CaseFiles:
    """The files found for one case; a modality without a file is genuinely missing."""

    name: str
    directory: Path
    modalities: dict[str, Path] = field(default_factory=dict)
    label: Path | None = None

    def available(self, spec: DatasetSpec) -> list[bool]:
        return [m in self.modalities for m in spec.modalities]


@dataclass
class LoadedCase:
    """Arrays of one case in its original geometry."""

    name: str
    images: np.ndarray  # float32 [M, *spatial]; zeros where a modality is missing
    available: list[bool]
    label: np.ndarray | None  # raw label values, as on disk
    affine: np.ndarray
    header: nib.Nifti1Header
    files: dict[str, str]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.images.shape[1:])

    @property
    def spacing(self) -> list[float]:
        return list(voxel_spacing(self.affine))


def _find_file(directory: Path, case: str, suffix: str) -> Path | None:
    """First existing file among the accepted separator/extension spellings."""
    for sep in SEPARATORS:
        for ext in EXTENSIONS:
            p = directory / f"{case}{sep}{suffix}{ext}"
            if p.is_file():
                return p
    return None


def find_case_files(directory: str | Path, spec: DatasetSpec, case: str | None = None,
                    aliases: bool = False) -> CaseFiles:
    """Which modality and label files a case folder holds (named after the folder, or `case`
    for flat folders holding the files of many cases, as in the MyoPS release). aliases: a modality
    without a file under its own suffix takes one named after an alias (BraTS 2023's -t2f for flair)."""
    directory = Path(directory)
    case = case or directory.name
    found = CaseFiles(case, directory)
    for modality, suffix in zip(spec.modalities, spec.suffixes):
        p = _find_file(directory, case, suffix)
        if p is not None:
            found.modalities[modality] = p
    for modality in spec.modalities if aliases else ():
        if modality in found.modalities:
            continue
        used = set(found.modalities.values())  # an alias never takes another modality's own file
        hits = (_find_file(directory, case, v) for n in spec.modality_aliases.get(modality, ())
                for v in (n, n.lower()))
        p = next((f for f in hits if f is not None and f not in used), None)
        if p is not None:
            found.modalities[modality] = p
    found.label = _find_file(directory, case, spec.label_suffix)
    return found


def discover_cases(raw_dir: str | Path, spec: DatasetSpec) -> list[CaseFiles]:
    """All case folders of a BraTS-layout directory, sorted by name."""
    raw = Path(raw_dir)
    if not raw.is_dir():
        raise PassionError(f"{raw}: no such directory")
    dirs = sorted(p for p in raw.iterdir() if p.is_dir() and not p.name.startswith("."))
    cases = [find_case_files(d, spec) for d in dirs]
    cases = [c for c in cases if c.modalities or c.label is not None or _has_nifti(c.directory)]
    known = {c.name for c in cases}
    cases += [find_case_files(raw, spec, name) for name in flat_case_names(raw, spec) if name not in known]
    cases.sort(key=lambda c: c.name)
    if not cases:
        raise PassionError(
            f"{raw}: no cases found (expected {raw}/<case>/<case>_<{'|'.join(spec.suffixes)}>.nii.gz "
            f"or {raw}/<case>_<{'|'.join(spec.suffixes)}>.nii.gz)")
    return cases


def flat_case_names(directory: Path, spec: DatasetSpec) -> list[str]:
    """Case names of files lying directly in `directory`: <case><sep><suffix>.nii(.gz)."""
    names = set()
    suffixes = (*spec.suffixes, spec.label_suffix)
    for p in directory.iterdir():
        if not p.is_file() or p.name.startswith("."):
            continue
        stem = next((p.name[:-len(ext)] for ext in EXTENSIONS if p.name.endswith(ext)), None)
        if stem is None:
            continue
        for sep in SEPARATORS:
            for suffix in suffixes:
                tail = f"{sep}{suffix}"
                if stem.endswith(tail) and len(stem) > len(tail):
                    names.add(stem[: -len(tail)])
    return sorted(names)


def _has_nifti(directory: Path) -> bool:
    return any(p.name.endswith(EXTENSIONS) for p in directory.iterdir())


def load_volume(path: str | Path, case: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read one 3D volume as float32, refusing unreadable, non-3D or non-finite data."""
    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for corrupt files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PassionError(f"case {case}: cannot read {path}: {msg}") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise PassionError(f"case {case}: {path} is not a 3D volume (shape {tuple(data.shape)})")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise PassionError(f"case {case}: {path} contains {bad} NaN/inf values")
    return data, img


def load_case(files: CaseFiles, spec: DatasetSpec, atol: float = AFFINE_ATOL, strict: bool = False,
              log=None) -> LoadedCase:
    """Load the existing modality files (and label) onto one grid: the first available modality's in
    spec order. A file on another grid (shape or affine beyond `atol`) is resampled onto it (images
    linear, labels nearest) with one line to `log` (default stderr), or refused when `strict`."""
    case = files.name
    if not files.modalities:
        raise PassionError(
            f"case {case}: no modality file in {files.directory} "
            f"(expected {case}_<{'|'.join(spec.suffixes)}>.nii.gz)")
    ref: tuple[Path, nib.Nifti1Image, tuple[int, ...]] | None = None
    images: list[np.ndarray | None] = []
    for modality in spec.modalities:
        path = files.modalities.get(modality)
        if path is None:
            images.append(None)
            continue
        data, img = load_volume(path, case)
        check_affine(img.affine, f"case {case}: {path}")
        if ref is None:
            ref = (path, img, data.shape)
        else:
            data = _onto_grid(case, path, data, img.affine, ref, atol, strict, 1, log)
        images.append(data)
    ref_path, ref_img, shape = ref
    label = None
    if files.label is not None:
        label, img = load_volume(files.label, case)
        check_affine(img.affine, f"case {case}: {files.label}")
        label = _onto_grid(case, files.label, label, img.affine, ref, atol, strict, 0, log)
    stack = np.zeros((spec.num_modalities, *shape), dtype=np.float32)
    for i, data in enumerate(images):
        if data is not None:
            stack[i] = data
    file_map = {m: str(p) for m, p in files.modalities.items()}
    if files.label is not None:
        file_map["label"] = str(files.label)
    return LoadedCase(case, stack, [d is not None for d in images], label,
                      np.asarray(ref_img.affine, dtype=np.float64), ref_img.header.copy(), file_map)


def _onto_grid(case: str, path: Path, data: np.ndarray, affine, ref, atol: float, strict: bool, order: int,
               log) -> np.ndarray:
    ref_path, ref_img, ref_shape = ref
    if same_grid(data.shape, affine, ref_shape, ref_img.affine, atol):
        return data
    if strict:
        grid_mismatch(case, path, data.shape, affine, ref_path, ref_shape, ref_img.affine, atol)
    msg = (f"case {case}: {Path(path).name} is on another grid than {Path(ref_path).name} "
           f"(shape {tuple(data.shape)} vs {tuple(ref_shape)}); resampled onto {Path(ref_path).name}'s grid")
    (log or (lambda m: print(m, file=sys.stderr)))(msg)
    return resample_to_grid(data, affine, ref_shape, ref_img.affine, order=order)


def grid_mismatch(case: str, path: Path, shape, affine, ref_path, ref_shape, ref_affine, atol: float) -> None:
    """Raise the one-line error for a file whose grid differs from the case's reference file."""
    if tuple(shape) != tuple(ref_shape):
        raise PassionError(
            f"case {case}: {path} has shape {tuple(shape)} but {Path(ref_path).name} has {tuple(ref_shape)}")
    if not np.allclose(affine, ref_affine, atol=atol, rtol=0):
        diff = float(np.abs(np.asarray(affine) - np.asarray(ref_affine)).max())
        raise PassionError(
            f"case {case}: {path} has an affine differing from {Path(ref_path).name} by {diff:.4g} "
            f"(tolerance {atol})")


def _tmp_name(path: Path) -> Path:
    """A temporary name beside `path` with the same extension, so nibabel picks the same format."""
    ext = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    return path.with_name(f".{path.name[:-len(ext)]}.{os.getpid()}.tmp{ext}")


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray,
                header: nib.Nifti1Header | None = None, dtype=None) -> None:
    """Atomically write a volume; both sform and qform carry `affine` so every reader agrees."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype or data.dtype)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.asarray(affine, dtype=np.float64), header=hdr)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    tmp = _tmp_name(path)
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_label_map(path: str | Path, labels: np.ndarray, affine: np.ndarray,
                    header: nib.Nifti1Header | None = None) -> None:
    """Write raw label values (uint8, or int16 if they do not fit) in a given geometry."""
    labels = np.asarray(labels)
    dtype = np.uint8 if labels.size == 0 or (labels.min() >= 0 and labels.max() <= 255) else np.int16
    write_nifti(path, labels, affine, header, dtype=dtype)


def reference_grid(files: CaseFiles, spec: DatasetSpec) -> tuple[tuple[int, ...], np.ndarray] | None:
    """(shape, affine) of a case's reference file (its first modality in spec order) from the header
    alone; None when it cannot be read or its affine is unusable (the case then fails when loaded)."""
    path = next((files.modalities[m] for m in spec.modalities if m in files.modalities), None)
    if path is None:
        return None
    try:
        img = nib.load(str(path))
        check_affine(img.affine, str(path))
    except Exception:  # reported with its case name when the case is loaded
        return None
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return (shape, np.asarray(img.affine, dtype=np.float64)) if len(shape) == 3 else None

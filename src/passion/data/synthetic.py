"""BraTS-like multi-modal phantoms on real anatomy (for demos and tests).

The anatomy is nilearn's MNI152 template with its GM/WM probability maps and brain mask
(shipped with nilearn, so no download), moved by a random per-case affine. A tumour with
nested sub-regions is drawn into it, and each modality gets its own MRI-like contrast, so
that modalities carry different information, as a missing-modality method needs.

Each modality's contrast (FLAIR, T1ce, T1, T2) and each class's tumour part come from their names
or aliases, so any description file with such modalities and classes gets phantoms (modality_roles).
"""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..utils import PassionError, atomic_write_json, progress
from .layout_writers import layout_writer
from .spec import PRESETS, DatasetSpec

FOV_MM = 240.0  # BraTS in-plane field of view
ROLES = ("flair", "t1ce", "t1", "t2")
# Relative intensity per tissue / tumour class, roughly as in clinical MRI.
CONTRAST = {
    #          wm    gm    csf   edema necro enh   nonenh
    "flair": (0.55, 0.75, 0.12, 1.60, 0.50, 1.00, 1.10),
    "t1ce":  (1.00, 0.70, 0.25, 0.55, 0.25, 1.80, 0.45),
    "t1":    (1.00, 0.70, 0.25, 0.55, 0.25, 0.70, 0.45),
    "t2":    (0.45, 0.70, 1.50, 1.20, 1.40, 0.90, 1.00),
}
NO_ENHANCING_FRACTION = 0.2

_TEMPLATES: dict | None = None


# ----------------------------------------------------------------------------- templates
def load_templates() -> dict:
    """MNI152 T1, GM, WM and brain mask as float32 (cached: loading takes seconds).

    CSF is mask - GM - WM, computed after resampling (see _resample_anatomy)."""
    global _TEMPLATES
    if _TEMPLATES is None:
        from nilearn import datasets

        mask_img = datasets.load_mni152_brain_mask(resolution=2)
        mask = np.asarray(mask_img.get_fdata(), dtype=np.float32)
        gm = np.asarray(datasets.load_mni152_gm_template(resolution=2).get_fdata(), dtype=np.float32)
        wm = np.asarray(datasets.load_mni152_wm_template(resolution=2).get_fdata(), dtype=np.float32)
        t1 = np.asarray(datasets.load_mni152_template(resolution=2).get_fdata(), dtype=np.float32)
        gm, wm = np.clip(gm, 0, 1) * mask, np.clip(wm, 0, 1) * mask
        t1 = t1 / max(float(np.median(t1[wm > 0.8])), 1e-6)
        idx = np.argwhere(mask > 0.5)
        lo, hi = idx.min(0), idx.max(0)
        affine = np.asarray(mask_img.affine, dtype=np.float64)
        center = affine[:3, :3] @ ((lo + hi) / 2.0) + affine[:3, 3]
        _TEMPLATES = {"t1": t1, "gm": gm, "wm": wm, "mask": mask,
                      "affine": affine, "center": center}
    return _TEMPLATES


def _set_templates(templates: dict) -> None:
    global _TEMPLATES
    _TEMPLATES = templates


# ----------------------------------------------------------------------------- geometry
def output_affine(shape: tuple[int, ...], center: np.ndarray) -> np.ndarray:
    """Voxel -> mm for a FOV_MM field of view centred on the brain."""
    spacing = np.array([FOV_MM / s for s in shape])
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = center - spacing * (np.array(shape) - 1) / 2.0
    return affine


def _rotation(angles: np.ndarray) -> np.ndarray:
    rx, ry, rz = angles
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return r_z @ r_y @ r_x


def _jitter(rng: np.random.Generator, center: np.ndarray) -> np.ndarray:
    """Random head pose and size: rotation up to 8 degrees, scale 0.9-1.1, shift up to 6 mm."""
    lin = _rotation(np.deg2rad(rng.uniform(-8, 8, 3))) @ np.diag(rng.uniform(0.9, 1.1, 3))
    move = np.eye(4)
    move[:3, :3] = lin
    move[:3, 3] = center + rng.uniform(-6, 6, 3) - lin @ center
    return move


def _resample_anatomy(shape: tuple[int, ...], out_affine: np.ndarray, rng: np.random.Generator) -> dict:
    tpl = load_templates()
    vox = np.linalg.inv(tpl["affine"]) @ _jitter(rng, tpl["center"]) @ out_affine
    out = {}
    for key in ("gm", "wm", "mask", "t1"):
        out[key] = ndimage.affine_transform(tpl[key], vox[:3, :3], offset=vox[:3, 3], output_shape=shape,
                                            order=1, mode="constant", cval=0.0)
    out["csf"] = np.clip(out["mask"] - out["gm"] - out["wm"], 0, 1)  # linear interpolation commutes
    return out


def _upsampler(n: int, coarse: int) -> np.ndarray:
    """[n, coarse] Gaussian interpolation weights: a smooth, separable (and fast) upsampling."""
    grid = np.linspace(0, n - 1, coarse)
    width = max((n - 1) / max(coarse - 1, 1), 1.0)
    w = np.exp(-0.5 * ((np.arange(n)[:, None] - grid[None, :]) / width) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], coarse: int) -> np.ndarray:
    """Zero-mean, unit-std smooth random field from a coarse Gaussian grid."""
    field_ = rng.standard_normal((coarse,) * len(shape)).astype(np.float32)
    for axis, n in enumerate(shape):
        field_ = np.moveaxis(np.tensordot(_upsampler(n, coarse), field_, axes=([1], [axis])), 0, axis)
    return (field_ - field_.mean()) / (field_.std() + 1e-6)


# ----------------------------------------------------------------------------- tumour
@dataclass
class Tumour:
    edema: np.ndarray
    core: np.ndarray
    necrosis: np.ndarray
    enhancing: bool
    center_vox: list[int]
    radius_mm: float


def _tumour_center(brain: np.ndarray, wm: np.ndarray, spacing: np.ndarray, margin_mm: float,
                   rng: np.random.Generator) -> np.ndarray:
    """A random voxel deep enough in the brain, preferably in white matter (where gliomas grow)."""
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)
    margin = min(margin_mm, 0.6 * float(depth.max()))
    candidates = np.argwhere((depth >= margin) & (wm > 0.4))
    if len(candidates) == 0:
        candidates = np.argwhere(depth >= margin)
    return candidates[rng.integers(len(candidates))].astype(np.float64)


def _deformed_distance(shape, spacing, center, radii, noise, amount) -> np.ndarray:
    """Ellipsoid distance (1 on the surface) perturbed by smooth noise -> irregular blobs."""
    axes = [((np.arange(n) - c) * s / r).astype(np.float32) for n, c, s, r in zip(shape, center, spacing, radii)]
    dist = np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)
    at_center = noise[tuple(int(np.clip(round(c), 0, n - 1)) for c, n in zip(center, shape))]
    return dist + amount * (noise - at_center)  # the noise bends the surface, not the overall size


def _make_tumour(brain: np.ndarray, wm: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> Tumour:
    shape = brain.shape
    radius = rng.uniform(15.0, 35.0)
    radii_e = radius * rng.uniform(0.75, 1.25, 3)
    center = _tumour_center(brain, wm, spacing, 0.8 * radius, rng)
    edema = (_deformed_distance(shape, spacing, center, radii_e, smooth_noise(rng, shape, 16), 0.4) < 1) & brain
    core_center = center + rng.uniform(-0.15, 0.15, 3) * radii_e / spacing
    radii_c = radii_e * rng.uniform(0.45, 0.75) * rng.uniform(0.85, 1.15, 3)
    core_dist = _deformed_distance(shape, spacing, core_center, radii_c, smooth_noise(rng, shape, 20), 0.25)
    core = (core_dist < 1) & edema
    necrosis = (core_dist < rng.uniform(0.5, 0.8)) & core
    enhancing = bool(rng.random() >= NO_ENHANCING_FRACTION)
    if not core.any():  # tiny brains at tiny shapes: keep at least the centre voxel as core
        c = tuple(int(round(v)) for v in center)
        core[c] = edema[c] = True
    return Tumour(edema, core, necrosis, enhancing, [int(round(v)) for v in center], float(radius))


TUMOUR_PARTS = ("necrotic_core", "edema", "enhancing")


def _raw_labels(spec: DatasetSpec) -> tuple[int, int, int]:
    """Raw (on-disk) values of necrotic core, edema and enhancing tumour: the spec's classes of those
    names or aliases (one class may take several parts, e.g. a 'core' class with necrosis and enhancing)."""
    inv = spec.inverse_label_map
    classes = [spec.match_class(part) for part in TUMOUR_PARTS]
    if None in classes or 0 in classes:
        raise PassionError(f"phantoms need classes named (or aliased) {', '.join(TUMOUR_PARTS)}; "
                           f"{spec.name} has {', '.join(spec.class_names[1:])}")
    return inv[classes[0]], inv[classes[1]], inv[classes[2]]


def modality_roles(spec: DatasetSpec) -> list[str]:
    """The MRI contrast (flair, t1ce, t1 or t2) of each modality, through brats2020's names and aliases."""
    brats = PRESETS["brats2020"]
    roles = []
    for m, suffix in zip(spec.modalities, spec.suffixes):
        names = (m, suffix, *spec.modality_aliases.get(m, ()))
        idx = next((i for i in (brats.match_modality(n) for n in names) if i is not None), None)
        if idx is None:
            raise PassionError(f"phantoms need MRI brain sequences ({', '.join(ROLES)} or their aliases); "
                               f"{spec.name}'s modality {m} is none of them")
        roles.append(ROLES[idx])
    return roles


def tumour_labels(t: Tumour, spec: DatasetSpec) -> np.ndarray:
    necrotic, edema, enhancing = _raw_labels(spec)
    seg = np.zeros(t.edema.shape, dtype=np.uint8)
    seg[t.edema] = edema
    seg[t.core] = enhancing if t.enhancing else necrotic
    seg[t.necrosis] = necrotic
    return seg


# ----------------------------------------------------------------------------- contrast
def _modality_image(role: str, anatomy: dict, brain: np.ndarray, t: Tumour, spacing: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    wm_v, gm_v, csf_v, ed_v, nec_v, enh_v, nonenh_v = CONTRAST[role]
    total = np.maximum(anatomy["gm"] + anatomy["wm"] + anatomy["csf"], 1e-3)
    tissue = (wm_v * anatomy["wm"] + gm_v * anatomy["gm"] + csf_v * anatomy["csf"]) / total
    if role in ("t1", "t1ce"):  # real T1 detail (deep nuclei, gyri) from the template
        tissue = 0.5 * tissue + 0.5 * anatomy["t1"]
    img = tissue.astype(np.float32)
    img[t.edema] = 0.3 * img[t.edema] + 0.7 * ed_v  # infiltrative: some anatomy shows through
    img[t.core] = enh_v if t.enhancing else nonenh_v
    img[t.necrosis] = nec_v
    img *= 1.0 + 0.05 * smooth_noise(rng, brain.shape, 24)  # tissue texture
    img = ndimage.gaussian_filter(img, sigma=0.6 * 2.0 / spacing)  # partial volume (~1.2 mm)
    img *= np.exp(0.15 * smooth_noise(rng, brain.shape, 4))  # bias field
    scale = rng.uniform(300.0, 1500.0)
    sigma = rng.uniform(0.015, 0.035)
    real = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    img = np.sqrt(real * real + imag * imag) * scale  # Rician magnitude noise
    img[~brain] = 0.0  # skull-stripped, as in BraTS
    return img.astype(np.float32)


# ----------------------------------------------------------------------------- cases
@dataclass
class SynthCase:
    name: str
    images: dict[str, np.ndarray]  # modality -> float32 volume (all modalities, even dropped ones)
    seg: np.ndarray  # uint8 raw labels
    affine: np.ndarray
    available: list[bool]
    tissue: dict[str, np.ndarray] = field(repr=False)  # gm/wm/csf fractions, for checks
    info: dict = field(default_factory=dict)


def case_name(index: int) -> str:
    return f"Synth_{index + 1:04d}"


def draw_available(seed: int, index: int, spec: DatasetSpec, drop_rates: dict[str, float] | None) -> list[bool]:
    """Which modality files a case keeps; redrawn until at least one is kept."""
    rates = np.array([float((drop_rates or {}).get(m, 0.0)) for m in spec.modalities])
    if (rates >= 1).all():
        raise PassionError("drop rates of 1 for every modality would leave cases with no image")
    rng = np.random.default_rng([int(seed), int(index), 1])
    while True:
        keep = rng.random(len(rates)) >= rates
        if keep.any():
            return [bool(k) for k in keep]


def synthesize_case(index: int, shape: tuple[int, int, int], seed: int, spec: DatasetSpec = PRESETS["brats2020"],
                    drop_rates: dict[str, float] | None = None) -> SynthCase:
    """One phantom; seeded from (seed, index) only, so results do not depend on worker count."""
    shape = tuple(int(s) for s in shape)
    _raw_labels(spec)
    rng = np.random.default_rng([int(seed), int(index), 0])
    affine = output_affine(shape, load_templates()["center"])
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    anatomy = _resample_anatomy(shape, affine, rng)
    brain = anatomy["mask"] > 0.5
    tumour = _make_tumour(brain, anatomy["wm"], spacing, rng)
    images = {m: _modality_image(role, anatomy, brain, tumour, spacing, rng)
              for m, role in zip(spec.modalities, modality_roles(spec))}
    seg = tumour_labels(tumour, spec)
    available = draw_available(seed, index, spec, drop_rates)
    info = {"name": case_name(index), "available": available, "enhancing": tumour.enhancing,
            "tumour_center_voxel": tumour.center_vox, "tumour_radius_mm": round(tumour.radius_mm, 2),
            "label_voxels": {str(v): int((seg == v).sum()) for v in np.unique(seg) if v}}
    tissue = {k: anatomy[k] for k in ("gm", "wm", "csf")}
    return SynthCase(case_name(index), images, seg, affine, available, tissue, info)


def write_case(out_dir: str | Path, case: SynthCase, spec: DatasetSpec, layout: str = "brats") -> None:
    layout_writer(out_dir, layout, spec).write_case(case.name, case.images, case.seg, case.affine, case.available)


def _make_and_write(index: int, out_dir: str, shape, seed: int, spec: DatasetSpec, drop_rates,
                    layout: str = "brats") -> dict:
    case = synthesize_case(index, shape, seed, spec, drop_rates)
    write_case(out_dir, case, spec, layout)
    return case.info


def _check_args(cases: int, shape, spec: DatasetSpec, drop_rates: dict | None) -> None:
    if cases < 1:
        raise PassionError(f"--cases must be at least 1, not {cases}")
    if len(shape) != 3 or min(shape) < 16:
        raise PassionError(f"--shape needs three sizes of at least 16, got {list(shape)}")
    for name, rate in (drop_rates or {}).items():
        if name not in spec.modalities:
            raise PassionError(f"unknown modality {name!r} in drop rates; expected one of {', '.join(spec.modalities)}")
        if not 0.0 <= float(rate) < 1.0:
            raise PassionError(f"drop rate for {name} must be in [0, 1), got {rate}")


def open_output_dir(out_dir: str | Path, force: bool) -> Path:
    """The phantom folder: created if needed, refused when non-empty unless --force."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PassionError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PassionError(f"{out} is not empty; use --force to write into it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def forget_previous_phantoms(out: Path) -> list[str]:
    """Case names of an earlier synth run in `out` (from our own synth.json, which is removed),
    so that --force never leaves two phantom sets mixed in one folder."""
    old = out / "synth.json"
    if not old.is_file():
        return []
    try:
        names = [c["name"] for c in json.loads(old.read_text()).get("case_info", [])]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        names = []
    old.unlink()
    return names


def _remove_previous_phantoms(out: Path, keep: set[str]) -> None:
    for name in forget_previous_phantoms(out):
        if name not in keep and name.startswith("Synth_") and (out / name).is_dir():
            shutil.rmtree(out / name)


def synthesize_dataset(out_dir: str | Path, cases: int, shape=(96, 96, 96), seed: int = 0,
                       drop_rates: dict[str, float] | None = None, spec: DatasetSpec = PRESETS["brats2020"],
                       workers: int | None = None, force: bool = False, progress_bar: bool = True,
                       layout: str = "brats") -> dict:
    """Write `cases` phantoms in a raw layout (brats, nnunet, msd: data/layout_writers.py) plus
    OUT/synth.json; returns the synth.json content."""
    shape = tuple(int(s) for s in shape)
    _check_args(int(cases), shape, spec, drop_rates)
    _raw_labels(spec)
    modality_roles(spec)
    writer = layout_writer(out_dir, layout, spec)
    out = open_output_dir(out_dir, force)
    _remove_previous_phantoms(out, {case_name(i) for i in range(cases)})
    templates = load_templates()
    args = (str(out), shape, int(seed), spec, dict(drop_rates or {}), layout)
    infos = write_cases(_make_and_write, cases, args, workers, progress_bar,
                        initializer=_set_templates, initargs=(templates,))
    writer.finish([info["name"] for info in infos])
    summary = {"generator": "passion.data.synthetic", "dataset": spec.name, "layout": layout, "cases": int(cases),
               "shape": list(shape), "seed": int(seed), "drop_rates": dict(drop_rates or {}),
               "fov_mm": FOV_MM, "spacing_mm": [FOV_MM / s for s in shape],
               "no_enhancing_fraction": NO_ENHANCING_FRACTION, "case_info": infos}
    atomic_write_json(out / "synth.json", summary)
    return summary


def write_cases(make_and_write, cases: int, args: tuple, workers: int | None, progress_bar: bool,
                initializer=None, initargs: tuple = ()) -> list[dict]:
    """Run ``make_and_write(i, *args)`` for every case index, in worker processes when more than
    one worker is asked for; returns the per-case info dicts in case order (progress on stderr)."""
    workers = max(1, min(int(workers or os.cpu_count() or 1), int(cases)))
    infos: list[dict] = []
    with progress(total=cases, desc="synth", disable=not progress_bar) as bar:
        if workers == 1:
            for i in range(cases):
                infos.append(make_and_write(i, *args))
                bar.update(status=infos[-1]["name"])
        else:
            with ProcessPoolExecutor(workers, initializer=initializer, initargs=initargs) as pool:
                for info in pool.map(make_and_write, range(cases), *[[a] * cases for a in args]):
                    infos.append(info)
                    bar.update(status=info["name"])
    return infos


def read_synth_json(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "synth.json").read_text())

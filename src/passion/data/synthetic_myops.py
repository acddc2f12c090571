"""MyoPS-like cardiac phantoms (bSSFP "C0", LGE "DE", T2) in the MyoPS 2020 file layout.

Each subject is a short-axis slice stack [H, W, S] (slices on the last axis, base to apex):
an LV blood pool inside a ring of myocardium, an RV crescent beside it, and in a run of slices a
scar patch (subendocardial, in the myocardium) surrounded by a wider edema patch. The three
modalities are imbalanced in information, as in the real data:

- C0 (bSSFP): bright blood, dark myocardium -> the blood pools and the myocardium, little pathology;
- DE (LGE): nulled myocardium, very bright scar, moderately bright blood -> scar, weaker anatomy;
- T2: bright edema, weak blood/myocardium contrast, noisier and blurrier -> edema.

Files are written flat, as in the challenge release: OUT/<subject>_C0.nii.gz, _DE, _T2 and the
label OUT/<subject>_gd.nii.gz with the raw MyoPS values (200 myocardium, 500 LV, 600 RV,
1220 edema, 2221 scar). Everything is seeded from (seed, subject index) only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..utils import PassionError, atomic_write_json
from .nifti import write_label_map, write_nifti
from .spec import PRESETS, DatasetSpec
from .synthetic import smooth_noise, draw_available, forget_previous_phantoms, open_output_dir, write_cases

FOV_MM = 240.0  # in-plane field of view
SLICE_MM = 10.0  # short-axis slice spacing
ROLES = ("c0", "de", "t2")
TISSUES = ("air", "body", "myo", "blood", "edema", "scar", "rv")
# Relative intensity per tissue: air, body, normal myocardium, LV blood, edema, scar, RV blood.
CONTRAST = {
    "c0": (0.02, 0.55, 0.25, 1.00, 0.29, 0.27, 0.95),
    "de": (0.02, 0.35, 0.08, 0.30, 0.10, 1.25, 0.28),
    "t2": (0.02, 0.50, 0.45, 0.32, 0.95, 0.60, 0.30),
}
# noise std (relative), in-plane blur (voxels), bias field strength
ACQUISITION = {"c0": (0.03, 0.4, 0.10), "de": (0.06, 0.6, 0.15), "t2": (0.08, 1.0, 0.15)}
# training class -> raw MyoPS label value (background 0)
RAW = {"myo": 200, "blood": 500, "rv": 600, "edema": 1220, "scar": 2221}
PATHOLOGY_FRACTION = 0.9  # subjects with scar and edema


@dataclass
class MyoCase:
    name: str
    images: dict[str, np.ndarray]  # modality -> float32 [H, W, S]
    seg: np.ndarray  # raw label values, int16 [H, W, S]
    affine: np.ndarray
    available: list[bool]
    info: dict = field(default_factory=dict)


def case_name(index: int) -> str:
    return f"myops_synth_{index + 101}"


def output_affine(shape: tuple[int, int, int]) -> np.ndarray:
    sp = np.array([FOV_MM / shape[0], FOV_MM / shape[1], SLICE_MM])
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = -sp * (np.array(shape) - 1) / 2.0
    return affine


def _check_spec(spec: DatasetSpec) -> None:
    if tuple(spec.modalities) != ROLES or sorted(spec.label_map) != sorted([0, *RAW.values()]):
        raise PassionError(f"cardiac phantoms need the myops2020 modalities and labels, not {spec.name}")


def _geometry(shape, spacing, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Boolean tissue maps [H, W, S] for one subject."""
    h, w, s = shape
    yy, xx = np.meshgrid((np.arange(h) - (h - 1) / 2) * spacing[0], (np.arange(w) - (w - 1) / 2) * spacing[1],
                         indexing="ij")
    centre = rng.uniform(-0.08, 0.08, 2) * FOV_MM
    r_lv = rng.uniform(20.0, 28.0)
    thick = rng.uniform(8.0, 12.0)
    ecc = rng.uniform(0.85, 1.0)
    rot = rng.uniform(0, np.pi)
    rv_angle = np.deg2rad(rng.uniform(160, 220))
    body_axes = np.array([rng.uniform(0.38, 0.46), rng.uniform(0.42, 0.49)]) * FOV_MM
    body_centre = centre * 0.3 + rng.uniform(-8, 8, 2)
    has_path = bool(rng.random() < PATHOLOGY_FRACTION)
    path_angle = rng.uniform(0, 2 * np.pi)
    scar_half = np.deg2rad(rng.uniform(20, 50))
    edema_extra = np.deg2rad(rng.uniform(15, 35))
    scar_depth = rng.uniform(0.5, 1.0)  # fraction of the wall from the endocardium
    first = int(rng.integers(0, max(1, s // 3)))
    last = int(rng.integers(max(first + 1, s // 2), s + 1))
    wobble = smooth_noise(rng, (h, w), 4) * 1.5  # mm, irregular borders

    maps = {k: np.zeros(shape, bool) for k in TISSUES}
    cy, cx = yy - centre[0], xx - centre[1]
    u = cy * np.cos(rot) + cx * np.sin(rot)
    v = (-cy * np.sin(rot) + cx * np.cos(rot)) / ecc
    dist = np.sqrt(u ** 2 + v ** 2) + wobble
    ang = np.arctan2(cy, cx)
    dang = np.abs(np.angle(np.exp(1j * (ang - path_angle))))
    body = ((yy - body_centre[0]) / body_axes[0]) ** 2 + ((xx - body_centre[1]) / body_axes[1]) ** 2 <= 1.0
    for z in range(s):
        f = 1.0 - 0.55 * (z / max(s - 1, 1)) ** 1.5  # smaller towards the apex
        r_in, r_out = r_lv * f, r_lv * f + thick * (0.8 + 0.2 * f)
        blood = dist < r_in
        myo = (dist >= r_in) & (dist < r_out)
        rv_c = np.array([np.sin(rv_angle), np.cos(rv_angle)]) * (r_out + 0.35 * r_lv * f)
        rv_r = 1.25 * r_lv * f
        rv = (np.hypot(cy - rv_c[0], cx - rv_c[1]) + wobble < rv_r) & (dist >= r_out + 2.5) & (z < s - 1 or s == 1)
        scar = edema = np.zeros_like(myo)
        if has_path and first <= z < last:
            depth = (dist - r_in) / max(r_out - r_in, 1e-6)
            scar = myo & (dang < scar_half) & (depth < scar_depth)
            edema = myo & (dang < scar_half + edema_extra) & ~scar
        maps["body"][..., z] = body
        maps["blood"][..., z] = blood
        maps["myo"][..., z] = myo & ~scar & ~edema
        maps["edema"][..., z] = edema
        maps["scar"][..., z] = scar
        maps["rv"][..., z] = rv & body
    maps["air"] = ~maps["body"]
    maps["body"] &= ~(maps["blood"] | maps["myo"] | maps["edema"] | maps["scar"] | maps["rv"])
    maps["_info"] = {"has_pathology": has_path, "pathology_slices": [first, last] if has_path else None,
                     "lv_radius_mm": round(float(r_lv), 2), "wall_mm": round(float(thick), 2)}
    return maps


def _modality_image(role: str, maps: dict, shape, rng: np.random.Generator) -> np.ndarray:
    """Tissue contrast with per-subject jitter, blur, smooth bias and Rician-like noise."""
    values = np.array(CONTRAST[role]) * rng.uniform(0.9, 1.1, len(TISSUES))
    values[0] = CONTRAST[role][0]
    img = np.zeros(shape, np.float32)
    for t, val in zip(TISSUES, values):
        img[maps[t]] = val
    texture = smooth_noise(rng, shape[:2], 8)[..., None]
    img = img * (1.0 + 0.05 * texture * maps["body"])
    noise_std, blur, bias = ACQUISITION[role]
    img = ndimage.gaussian_filter(img, sigma=(blur, blur, 0)) if blur > 0 else img
    img = img * (1.0 + bias * smooth_noise(rng, shape[:2], 3)[..., None])
    n1 = rng.standard_normal(shape).astype(np.float32) * noise_std
    n2 = rng.standard_normal(shape).astype(np.float32) * noise_std
    img = np.sqrt((img + n1) ** 2 + n2 ** 2)  # magnitude image: never exactly zero
    scale = rng.uniform(200.0, 1200.0)  # arbitrary scanner units
    return (img * scale).astype(np.float32)


def labels_from_maps(maps: dict) -> np.ndarray:
    seg = np.zeros(maps["myo"].shape, np.int16)
    for t in ("blood", "rv", "myo", "edema", "scar"):
        seg[maps[t]] = RAW[t]
    return seg


def synthesize_case(index: int, shape=(96, 96, 8), seed: int = 0, spec: DatasetSpec = PRESETS["myops2020"],
                    drop_rates: dict[str, float] | None = None) -> MyoCase:
    shape = tuple(int(v) for v in shape)
    _check_spec(spec)
    rng = np.random.default_rng([int(seed), int(index), 0])
    affine = output_affine(shape)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    maps = _geometry(shape, spacing, rng)
    images = {m: _modality_image(role, maps, shape, rng) for m, role in zip(spec.modalities, ROLES)}
    seg = labels_from_maps(maps)
    available = draw_available(seed, index, spec, drop_rates)
    info = {"name": case_name(index), "available": available, **maps["_info"],
            "label_voxels": {str(int(v)): int((seg == v).sum()) for v in np.unique(seg) if v}}
    return MyoCase(case_name(index), images, seg, affine, available, info)


def write_case(out_dir: str | Path, case: MyoCase, spec: DatasetSpec) -> None:
    """Flat release layout; each file is written atomically (label last)."""
    out_dir = Path(out_dir)
    for (modality, suffix), keep in zip(zip(spec.modalities, spec.suffixes), case.available):
        path = out_dir / f"{case.name}_{suffix}.nii.gz"
        if keep:
            write_nifti(path, case.images[modality], case.affine, dtype=np.float32)
        elif path.exists():
            path.unlink()
    write_label_map(out_dir / f"{case.name}_{spec.label_suffix}.nii.gz", case.seg, case.affine)


def _make_and_write(index: int, out_dir: str, shape, seed: int, spec: DatasetSpec, drop_rates) -> dict:
    case = synthesize_case(index, shape, seed, spec, drop_rates)
    write_case(out_dir, case, spec)
    return case.info


def _remove_previous(out: Path, keep: set[str], spec: DatasetSpec) -> None:
    for name in forget_previous_phantoms(out):
        if name not in keep and name.startswith("myops_synth_"):
            for suffix in (*spec.suffixes, spec.label_suffix):
                p = out / f"{name}_{suffix}.nii.gz"
                if p.is_file():
                    p.unlink()


def synthesize_dataset(out_dir: str | Path, cases: int, shape=(96, 96, 8), seed: int = 0,
                       drop_rates: dict[str, float] | None = None, spec: DatasetSpec = PRESETS["myops2020"],
                       workers: int | None = None, force: bool = False, progress_bar: bool = True) -> dict:
    """Write `cases` cardiac phantoms (MyoPS layout) plus OUT/synth.json; returns its content."""
    shape = tuple(int(v) for v in shape)
    _check_spec(spec)
    if int(cases) < 1:
        raise PassionError(f"--cases must be at least 1, not {cases}")
    if len(shape) != 3 or min(shape[:2]) < 16 or shape[2] < 1:
        raise PassionError(f"--shape needs H W S with H, W >= 16 and S >= 1, got {list(shape)}")
    for name, rate in (drop_rates or {}).items():
        if name not in spec.modalities:
            raise PassionError(f"unknown modality {name!r} in drop rates; expected one of {', '.join(spec.modalities)}")
    out = open_output_dir(out_dir, force)
    _remove_previous(out, {case_name(i) for i in range(cases)}, spec)
    args = (str(out), shape, int(seed), spec, dict(drop_rates or {}))
    infos = write_cases(_make_and_write, cases, args, workers, progress_bar)
    summary = {"generator": "passion.data.synthetic_myops", "dataset": spec.name, "cases": int(cases),
               "shape": list(shape), "seed": int(seed), "drop_rates": dict(drop_rates or {}),
               "spacing_mm": [FOV_MM / shape[0], FOV_MM / shape[1], SLICE_MM], "case_info": infos}
    atomic_write_json(out / "synth.json", summary)
    return summary

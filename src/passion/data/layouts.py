"""Raw dataset layouts: which one a folder is, its cases, and how its channels and labels map onto a spec.

    brats   RAW/<case>/<case>_<suffix>.nii.gz (BraTS 2020/2021: `_`, 2023: `-`), or flat files
    nnunet  nnU-Net v2 raw dataset: dataset.json {channel_names, labels, file_ending},
            imagesTr/<case>_<channel, 4 digits><file_ending> (one file per channel), labelsTr/<case><file_ending>
    msd     Medical Segmentation Decathlon task: dataset.json {modality, labels, training},
            imagesTr/<case>.nii.gz 4D with channels last, labelsTr/<case>.nii.gz

The layout is read off the folder (a dataset.json with `channel_names`: nnU-Net; with `modality`: MSD).
A dataset.json's channel and label names map onto a preset (or the spec given) through the spec's
names and aliases, so an MSD brain-tumour task becomes brats2020 with WT/TC/ET meaning what they mean
in BraTS; where they do not map, the dataset.json itself defines the modalities, classes and regions.
The label values of the files are translated here into the spec's raw values, so everything after
loading sees one convention. A channel file missing for a case (nnU-Net), or an all-zero channel of a
4D image (MSD), is that modality genuinely missing for that case.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..utils import PassionError
from .nifti import EXTENSIONS, CaseFiles, LoadedCase, discover_cases, load_volume
from .nifti import load_case as load_nifti_case
from .spec import PRESETS, DatasetSpec, normalize_name

LAYOUTS = ("brats", "nnunet", "msd")


@dataclass
class LayoutCase(CaseFiles):
    """A case of an nnU-Net or MSD dataset (modality paths keyed by the spec's modality names)."""

    image4d: Path | None = None  # MSD: one image, channels last
    channels: tuple[str | None, ...] = ()  # 4D channel index -> modality
    label_values: dict[int, int] | None = None  # value in the label file -> the spec's raw value


@dataclass
class RawDataset:
    layout: str
    spec: DatasetSpec
    cases: list[CaseFiles]
    mapping: dict = field(default_factory=dict)  # dataset.json channel name -> modality, label -> class


# ----------------------------------------------------------------------------- detection

def read_dataset_json(root: Path) -> dict | None:
    path = root / "dataset.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PassionError(f"{path}: unreadable ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise PassionError(f"{path}: expected a JSON object")
    return data


def detect_layout(raw_dir: str | Path) -> str:
    raw = Path(raw_dir)
    if not raw.is_dir():
        raise PassionError(f"{raw}: no such directory")
    meta = read_dataset_json(raw)
    if meta is not None and "format" not in meta:  # a passion cache also has a dataset.json
        if "channel_names" in meta:
            return "nnunet"
        if "modality" in meta:
            return "msd"
        raise PassionError(f"{raw / 'dataset.json'}: neither nnU-Net v2 (channel_names) nor MSD (modality)")
    return "brats"


def open_raw(raw_dir: str | Path, spec: DatasetSpec | None = None) -> RawDataset:
    """The layout, spec and cases of a raw folder; spec None: a preset that fits, else the folder's own."""
    raw = Path(raw_dir)
    layout = detect_layout(raw)
    if layout == "brats":
        spec = spec or _guess_brats_preset(raw)
        return RawDataset("brats", spec, discover_cases(raw, spec))
    meta = read_dataset_json(raw)
    where = raw / "dataset.json"
    channel_names = _indexed_names(meta, "channel_names" if layout == "nnunet" else "modality", where)
    labels = _label_table(meta, layout, where)
    spec, channels, values, mapping = _choose_spec(spec, channel_names, labels, meta, raw, layout)
    if layout == "nnunet":
        cases = _nnunet_cases(raw, meta, spec, channels, values, where)
    else:
        cases = _msd_cases(raw, meta, spec, channels, values, where)
    return RawDataset(layout, spec, cases, mapping)


def _guess_brats_preset(raw: Path) -> DatasetSpec:
    """brats2020, unless the first case folder (or the flat files) has more of another preset's suffixes."""
    first = next((d for d in sorted(raw.iterdir()) if d.is_dir() and not d.name.startswith(".")), raw)
    names = [p.name.lower() for p in first.iterdir() if p.name.endswith(EXTENSIONS)]
    best, hits = PRESETS["brats2020"], 0
    for spec in PRESETS.values():
        n = sum(any(re.search(rf"[_-]{re.escape(s.lower())}\.nii", f) for f in names) for s in spec.suffixes)
        if n > hits:
            best, hits = spec, n
    return best


def _indexed_names(meta: dict, key: str, where: Path) -> list[str]:
    raw = meta.get(key)
    if not isinstance(raw, dict) or not raw:
        raise PassionError(f"{where}: '{key}' must map channel indices to names")
    try:
        order = sorted(raw, key=int)
    except (TypeError, ValueError):
        raise PassionError(f"{where}: '{key}' keys must be channel indices 0, 1, ...") from None
    if [int(k) for k in order] != list(range(len(order))):
        raise PassionError(f"{where}: '{key}' must number its channels 0..{len(order) - 1}")
    return [str(raw[k]) for k in order]


def _label_table(meta: dict, layout: str, where: Path) -> dict[str, list[int]]:
    """label name -> values (nnU-Net: name -> value or region list; MSD: value -> name)."""
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise PassionError(f"{where}: 'labels' is missing or empty")
    table: dict[str, list[int]] = {}
    try:
        for k, v in raw.items():
            name, values = (k, v) if layout == "nnunet" else (v, int(k))
            values = [int(x) for x in values] if isinstance(values, list) else [int(values)]
            table[str(name)] = values
    except (TypeError, ValueError):
        raise PassionError(f"{where}: 'labels' values must be integers (or lists of them)") from None
    if [0] not in table.values():
        raise PassionError(f"{where}: 'labels' has no background value 0")
    return table


# ----------------------------------------------------------------------------- mapping onto a spec

def map_onto(spec: DatasetSpec, channel_names: list[str], labels: dict[str, list[int]] | None):
    """(channel -> modality, file label value -> spec raw value), or None with the reason."""
    idx = [spec.match_modality(n) for n in channel_names]
    unmatched = [n for n, i in zip(channel_names, idx) if i is None]
    if unmatched or len(set(idx)) != len(idx) or len(idx) != spec.num_modalities:
        why = (f"channel(s) {', '.join(unmatched)} are not modalities of {spec.name}" if unmatched else
               f"channels {', '.join(channel_names)} do not map one-to-one onto {', '.join(spec.modalities)}")
        return None, why
    channels = tuple(spec.modalities[i] for i in idx)
    if labels and any(len(v) != 1 for v in labels.values()):
        values, why = _map_region_labels(spec, labels)
        return ((channels, values), "") if values is not None else (None, why)
    values: dict[int, int] = {}
    for name, vals in (labels or {}).items():
        cls = spec.match_class(name)
        if cls is None:
            return None, f"label {name!r} is not a class of {spec.name} ({', '.join(spec.class_names)})"
        values[vals[0]] = spec.inverse_label_map[cls]
    return (channels, values), ""


def _map_region_labels(spec: DatasetSpec, labels: dict[str, list[int]]):
    """nnU-Net region-based labels ('whole tumor': [1, 2, 3], 'tumor core': [2, 3], ...): each label
    value becomes the spec class that lies in exactly the same named regions."""
    regions: dict[str, set[int]] = {}
    for name, vals in labels.items():
        if vals == [0]:
            continue
        region = spec.match_region(name)
        if region is None:
            return None, f"label {name!r} is not a region of {spec.name} ({', '.join(spec.regions)})"
        regions[region] = set(vals)
    values = {0: spec.inverse_label_map[0]}
    for v in sorted(set().union(*regions.values())):
        inside = {r for r, vs in regions.items() if v in vs}
        classes = [c for c in range(1, spec.num_classes) if {r for r in regions if c in spec.regions[r]} == inside]
        if len(classes) != 1:
            return None, f"label value {v} (in {', '.join(sorted(inside))}) is no single class of {spec.name}"
        values[v] = spec.inverse_label_map[classes[0]]
    return values, ""


def _choose_spec(spec, channel_names, labels, meta, raw: Path, layout: str):
    where = raw / "dataset.json"
    candidates = [spec] if spec is not None else list(PRESETS.values())
    reasons = []
    for cand in candidates:
        mapped, why = map_onto(cand, channel_names, labels)
        if mapped is not None:
            channels, values = mapped
            mapping = {"channels": dict(zip(channel_names, channels)),
                       "labels": {v: cand.class_names[cand.label_map[raw]] for v, raw in values.items()}}
            return cand, channels, values, mapping
        reasons.append(why)
    if spec is not None:
        raise PassionError(f"{where}: {reasons[0]}; leave out --dataset to let dataset.json define the dataset")
    own = own_spec(str(meta.get("name") or raw.name), channel_names, labels, where)
    values = {v: v for v in own.label_map}
    return own, own.modalities, values, {"channels": dict(zip(channel_names, own.modalities)), "labels": "own"}


def own_spec(name: str, channel_names: list[str], labels: dict[str, list[int]], where: Path) -> DatasetSpec:
    """The dataset as its dataset.json describes it: one class per label value, one region per label
    entry (nnU-Net region lists such as 'whole tumor': [1, 2, 3] become regions of several classes)."""
    mods = [re.sub(r"[^a-z0-9]+", "_", n.lower()).strip("_") or f"ch{i}" for i, n in enumerate(channel_names)]
    if len(set(mods)) != len(mods):
        raise PassionError(f"{where}: channel names {', '.join(channel_names)} are not distinct")
    singles = {v[0]: n for n, v in labels.items() if len(v) == 1}
    values = sorted({v for vs in labels.values() for v in vs} | {0})
    classes = [singles.get(v, f"label_{v}") if v else "background" for v in values]
    regions = {n: tuple(sorted(values.index(v) for v in vs)) for n, vs in labels.items() if vs != [0]}
    return DatasetSpec(name=normalize_name(name) or "dataset", modalities=tuple(mods),
                       suffixes=tuple(f"{i:04d}" for i in range(len(mods))), label_suffix="",
                       label_map={v: i for i, v in enumerate(values)}, class_names=tuple(classes),
                       regions=regions, postprocess_region=None)


# ----------------------------------------------------------------------------- cases

def _nnunet_cases(raw: Path, meta: dict, spec, channels, values, where: Path) -> list[CaseFiles]:
    ending = str(meta.get("file_ending", ""))
    if ending not in EXTENSIONS:
        raise PassionError(f"{where}: file_ending {ending!r} is not supported (NIfTI: .nii.gz or .nii)")
    images, labels = raw / "imagesTr", raw / "labelsTr"
    if not images.is_dir():
        raise PassionError(f"{raw}: nnU-Net dataset without imagesTr/")
    found = channel_files(images, ending, where, len(channels))
    if not found:
        others = [p.name for p in images.iterdir() if p.name.endswith(EXTENSIONS)][:1]
        raise PassionError(f"{where}: file_ending is {ending} but imagesTr holds "
                           f"{others[0] if others else 'no such file'}")
    cases = []
    for name, files in sorted(found.items()):
        label = labels / f"{name}{ending}"
        mods = {channels[c]: p for c, p in files.items()}
        cases.append(LayoutCase(name, images, mods, label if label.is_file() else None, label_values=values))
    if labels.is_dir():
        orphans = sorted(p.name for p in labels.iterdir() if p.name.endswith(ending)
                         and p.name[: -len(ending)] not in found and not p.name.startswith("."))
        if orphans:
            raise PassionError(f"{labels / orphans[0]}: a label without any image in imagesTr")
    _check_count(meta, len(cases), where)
    return cases


def channel_files(images: Path, ending: str, where: Path, num_channels: int) -> dict[str, dict[int, Path]]:
    """case -> {channel index: file} of an nnU-Net images folder (<case>_<channel, 4 digits><ending>)."""
    found: dict[str, dict[int, Path]] = {}
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
    for p in sorted(images.iterdir()):
        m = pattern.match(p.name)
        if m is None or p.name.startswith("."):
            continue
        channel = int(m.group(2))
        if channel >= num_channels:
            raise PassionError(f"{where}: lists {num_channels} channels but {p} is channel {channel}")
        found.setdefault(m.group(1), {})[channel] = p
    return found


def _check_count(meta: dict, n: int, where: Path) -> None:
    if "numTraining" in meta and int(meta["numTraining"]) != n:
        raise PassionError(f"{where}: numTraining is {meta['numTraining']} but the folder holds {n} training cases")


def _msd_cases(raw: Path, meta: dict, spec, channels, values, where: Path) -> list[CaseFiles]:
    entries = meta.get("training")
    if entries is None:
        entries = [{"image": f"./imagesTr/{p.name}", "label": f"./labelsTr/{p.name}"}
                   for p in sorted((raw / "imagesTr").glob("*.nii*")) if not p.name.startswith(".")]
    if not isinstance(entries, list) or not entries:
        raise PassionError(f"{where}: 'training' lists no cases")
    cases = []
    for entry in entries:
        image = raw / str(entry.get("image", "")) if isinstance(entry, dict) else None
        if image is None or not image.is_file():
            listed = entry.get("image") if isinstance(entry, dict) else entry
            raise PassionError(f"{where}: lists image {listed}, which does not exist")
        label = raw / str(entry["label"]) if entry.get("label") else None
        if label is not None and not label.is_file():
            raise PassionError(f"{where}: lists label {entry['label']}, which does not exist")
        shape = nib.load(str(image)).shape
        if len(shape) != 4 or shape[3] != len(channels):
            got = f"{shape[3]} channels" if len(shape) == 4 else f"shape {tuple(shape)}"
            raise PassionError(f"{image}: {got}, but dataset.json lists {len(channels)} modalities "
                               f"({', '.join(channels)})")
        name = image.name[: -len(next(e for e in EXTENSIONS if image.name.endswith(e)))]
        cases.append(LayoutCase(name, image.parent, {m: image for m in channels}, label,
                                image4d=image, channels=tuple(channels), label_values=values))
    _check_count(meta, len(cases), where)
    return cases


# ----------------------------------------------------------------------------- loading

def load_case(files: CaseFiles, spec: DatasetSpec, **kwargs) -> LoadedCase:
    """nifti.load_case, plus 4D images and the translation of label values into the spec's."""
    if isinstance(files, LayoutCase) and files.image4d is not None:
        loaded = _load_4d(files, spec)
    else:
        loaded = load_nifti_case(files, spec, **kwargs)
    if isinstance(files, LayoutCase) and files.label_values is not None and loaded.label is not None:
        loaded.label = translate_labels(loaded.label, files.label_values, f"case {files.name}: {files.label}")
    return loaded


def translate_labels(label: np.ndarray, values: dict[int, int], what: str) -> np.ndarray:
    found = np.unique(label)
    bad = [v for v in found if v not in values]
    if bad:
        raise PassionError(f"{what}: label value(s) {', '.join(f'{v:g}' for v in bad[:5])} are not in "
                           f"dataset.json's labels ({', '.join(map(str, sorted(values)))})")
    out = np.zeros(label.shape, dtype=np.int32)
    for v in found:
        out[label == v] = values[int(v)]
    return out


def _load_4d(files: LayoutCase, spec: DatasetSpec) -> LoadedCase:
    case, path = files.name, files.image4d
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise PassionError(f"case {case}: cannot read {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}")
    if data.ndim != 4 or data.shape[3] != len(files.channels):
        raise PassionError(f"case {case}: {path} has shape {tuple(data.shape)}, expected {len(files.channels)} "
                           "channels last")
    if not np.isfinite(data).all():
        raise PassionError(f"case {case}: {path} contains {int((~np.isfinite(data)).sum())} NaN/inf values")
    stack = np.zeros((spec.num_modalities, *data.shape[:3]), dtype=np.float32)
    for c, modality in enumerate(files.channels):
        if modality is not None:
            stack[spec.modalities.index(modality)] = data[..., c]
    available = [bool(stack[i].any()) for i in range(spec.num_modalities)]
    label = None
    if files.label is not None:
        label, limg = load_volume(files.label, case)
        if label.shape != data.shape[:3] or not np.allclose(limg.affine, img.affine, atol=1e-3):
            raise PassionError(f"case {case}: {files.label} is not on the grid of {path.name}")
    file_map = {m: str(path) for m, ok in zip(spec.modalities, available) if ok}
    if files.label is not None:
        file_map["label"] = str(files.label)
    header = img.header.copy()
    header.set_data_shape(data.shape[:3])
    return LoadedCase(case, stack, available, label, np.asarray(img.affine, dtype=np.float64), header, file_map)


def reference_grid(files: CaseFiles, spec: DatasetSpec):
    """nifti.reference_grid, for 4D images too (their first three axes)."""
    if isinstance(files, LayoutCase) and files.image4d is not None:
        img = nib.load(str(files.image4d))
        return tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)
    from .nifti import reference_grid as nifti_reference_grid

    return nifti_reference_grid(files, spec)


# ----------------------------------------------------------------------------- prediction inputs

def nnunet_test_cases(folder: str | Path, spec: DatasetSpec) -> list[CaseFiles] | None:
    """The cases of an nnU-Net images folder (imagesTs, imagesTr, or the dataset folder: its imagesTs)
    with channels named by dataset.json where there is one, else in spec order; None when `folder`
    is not such a folder (predict then reads it as BraTS-layout case folders)."""
    folder = Path(folder)
    images = folder / "imagesTs" if (folder / "imagesTs").is_dir() else folder
    meta = read_dataset_json(images.parent) or read_dataset_json(images) or {}
    if "channel_names" not in meta and images.name not in ("imagesTs", "imagesTr"):
        return None
    where = images.parent / "dataset.json"
    ending = str(meta.get("file_ending", ".nii.gz"))
    if "channel_names" in meta:
        names = _indexed_names(meta, "channel_names", where)
        mapped, why = map_onto(spec, names, None)  # a dataset's own modalities match their channel names
        if mapped is None:
            raise PassionError(f"{where}: {why}")
        channels = mapped[0]
    else:
        channels = spec.modalities
    found = channel_files(images, ending, where, len(channels))
    if not found:
        raise PassionError(f"{images}: no <case>_<channel, 4 digits>{ending} files")
    return [CaseFiles(case, images, {channels[c]: p for c, p in sorted(files.items())})
            for case, files in sorted(found.items())]


def nnunet_test_inputs(folder: str | Path, spec: DatasetSpec) -> dict[str, dict[str, Path]]:
    """nnunet_test_cases as {case: {modality: file}}, the per-case `files=` of predict()."""
    cases = nnunet_test_cases(folder, spec)
    if cases is None:
        raise PassionError(f"{folder}: not an nnU-Net dataset or images folder")
    return {c.name: dict(c.modalities) for c in cases}

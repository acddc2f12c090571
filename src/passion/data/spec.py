"""Dataset specifications: modality order, file suffixes, label maps, evaluation regions.

Everything downstream (splits, models, metrics, reports) takes the modality order and the
subset enumeration from here, so that a new dataset is one preset, not a code change.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

Mask = tuple[bool, ...]
ALIAS_KEYS = ("modality_aliases", "class_aliases", "region_aliases")

# Reference subset order of the BraTS split files (mask_id 0..14), as [flair, t1ce, t1, t2].
_REFERENCE_ORDER_4 = [
    (0, 0, 0, 1), (0, 1, 0, 0), (0, 0, 1, 0), (1, 0, 0, 0),
    (0, 1, 0, 1), (0, 1, 1, 0), (1, 0, 1, 0), (0, 0, 1, 1), (1, 0, 0, 1), (1, 1, 0, 0),
    (1, 1, 1, 0), (1, 0, 1, 1), (1, 1, 0, 1), (0, 1, 1, 1),
    (1, 1, 1, 1),
]


def enumerate_subsets(num_modalities: int) -> list[Mask]:
    """All 2^M - 1 non-empty subsets as boolean masks, in the project's canonical order.

    For four modalities this is the reference order of the published split files, so that
    `mask_id` values are interchangeable with them; otherwise subsets are ordered by size,
    then lexicographically with the first modality most significant.
    """
    if num_modalities < 1:
        raise ValueError("a dataset needs at least one modality")
    if num_modalities == 4:
        return [tuple(bool(v) for v in m) for m in _REFERENCE_ORDER_4]
    subsets = []
    for size in range(1, num_modalities + 1):
        for idx in itertools.combinations(range(num_modalities), size):
            subsets.append(tuple(i in idx for i in range(num_modalities)))
    return subsets


@dataclass(frozen=True)
class DatasetSpec:
    """What a multi-modal segmentation dataset looks like on disk and how it is scored."""

    name: str
    modalities: tuple[str, ...]
    # file name suffix per modality: <case>_<suffix>.nii.gz
    suffixes: tuple[str, ...]
    label_suffix: str
    # raw label value on disk -> training class index (0..C-1); background must map to 0
    label_map: dict[int, int]
    class_names: tuple[str, ...]
    # evaluation region name -> training classes it is made of
    regions: dict[str, tuple[int, ...]]
    # region whose small predictions are removed in post-processing (BraTS: ET), and the smallest
    # kept volume in mm^3 (the paper's 500 voxels of BraTS's 1 mm isotropic grid; metrics converts it
    # with each case's voxel volume so that it means the same on any spacing)
    postprocess_region: str | None = None
    postprocess_min_volume_mm3: float = 500.0
    spatial_dims: int = 3
    file_extension: str = ".nii.gz"
    # between case name and suffix in written files (reading accepts both): BraTS 2023 uses "-"
    file_separator: str = "_"
    # in-plane centre crop (zero-padded where the image is smaller) instead of the non-zero box;
    # 2D datasets: samples are slices along the last axis of each subject's volume
    crop_size: tuple[int, ...] | None = None
    extra: dict = field(default_factory=dict)
    # other names of a modality / class (other releases, dataset.json channel and label names)
    modality_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    class_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    region_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def volume_dims(self) -> int:
        """Axes of a subject's volume on disk and in the cache: 2D datasets store slice stacks."""
        return 3 if self.spatial_dims == 2 else self.spatial_dims

    @property
    def inverse_label_map(self) -> dict[int, int]:
        return {v: k for k, v in self.label_map.items()}

    def modality_index(self, name: str) -> int:
        try:
            return self.modalities.index(name.lower())
        except ValueError:
            raise ValueError(
                f"unknown modality {name!r} for dataset {self.name}; expected one of {', '.join(self.modalities)}"
            ) from None

    def match_modality(self, name: str) -> int | None:
        """Index of the modality called `name` (its own name, file suffix or an alias), else None."""
        key = normalize_name(name)
        for i, m in enumerate(self.modalities):
            if key in {normalize_name(n) for n in (m, self.suffixes[i], *self.modality_aliases.get(m, ()))}:
                return i
        return None

    def match_class(self, name: str) -> int | None:
        """Index of the class called `name` (its own name or an alias), else None."""
        key = normalize_name(name)
        for i, c in enumerate(self.class_names):
            if key in {normalize_name(n) for n in (c, *self.class_aliases.get(c, ()))}:
                return i
        return None

    def match_region(self, name: str) -> str | None:
        key = normalize_name(name)
        return next((r for r in self.regions
                     if key in {normalize_name(n) for n in (r, *self.region_aliases.get(r, ()))}), None)

    def subsets(self) -> list[Mask]:
        return enumerate_subsets(self.num_modalities)

    def subset_id(self, mask) -> int:
        mask = tuple(bool(v) for v in mask)
        try:
            return self.subsets().index(mask)
        except ValueError:
            raise ValueError(f"mask {list(mask)} is not a non-empty subset of {self.num_modalities} modalities") from None

    def subset_name(self, mask) -> str:
        """Human-readable subset name, e.g. 'flair+t1ce'."""
        names = [m for m, on in zip(self.modalities, mask) if on]
        if not names:
            raise ValueError("empty modality subset")
        return "+".join(names)

    def parse_subset(self, text: str) -> Mask:
        """'flair+t1ce' (or 'flair,t1ce') -> mask; 'all' -> every modality."""
        if text.strip().lower() == "all":
            return tuple(True for _ in self.modalities)
        parts = [p for p in text.replace(",", "+").split("+") if p.strip()]
        idx = {self.modality_index(p.strip()) for p in parts}
        if not idx:
            raise ValueError(f"empty modality subset {text!r}")
        return tuple(i in idx for i in range(self.num_modalities))

    def class_color(self, index: int) -> str:
        """Display colour of a training class (figures): by class name, else a tab10 colour."""
        name = self.class_names[index] if index < len(self.class_names) else ""
        return CLASS_COLORS.get(name, _FALLBACK_COLORS[index % len(_FALLBACK_COLORS)])

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "modalities": list(self.modalities),
            "suffixes": list(self.suffixes),
            "label_suffix": self.label_suffix,
            "label_map": {str(k): v for k, v in self.label_map.items()},
            "class_names": list(self.class_names),
            "regions": {k: list(v) for k, v in self.regions.items()},
            "postprocess_region": self.postprocess_region,
            "postprocess_min_volume_mm3": self.postprocess_min_volume_mm3,
            "spatial_dims": self.spatial_dims,
            **({"crop_size": list(self.crop_size)} if self.crop_size else {}),
            **({"file_separator": self.file_separator} if self.file_separator != "_" else {}),
            **{key: {k: list(v) for k, v in getattr(self, key).items()} for key in ALIAS_KEYS if getattr(self, key)},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetSpec":
        # specs saved before aliases existed get those of the preset they came from
        preset = PRESETS.get(d["name"]) if not any(key in d for key in ALIAS_KEYS) else None
        aliases = {key: {k: tuple(v) for k, v in d.get(key, {}).items()} if preset is None
                   else dict(getattr(preset, key)) for key in ALIAS_KEYS}
        return cls(
            name=d["name"],
            modalities=tuple(d["modalities"]),
            suffixes=tuple(d["suffixes"]),
            label_suffix=d["label_suffix"],
            label_map={int(k): int(v) for k, v in d["label_map"].items()},
            class_names=tuple(d["class_names"]),
            regions={k: tuple(v) for k, v in d["regions"].items()},
            postprocess_region=d.get("postprocess_region"),
            # caches and checkpoints written before the rename hold the count for 1 mm voxels, i.e. mm^3
            postprocess_min_volume_mm3=float(d.get("postprocess_min_volume_mm3", d.get("postprocess_min_voxels", 500))),
            spatial_dims=int(d.get("spatial_dims", 3)),
            crop_size=tuple(int(v) for v in d["crop_size"]) if d.get("crop_size") else None,
            file_separator=d.get("file_separator", "_"),
            **aliases,
        )


def normalize_name(name: str) -> str:
    """'T2-FLAIR', 't2 flair' and 't2_flair' are one name; so are tumour and tumor."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower()).replace("tumour", "tumor").replace("oedema", "edema")


# figure colours by class name (names travel with every saved spec, so old checkpoints get them too)
CLASS_COLORS = {
    "necrotic_core": "#e41a1c", "edema": "#4daf4a", "enhancing": "#ffd92f",
    "lv_blood_pool": "#e41a1c", "rv_blood_pool": "#377eb8", "normal_myocardium": "#984ea3",
    "scar": "#ff7f00",
}
_FALLBACK_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


class _Presets(Mapping):
    """The built-in dataset descriptions (passion/data/presets/*.yaml), read on first use."""

    def __init__(self):
        self._specs: dict[str, DatasetSpec] | None = None

    def _load(self) -> dict[str, DatasetSpec]:
        if self._specs is None:
            from .description import load_preset, preset_names

            self._specs = {name: load_preset(name) for name in preset_names()}
        return self._specs

    def __getitem__(self, name: str) -> DatasetSpec:
        return self._load()[name]

    def __iter__(self):
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def register(self, spec: DatasetSpec) -> None:
        self._load()[spec.name] = spec


PRESETS = _Presets()


def get_spec(name: str) -> DatasetSpec:
    """A preset by name, or a dataset description file by path (.yaml/.yml/.json)."""
    from .description import load_description, looks_like_description

    if looks_like_description(name):
        from ..utils import PassionError

        try:
            return load_description(name)
        except PassionError as exc:
            raise ValueError(str(exc)) from None
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(PRESETS))}, "
                         "or the path of a description file (.yaml/.json)") from None


def register_spec(spec: DatasetSpec) -> DatasetSpec:
    PRESETS.register(spec)
    return spec

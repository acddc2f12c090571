"""Dataset description files (YAML or JSON): how a multi-modal dataset is named, labelled and scored.

The built-in presets are such files (passion/data/presets/*.yaml); `--dataset` takes a preset name
or the path of one. The format, with every key but `postprocess`, `crop_size`, `label_suffix`, `separator`,
`dimensions` and the aliases required:

    name: glioma3
    dimensions: 3                       # 2: samples are slices along the last axis
    modalities:                         # order = model input order
      flair: {suffix: FLAIR, aliases: [t2f]}
      t2: T2                            # short form: the file suffix only
    label_suffix: seg                   # <case>_<suffix>.nii.gz
    separator: "_"                      # between case and suffix in written files ("-" for BraTS 2023)
    labels: {0: background, 2: oedema, 7: active}   # raw value -> class; first class is background
    class_aliases: {oedema: [edema]}
    regions: {lesion: [oedema, active], active: [active]}
    region_aliases: {lesion: [whole lesion]}   # nnU-Net region-based labels map through these
    postprocess: {region: active, min_volume_mm3: 200}
    crop_size: [256, 256]               # in-plane centre crop instead of the non-zero box
"""
from __future__ import annotations

import json
from pathlib import Path

from ..utils import PassionError
from .spec import DatasetSpec

PRESET_DIR = Path(__file__).with_name("presets")
DESCRIPTION_SUFFIXES = (".yaml", ".yml", ".json")
_KEYS = {"name", "dimensions", "modalities", "label_suffix", "separator", "labels", "class_aliases", "regions",
         "region_aliases",
         "postprocess", "crop_size", "description"}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> DatasetSpec:
    return load_description(PRESET_DIR / f"{name}.yaml")


def looks_like_description(text: str) -> bool:
    return str(text).lower().endswith(DESCRIPTION_SUFFIXES)


def load_description(path: str | Path) -> DatasetSpec:
    """Read and check a description file; every defect is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PassionError(f"{path}: no such dataset description file")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PassionError(f"{path}: unreadable ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # yaml.YAMLError and friends
        raise PassionError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        return spec_from_description(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise PassionError(f"{path}: {exc}") from None


def _name_list(value, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
        raise ValueError(f"{what} must be a list of names")
    return [str(v) for v in value]


def _modalities(raw) -> tuple[list[str], list[str], dict[str, tuple[str, ...]]]:
    if not isinstance(raw, dict) or not raw:
        raise ValueError("'modalities' must map each modality name to its file suffix")
    names, suffixes, aliases = [], [], {}
    for name, entry in raw.items():
        name = str(name).strip().lower()
        if isinstance(entry, dict):
            unknown = set(entry) - {"suffix", "aliases"}
            if unknown:
                raise ValueError(f"modality {name}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
            suffix = str(entry.get("suffix", name))
            if entry.get("aliases"):
                aliases[name] = tuple(_name_list(entry["aliases"], f"modality {name}'s aliases"))
        elif isinstance(entry, (str, int)):
            suffix = str(entry)
        else:
            raise ValueError(f"modality {name}: expected a suffix or {{suffix, aliases}}")
        if not name or name in names:
            raise ValueError(f"modality name {name!r} is empty or given twice")
        if not suffix or suffix.lower() in (s.lower() for s in suffixes):
            raise ValueError(f"modality {name}: file suffix {suffix!r} is empty or used twice")
        names.append(name)
        suffixes.append(suffix)
    return names, suffixes, aliases


def _labels(raw) -> tuple[dict[int, int], list[str]]:
    if not isinstance(raw, dict) or not raw:
        raise ValueError("'labels' must map raw label values to class names")
    label_map: dict[int, int] = {}
    classes: list[str] = []
    for value, cls in raw.items():
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"label value {value!r} is not an integer") from None
        if value in label_map:
            raise ValueError(f"label value {value} is given twice")
        cls = str(cls).strip()
        if not cls:
            raise ValueError(f"label value {value} has an empty class name")
        if cls not in classes:
            classes.append(cls)
        label_map[value] = classes.index(cls)
    if label_map.get(0) != 0:
        raise ValueError("raw label 0 must be the first class listed (background)")
    return label_map, classes


def spec_from_description(data: dict) -> DatasetSpec:
    """A DatasetSpec from a parsed description (raises ValueError naming the bad key)."""
    if not isinstance(data, dict):
        raise ValueError("a dataset description must be a mapping")
    unknown = set(data) - _KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(map(str, unknown)))}; expected {', '.join(sorted(_KEYS))}")
    for key in ("name", "modalities", "labels", "regions"):
        if key not in data:
            raise ValueError(f"missing key {key!r}")
    name = str(data["name"]).strip().lower()
    modalities, suffixes, modality_aliases = _modalities(data["modalities"])
    label_map, classes = _labels(data["labels"])
    regions = {}
    if not isinstance(data["regions"], dict) or not data["regions"]:
        raise ValueError("'regions' must map region names to lists of class names")
    for region, members in data["regions"].items():
        members = _name_list(members, f"region {region}")
        bad = [m for m in members if m not in classes[1:]]
        if bad or not members:
            raise ValueError(f"region {region}: {', '.join(bad) or 'no class'} is not a foreground class "
                             f"({', '.join(classes[1:])})")
        regions[str(region)] = tuple(sorted(classes.index(m) for m in set(members)))
    class_aliases = {}
    for cls, names in (data.get("class_aliases") or {}).items():
        if cls not in classes:
            raise ValueError(f"class_aliases: {cls} is not a class ({', '.join(classes)})")
        class_aliases[cls] = tuple(_name_list(names, f"aliases of {cls}"))
    region_aliases = {}
    for region, names in (data.get("region_aliases") or {}).items():
        if region not in regions:
            raise ValueError(f"region_aliases: {region} is not a region ({', '.join(regions)})")
        region_aliases[region] = tuple(_name_list(names, f"aliases of {region}"))
    post = data.get("postprocess") or {}
    if post and (not isinstance(post, dict) or post.get("region") not in regions):
        raise ValueError(f"postprocess needs {{region: one of {', '.join(regions)}, min_volume_mm3: N}}")
    dims = int(data.get("dimensions", 3))
    if dims not in (2, 3):
        raise ValueError(f"dimensions must be 2 or 3, not {dims}")
    crop = data.get("crop_size")
    return DatasetSpec(
        name=name, modalities=tuple(modalities), suffixes=tuple(suffixes),
        label_suffix=str(data.get("label_suffix", "seg")), file_separator=str(data.get("separator", "_")),
        label_map=label_map, class_names=tuple(classes),
        regions=regions, postprocess_region=post.get("region"),
        postprocess_min_volume_mm3=float(post.get("min_volume_mm3", 500.0)), spatial_dims=dims,
        crop_size=tuple(int(v) for v in crop) if crop else None,
        modality_aliases=modality_aliases, class_aliases=class_aliases, region_aliases=region_aliases)


def spec_to_description(spec: DatasetSpec) -> dict:
    """The description-file form of a spec (what load_description reads back to an equal spec)."""
    mods = {}
    for m, s in zip(spec.modalities, spec.suffixes):
        aliases = list(spec.modality_aliases.get(m, ()))
        mods[m] = {"suffix": s, **({"aliases": aliases} if aliases else {})}
    out = {
        "name": spec.name, "dimensions": spec.spatial_dims, "modalities": mods, "label_suffix": spec.label_suffix,
        **({"separator": spec.file_separator} if spec.file_separator != "_" else {}),
        "labels": {int(v): spec.class_names[c] for v, c in spec.label_map.items()},
        "regions": {r: [spec.class_names[c] for c in cs] for r, cs in spec.regions.items()},
    }
    for key in ("class_aliases", "region_aliases"):
        if getattr(spec, key):
            out[key] = {k: list(v) for k, v in getattr(spec, key).items()}
    if spec.postprocess_region:
        out["postprocess"] = {"region": spec.postprocess_region, "min_volume_mm3": spec.postprocess_min_volume_mm3}
    if spec.crop_size:
        out["crop_size"] = list(spec.crop_size)
    return out


def write_description(path: str | Path, spec: DatasetSpec) -> None:
    from ..utils import atomic_write_text
    import yaml

    atomic_write_text(path, yaml.safe_dump(spec_to_description(spec), sort_keys=False))

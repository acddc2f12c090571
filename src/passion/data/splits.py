"""Train/val/test splits and the imbalanced missing-modality table (METHOD.md section 2).

The table is written in the reference CSV format (`data_name,mask_id,mask,pos_mask_ids`) so
that our files and the published ones are interchangeable; it is always parsed as data.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..utils import PassionError, atomic_path, atomic_write_json, atomic_write_text
from .availability import availability_counts, genuine_availability, require_every_modality, respect_genuine, within
from .missing_rates import (  # noqa: F401  (re-exported: the split API in one place)
    allocate_masks, check_missing_rates, describe_split, nominal_from_reference_name, parse_missing_rates,
    rate_warnings, subset_counts_nominal, uses_reference_allocation)
from .spec import DatasetSpec, Mask, get_spec

CSV_HEADER = ["data_name", "mask_id", "mask", "pos_mask_ids"]
SPLIT_FILES = ("train.txt", "val.txt", "test.txt", "train_missing.csv", "split.json")


@dataclass(frozen=True)
class MissingRow:
    """One training case with its fixed modality subset."""

    name: str
    mask_id: int
    mask: Mask
    pos_mask_ids: tuple[int, ...]


@dataclass
class Split:
    """What the trainer needs: case lists and each training case's fixed mask (None = complete)."""

    train: list[str]
    val: list[str]
    test: list[str]
    masks: dict[str, Mask] | None
    spec: DatasetSpec | None = None
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- subsets

def pos_mask_ids(mask: Sequence[bool], spec: DatasetSpec) -> tuple[int, ...]:
    """Ids of every non-empty subset reachable from `mask` by dropping modalities (idt_drop)."""
    return tuple(i for i, sub in enumerate(spec.subsets()) if within(sub, mask))


def make_row(name: str, mask: Sequence[bool], spec: DatasetSpec) -> MissingRow:
    mask = tuple(bool(v) for v in mask)
    return MissingRow(name, spec.subset_id(mask), mask, pos_mask_ids(mask, spec))


# --------------------------------------------------------------------------- generation

def train_val_test_split(case_names: Sequence[str], val: float, test: float,
                         seed: int) -> tuple[list[str], list[str], list[str]]:
    """Shuffle with the seed and cut; each list is returned sorted so files diff cleanly."""
    for label, frac in (("val", val), ("test", test)):
        if not 0.0 <= frac < 1.0:
            raise PassionError(f"--{label} fraction must be in [0, 1), got {frac}")
    names = list(case_names)
    if len(set(names)) != len(names):
        raise PassionError("duplicate case names in the case list")
    n = len(names)
    n_test = int(round(n * test))
    n_val = int(round(n * val))
    if n_test + n_val >= n:
        raise PassionError(f"val={val} and test={test} leave no training case out of {n}")
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [names[i] for i in order]
    test_names = sorted(shuffled[:n_test])
    val_names = sorted(shuffled[n_test:n_test + n_val])
    train_names = sorted(shuffled[n_test + n_val:])
    return train_names, val_names, test_names


def imbalanced_missing_split(case_names: Sequence[str], missing_rates: Sequence[float], seed: int,
                             spec: DatasetSpec,
                             genuinely_available: Mapping[str, Sequence[bool]] | None = None) -> list[MissingRow]:
    """Assign every training case a fixed modality subset with the given missing rates
    (missing_rates.allocate_masks: the reference allocation, or largest remainder for few cases)."""
    names = list(case_names)
    if not names:
        raise PassionError("no training cases to assign missing modalities to")
    rates = check_missing_rates(missing_rates, spec)
    rng = np.random.default_rng(seed)
    masks = allocate_masks(len(names), rates, spec, rng)
    order = rng.permutation(len(names))
    rows = []
    for name, k in zip(names, order):
        mask = masks[k]
        if genuinely_available is not None and name in genuinely_available:
            mask = respect_genuine(mask, genuinely_available[name])
        rows.append(make_row(name, mask, spec))
    return rows


# --------------------------------------------------------------------------- CSV IO

def _bool_list_text(mask: Sequence[bool]) -> str:
    return "[" + ", ".join("True" if v else "False" for v in mask) + "]"


def _int_list_text(ids: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(i)) for i in ids) + "]"


def rows_to_csv_text(rows: Sequence[MissingRow]) -> str:
    """The reference layout: excel dialect (CRLF, quotes only where a comma needs them)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_HEADER)
    for r in rows:
        writer.writerow([r.name, r.mask_id, _bool_list_text(r.mask), _int_list_text(r.pos_mask_ids)])
    return buf.getvalue()


def write_missing_csv(path: str | Path, rows: Sequence[MissingRow]) -> None:
    _atomic_write_raw(Path(path), rows_to_csv_text(rows))


def _atomic_write_raw(path: Path, text: str) -> None:
    """Write text without newline translation (the CSV carries its own CRLF)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            f.write(text)


_BOOL_TOKENS = {"true": True, "false": False}


def _parse_bool_list(text: str) -> list[bool]:
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError(f"mask {text!r} is not a bracketed list")
    tokens = [t.strip().lower() for t in text[1:-1].split(",")]
    if tokens == [""]:
        raise ValueError("mask is empty")
    if any(t not in _BOOL_TOKENS for t in tokens):
        raise ValueError(f"mask {text!r} must contain only True/False")
    return [_BOOL_TOKENS[t] for t in tokens]


def _parse_int_list(text: str) -> list[int]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"pos_mask_ids {text!r} is not a list of integers") from None
    if not isinstance(value, list) or any(type(v) is not int for v in value):
        raise ValueError(f"pos_mask_ids {text!r} is not a list of integers")
    return value


def _parse_int(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text):
        raise ValueError(f"mask_id {text!r} is not a non-negative integer")
    return int(text)


def _parse_row(fields: list[str], spec: DatasetSpec) -> MissingRow:
    if len(fields) != 4:
        raise ValueError(f"expected 4 fields, got {len(fields)}")
    name = fields[0].strip()
    if not name:
        raise ValueError("empty data_name")
    mask_id = _parse_int(fields[1])
    mask = _parse_bool_list(fields[2])
    pos = _parse_int_list(fields[3])
    if len(mask) != spec.num_modalities:
        raise ValueError(f"mask has {len(mask)} entries, dataset {spec.name} has {spec.num_modalities} modalities")
    if not any(mask):
        raise ValueError("mask has no modality present")
    row = make_row(name, mask, spec)
    if mask_id != row.mask_id:
        raise ValueError(f"mask_id {mask_id} does not match mask {fields[2]} (expected {row.mask_id})")
    if tuple(pos) != row.pos_mask_ids:
        raise ValueError(f"pos_mask_ids {fields[3]} do not match mask {fields[2]} (expected {list(row.pos_mask_ids)})")
    return row


def read_missing_csv(path: str | Path, spec: DatasetSpec | None = None) -> list[MissingRow]:
    """Parse and validate a missing-modality table; any defect names the file and line."""
    path = Path(path)
    spec = spec or get_spec("brats2020")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PassionError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PassionError(f"{path}: unreadable ({exc})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != CSV_HEADER:
            raise PassionError(f"{path}:1: header must be {','.join(CSV_HEADER)}, got {header}")
        rows: list[MissingRow] = []
        seen: set[str] = set()
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue
            try:
                row = _parse_row(fields, spec)
            except ValueError as exc:
                raise PassionError(f"{path}:{reader.line_num}: {exc}") from None
            if row.name in seen:
                raise PassionError(f"{path}:{reader.line_num}: duplicate case {row.name!r}")
            seen.add(row.name)
            rows.append(row)
    except csv.Error as exc:
        raise PassionError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    if not rows:
        raise PassionError(f"{path}: no cases in the table")
    return rows


def read_case_list(path: str | Path) -> list[str]:
    """One case name per line; blank lines ignored, duplicates rejected."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise PassionError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PassionError(f"{path}: unreadable ({exc})") from None
    names: list[str] = []
    seen: set[str] = set()
    for i, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            continue
        if "," in name or any(c.isspace() for c in name):
            raise PassionError(f"{path}:{i}: {name!r} is not a case name")
        if name in seen:
            raise PassionError(f"{path}:{i}: duplicate case {name!r}")
        seen.add(name)
        names.append(name)
    return names


def _case_list_text(names: Sequence[str]) -> str:
    return "".join(f"{n}\n" for n in names)


# --------------------------------------------------------------------------- make / load

def _cases_from_cache(cache: Path) -> tuple[DatasetSpec, list[str], dict[str, Mask]]:
    from .cache import read_index

    index = read_index(cache)
    spec = DatasetSpec.from_dict(index["spec"])
    cases = index.get("cases") or []
    if not cases:
        raise PassionError(f"{cache}: the cache has no cases")
    names = [c["name"] for c in cases]
    return spec, names, genuine_availability(index, spec.num_modalities)


def _refuse_existing(out: Path, force: bool) -> None:
    for name in SPLIT_FILES:
        if (out / name).exists() and not force:
            raise PassionError(f"{out / name} already exists; use --force to overwrite")


def make_split(cache_or_cases: str | Path | Sequence[str], out_dir: str | Path, val: float = 0.1,
               test: float = 0.2, seed: int = 1037, missing_rates: Sequence[float] | None = None,
               force: bool = False, spec: DatasetSpec | None = None) -> dict:
    """Write OUT/{train,val,test}.txt, train_missing.csv and split.json; return split.json's content.

    `cache_or_cases` is a cache directory or an explicit list of case names (then `spec`
    names the dataset, default brats2020). Everything is computed before anything is written.
    """
    out = Path(out_dir)
    _refuse_existing(out, force)
    genuine = None
    if isinstance(cache_or_cases, (str, Path)):
        spec, names, genuine = _cases_from_cache(Path(cache_or_cases))
        source = {"type": "cache", "path": str(cache_or_cases)}
    else:
        names = list(cache_or_cases)
        spec = spec or get_spec("brats2020")
        source = {"type": "cases", "count": len(names)}
        if not names:
            raise PassionError("no cases found in the case list")
    rates = check_missing_rates(missing_rates if missing_rates is not None else [0.0] * spec.num_modalities, spec)
    train, val_names, test_names = train_val_test_split(names, val, test, seed)
    rows = imbalanced_missing_split(train, rates, seed, spec, genuine)
    require_every_modality(availability_counts([r.mask for r in rows]), spec.modalities,
                           " (missing rate or genuinely missing files); lower its missing rate or add cases")
    info = {
        "format": "passion-split", "version": 1, "seed": seed, "source": source,
        "fractions": {"val": val, "test": test},
        "counts": {"train": len(train), "val": len(val_names), "test": len(test_names)},
        "spec": spec.to_dict(),
        "nominal_missing_rate": {m: r for m, r in zip(spec.modalities, rates)},
        "train_missing": describe_split(rows, spec, rates),
        "allocation": "reference" if uses_reference_allocation(len(train), spec) else "largest_remainder",
    }
    info["warnings"] = rate_warnings(info["train_missing"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "train.txt", _case_list_text(train))
    atomic_write_text(out / "val.txt", _case_list_text(val_names))
    atomic_write_text(out / "test.txt", _case_list_text(test_names))
    write_missing_csv(out / "train_missing.csv", rows)
    atomic_write_json(out / "split.json", info)  # last: marks the split complete
    return info


def read_split_info(split_dir: str | Path) -> dict:
    """split.json of a split directory ({} when absent, e.g. a reference split)."""
    path = Path(split_dir) / "split.json"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PassionError(f"{path}: unreadable ({exc})") from None
    if not isinstance(info, dict):
        raise PassionError(f"{path}: expected a JSON object")
    return info


def training_description(split_dir: str | Path, spec: DatasetSpec | None = None) -> dict | None:
    """describe_split() of a split directory's training table, for reports.

    make_split records it in split.json under "train_missing"; for a folder without one (a
    reference split) it is computed from train_missing.csv. None when there is no table.
    """
    d = Path(split_dir)
    info = read_split_info(d)
    if isinstance(info.get("train_missing"), dict):
        return info["train_missing"]
    table = d / "train_missing.csv"
    if not table.is_file():
        return None
    if "spec" in info:
        spec = DatasetSpec.from_dict(info["spec"])
    spec = spec or get_spec("brats2020")
    return describe_split(read_missing_csv(table, spec), spec, nominal_from_reference_name(table, spec))


def load_split(split_dir: str | Path, table: str | Path | None = None,
               spec: DatasetSpec | None = None) -> Split:
    """Read a split directory (ours, or the reference one with `table=` its CSV)."""
    d = Path(split_dir)
    info = read_split_info(d)
    if spec is None and "spec" in info:
        spec = DatasetSpec.from_dict(info["spec"])
    if not (d / "train.txt").is_file():
        raise PassionError(f"{d}: no train.txt; run `passion split` first")
    train = read_case_list(d / "train.txt")
    val = read_case_list(d / "val.txt") if (d / "val.txt").is_file() else []
    test = read_case_list(d / "test.txt") if (d / "test.txt").is_file() else []
    table_path = Path(table) if table is not None else d / "train_missing.csv"
    masks = None
    if table is not None or table_path.is_file():
        rows = read_missing_csv(table_path, spec)
        masks = {r.name: r.mask for r in rows}
        absent = [n for n in train if n not in masks]
        if absent:
            raise PassionError(f"{table_path}: training case {absent[0]!r} has no row ({len(absent)} missing)")
    return Split(train, val, test, masks, spec, info)

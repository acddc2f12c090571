"""Which modalities a training case has (METHOD.md sections 1, 2 and 5), and the counts n[m].

Every stage asks this module: the split (drawing a case's fixed mask), the training dataset and
the trainer (reading it back, counting n[m] for PASSION's weight N_iter / n[m]).

- Genuine availability: the modality files a case has in the cache (`available` in dataset.json).
- Drawing a split (`respect_genuine`): the drawn subset keeps only modalities whose file exists; when
  the draw and the files share nothing the case keeps the files it has, so a table made by
  `passion split` never claims a missing file and never holds an empty mask.
- Reading a split (`effective_mask`), idt and idt_drop: the table's mask AND the files. An empty
  result (a table edited by hand, or a cache changed after the split) is an error naming the case;
  nothing is silently substituted for what the table says.
- pdt: complete cases only; a case's mask is every modality and the table is ignored.
- idt_drop and pdt draw uniformly among the non-empty subsets of that mask (`drop_choices`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..config import SETTINGS
from ..utils import PassionError
from .spec import DatasetSpec, Mask

MaskRows = Mapping[str, Sequence[bool]] | Sequence[Sequence[bool]]

ABSENT = "is present in no training case"


def check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise PassionError(f"unknown training setting {setting!r}; expected one of {', '.join(SETTINGS)}")


def genuine_availability(index: Mapping, num_modalities: int) -> dict[str, Mask]:
    """{case: files present per modality} from a cache index (an entry without the key has them all)."""
    return {c["name"]: tuple(bool(v) for v in c.get("available", [True] * num_modalities))
            for c in index.get("cases") or []}


def cache_availability(cache: str | Path, spec: DatasetSpec) -> dict[str, Mask]:
    """genuine_availability of the cache folder `cache`."""
    from .cache import read_index

    return genuine_availability(read_index(cache), spec.num_modalities)


def check_cases_in_cache(cache: str | Path, names: Sequence[str], genuine: Mapping[str, Mask]) -> None:
    if not names:
        raise PassionError("no cases given to the dataset")
    for n in names:
        if n not in genuine:
            raise PassionError(f"case {n!r} is not in cache {cache} (run `passion prepare` first)")


def within(sub: Sequence[bool], mask: Sequence[bool]) -> bool:
    """Every modality of `sub` is in `mask`."""
    return all(bool(m) or not s for s, m in zip(sub, mask))


def drop_choices(mask: Mask, spec: DatasetSpec) -> list[Mask]:
    """The non-empty subsets of `mask` in the reference order: what idt_drop and pdt draw from."""
    return [s for s in spec.subsets() if within(s, mask)]


def respect_genuine(drawn: Mask, available: Sequence[bool]) -> Mask:
    """A split's drawn mask limited to the files that exist; the files themselves if nothing is left."""
    avail = tuple(bool(v) for v in available)
    both = tuple(bool(d) and a for d, a in zip(drawn, avail))
    return both if any(both) else avail


def effective_mask(split_mask: Sequence[bool] | None, available: Sequence[bool], case: str = "?") -> Mask:
    """What a training case uses: the split's mask AND its files (None: whatever files exist); never empty."""
    avail = tuple(bool(v) for v in available)
    if split_mask is None:
        if not any(avail):
            raise PassionError(f"training case {case!r} has no modality file in the cache")
        return avail
    both = tuple(bool(t) and a for t, a in zip(split_mask, avail))
    if not any(both):
        raise PassionError(f"training case {case!r}: its split mask {[bool(t) for t in split_mask]} has no "
                           f"modality that exists in the cache (files: {list(avail)})")
    return both


def split_mask_rows(names: Sequence[str], masks: MaskRows, num_modalities: int) -> list[Mask]:
    """Masks given by a caller (not read by splits.load_split, which validates its own), one per case."""
    if isinstance(masks, Mapping):
        absent = [n for n in names if n not in masks]
        if absent:
            raise PassionError(f"case {absent[0]!r} has no mask in the split ({len(absent)} cases without)")
        rows = [masks[n] for n in names]
    else:
        rows = list(masks)
        if len(rows) != len(names):
            raise PassionError(f"{len(rows)} masks for {len(names)} cases")
    for n, r in zip(names, rows):
        if len(r) != num_modalities or not any(r):
            raise PassionError(f"case {n!r}: mask {list(r)} is not a non-empty subset of {num_modalities} modalities")
    return [tuple(bool(v) for v in r) for r in rows]


def require_every_modality(counts: Sequence[int], modalities: Sequence[str] | None = None, where: str = "",
                           quote: bool = False) -> None:
    """n[m] == 0 is an error: PASSION's weight N_iter / n[m] would divide by zero (METHOD.md section 5)."""
    for m, c in enumerate(counts):
        if c == 0:
            name = modalities[m] if modalities else f"#{m}"
            raise PassionError(f"modality {repr(name) if quote else name} {ABSENT}{where}")


def availability_counts(masks: MaskRows, setting: str = "idt", require_all: bool = False,
                        modalities: Sequence[str] | None = None) -> list[int]:
    """n[m] = number of training cases having modality m (pdt: every case has every modality).

    `require_all` turns n[m] == 0 into a PassionError (the inverse weight N/n[m] would divide by zero).
    """
    rows = list(masks.values()) if isinstance(masks, Mapping) else list(masks)
    if not rows:
        raise PassionError("no training masks to count modalities in")
    num = len(rows[0])
    if setting == "pdt":
        counts = [len(rows)] * num
    else:
        counts = [sum(bool(r[m]) for r in rows) for m in range(num)]
    if require_all:
        require_every_modality(counts, modalities, "; cannot weight it by 1/n")
    return counts


@dataclass(frozen=True)
class TrainingAvailability:
    """The effective fixed mask of every training case under one setting, resolved once."""

    setting: str
    names: tuple[str, ...]
    masks: tuple[Mask, ...]
    modalities: tuple[str, ...]

    def counts(self, require_all: bool = False) -> list[int]:
        return availability_counts(self.masks, self.setting, require_all, self.modalities)


def training_availability(genuine: Mapping[str, Mask], names: Sequence[str],
                          split_masks: MaskRows | None, setting: str,
                          modalities: Sequence[str]) -> TrainingAvailability:
    """Resolve each case's mask under `setting` from its files and its (already valid) split mask.

    `split_masks` is {case: mask}, masks in the order of `names`, or None (whatever files exist);
    pdt ignores it and refuses a case that lacks a modality file.
    """
    check_setting(setting)
    names = tuple(names)
    if setting == "pdt":
        incomplete = [n for n in names if not all(genuine[n])]
        if incomplete:
            raise PassionError(f"data.setting=pdt trains on complete cases, but {incomplete[0]!r} "
                               f"({len(incomplete)} cases in all) lacks a modality file; use idt or idt_drop")
        masks = [tuple(genuine[n]) for n in names]
    else:
        if split_masks is None:
            rows: list = [None] * len(names)
        elif isinstance(split_masks, Mapping):
            rows = [split_masks[n] for n in names]
        else:
            rows = list(split_masks)
        masks = [effective_mask(r, genuine[n], n) for n, r in zip(names, rows)]
    return TrainingAvailability(setting, names, tuple(masks), tuple(modalities))

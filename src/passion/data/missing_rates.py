"""Nominal missing rates -> a fixed modality subset per training case -> realised rates (METHOD.md section 2).

Two allocations of subsets to cases:
- the reference one (the published split files): count(S) = max(1, floor(N * P(S))) per subset in the
  reference order, the rest drawn i.i.d. per modality (the all-missing draw redrawn). Kept as it is, so
  that our tables match the published ones (mr2468 on 219 cases: present 90/135/184/43).
- largest remainder, below REFERENCE_MIN_CASES_PER_SUBSET * (2^M - 1) training cases. There the reference
  one starves modalities: it gives every one of the 2^M - 1 subsets a case first, single-modality subsets
  first, so 4 cases at 30 % nominal come out 75 % missing with no complete case. Measured over the
  reference rates (mr2468, mr1379, mr8852) and uniform 10/30/50 % for 4 modalities, and 30/50/70 %,
  uniform 30/50 % for 3, the reference allocation's worst modality deviation settles to its large-N
  value from about 4 cases per subset on (60 cases for 4 modalities, 28 for 3).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..utils import PassionError
from .spec import DatasetSpec, Mask

REFERENCE_MIN_CASES_PER_SUBSET = 4
WARN_POINTS = 5.0  # realised vs nominal missing rate, in percentage points


def check_missing_rates(missing_rates: Sequence[float], spec: DatasetSpec) -> list[float]:
    rates = [float(r) for r in missing_rates]
    if len(rates) != spec.num_modalities:
        raise PassionError(f"need {spec.num_modalities} missing rates ({', '.join(spec.modalities)}), got {len(rates)}")
    for mod, r in zip(spec.modalities, rates):
        if not (0.0 <= r < 1.0) or math.isnan(r):
            raise PassionError(f"missing rate for {mod} must be in [0, 1), got {r}")
    return rates


def parse_missing_rates(text: str | None, spec: DatasetSpec) -> list[float]:
    """'flair=0.6,t1ce=0.4' -> rates in spec order; unlisted modalities are never dropped (0)."""
    rates = [0.0] * spec.num_modalities
    if text is None or not text.strip():
        return rates
    seen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise PassionError(f"--missing-rates: {part!r} is not modality=rate")
        try:
            idx = spec.modality_index(key.strip())
        except ValueError as exc:
            raise PassionError(f"--missing-rates: {exc}") from None
        if idx in seen:
            raise PassionError(f"--missing-rates: {key.strip()} given twice")
        seen.add(idx)
        try:
            rates[idx] = float(value.strip())
        except ValueError:
            raise PassionError(f"--missing-rates: {value.strip()!r} for {key.strip()} is not a number") from None
    check_missing_rates(rates, spec)
    return rates


def _subset_probability(sub: Mask, rates: Sequence[float]) -> float:
    prob = 1.0
    for on, r in zip(sub, rates):
        prob *= (1.0 - r) if on else r
    return prob


# --------------------------------------------------------------------------- allocation

def uses_reference_allocation(n: int, spec: DatasetSpec) -> bool:
    return n >= REFERENCE_MIN_CASES_PER_SUBSET * len(spec.subsets())


def allocate_masks(n: int, rates: Sequence[float], spec: DatasetSpec, rng: np.random.Generator) -> list[Mask]:
    """N masks with the given missing rates, in allocation order (the caller shuffles them onto cases)."""
    if uses_reference_allocation(n, spec):
        return reference_masks(n, rates, spec, rng)
    return largest_remainder_masks(n, rates, spec)


def subset_counts_nominal(n: int, rates: Sequence[float], spec: DatasetSpec) -> list[int]:
    """count(S) = max(1, floor(N * P(S))) per subset in the reference order.

    A subset with probability exactly zero (a modality with missing rate 0 absent) gets no
    case: forcing one would contradict the user's nominal rate.
    """
    counts = []
    for sub in spec.subsets():
        prob = _subset_probability(sub, rates)
        counts.append(0 if prob == 0.0 else max(1, math.floor(n * prob)))
    return counts


def _draw_nonempty(rng: np.random.Generator, rates: Sequence[float]) -> Mask:
    """The all-missing cell is re-drawn i.i.d. per modality until something is present."""
    keep = 1.0 - np.asarray(rates)
    while True:
        mask = tuple(bool(v) for v in rng.random(len(rates)) < keep)
        if any(mask):
            return mask


def reference_masks(n: int, rates: Sequence[float], spec: DatasetSpec, rng: np.random.Generator) -> list[Mask]:
    masks: list[Mask] = []
    for sub, count in zip(spec.subsets(), subset_counts_nominal(n, rates, spec)):
        masks.extend([sub] * min(count, n - len(masks)))
    while len(masks) < n:
        masks.append(_draw_nonempty(rng, rates))
    return masks


def largest_remainder_masks(n: int, rates: Sequence[float], spec: DatasetSpec) -> list[Mask]:
    """Subset counts by largest remainder of N * P(S | not all missing), then single-modality flips until
    each modality misses round(N * rate) cases (as close to nominal as whole cases allow) where possible.

    A flip moves one case between two subsets that differ in one modality only, so it changes that
    modality's count alone; of the possible flips the one that best moves both subsets towards their
    targets is taken. Deterministic: no random draw.
    """
    subsets = spec.subsets()
    probs = np.array([_subset_probability(s, rates) for s in subsets])
    target = n * probs / probs.sum()
    counts = np.floor(target).astype(int)
    for i in sorted(range(len(subsets)), key=lambda i: (-(target[i] - counts[i]), i))[: n - int(counts.sum())]:
        counts[i] += 1
    index = {s: i for i, s in enumerate(subsets)}
    for m, rate in enumerate(rates):
        want_present = n - math.floor(n * rate + 0.5)
        while True:
            present = int(sum(c for s, c in zip(subsets, counts) if s[m]))
            if present == want_present:
                break
            add = present < want_present
            moves = []
            for i, s in enumerate(subsets):
                if counts[i] == 0 or s[m] == add:
                    continue
                new = tuple((not v) if k == m else v for k, v in enumerate(s))
                if any(new):
                    j = index[new]
                    moves.append(((target[j] - counts[j]) - (target[i] - counts[i]), -i, i, j))
            if not moves:
                break  # e.g. every case holding m holds nothing else: the warning will tell
            _, _, i, j = max(moves)
            counts[i] -= 1
            counts[j] += 1
    return [s for s, c in zip(subsets, counts) for _ in range(int(c))]


# --------------------------------------------------------------------------- realised rates

def describe_split(rows, spec: DatasetSpec, nominal: Sequence[float] | None = None) -> dict:
    """Realised (and nominal, when known) missing rates and subset counts of a table of MissingRows."""
    n = len(rows)
    present = {m: sum(r.mask[i] for r in rows) for i, m in enumerate(spec.modalities)}
    counts = {spec.subset_name(s): 0 for s in spec.subsets()}
    for r in rows:
        counts[spec.subset_name(r.mask)] += 1
    desc = {
        "cases": n,
        "dataset": spec.name,
        "modalities": list(spec.modalities),
        "present": present,
        "missing": {m: n - c for m, c in present.items()},
        "missing_rate": {m: (n - c) / n if n else 0.0 for m, c in present.items()},
        "subset_counts": counts,
        "subset_ids": {spec.subset_name(s): i for i, s in enumerate(spec.subsets())},
        "complete_cases": sum(all(r.mask) for r in rows),
    }
    if nominal is not None:
        desc["nominal_missing_rate"] = {m: float(r) for m, r in zip(spec.modalities, nominal)}
    return desc


def rate_warnings(desc: dict) -> list[str]:
    """One line per modality whose realised missing rate is more than WARN_POINTS off nominal."""
    nominal = desc.get("nominal_missing_rate") or {}
    out = []
    for m in desc["modalities"]:
        if m not in nominal:
            continue
        off = 100 * (desc["missing_rate"][m] - nominal[m])
        if abs(off) > WARN_POINTS:
            out.append(f"{m}: realised missing rate {100 * desc['missing_rate'][m]:.1f}% is {abs(off):.1f} points "
                       f"{'above' if off > 0 else 'below'} the nominal {100 * nominal[m]:.1f}% "
                       f"({desc['missing'][m]} of {desc['cases']} training cases)")
    return out


def nominal_from_reference_name(path: str | Path, spec: DatasetSpec) -> list[float] | None:
    """Reference files encode nominal rates x10% as `mrABCD` for [T1, T1ce, FLAIR, T2]."""
    match = re.search(r"_mr(\d{4})(?:\D|$)", Path(path).name)
    if not match or tuple(spec.modalities) != ("flair", "t1ce", "t1", "t2"):
        return None
    t1, t1ce, flair, t2 = (int(c) / 10 for c in match.group(1))
    return [flair, t1ce, t1, t2]

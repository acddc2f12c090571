"""Paired comparison of two objectives (PASSION minus baseline) trained on the same data and seeds.

A seed fixes the phantoms, the split and the training randomness, so the two runs of a seed form a
pair; the unit of evidence is the per-seed difference of mean Dice, summarised by its mean and a
95 % Student t-interval over seeds. Subsets are also grouped by their rarest modality (the one
present in the fewest training cases), where PASSION claims to help most.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from scipy import stats


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, sample sd and the two-sided Student t-interval of the mean (None below two values)."""
    vals = [float(v) for v in values]
    n = len(vals)
    mean = sum(vals) / n if n else float("nan")
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci95": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def rarest_modality(modalities: Sequence[str], present: Mapping[str, int]) -> str:
    """The subset's modality present in the fewest training cases (ties: the first listed)."""
    return min(modalities, key=lambda m: present.get(m, 0))


def _subset_dice(results: dict) -> dict[str, dict[str, float]]:
    return {"+".join(s["modalities"]): s["dice"] for s in results["subsets"]}


def full_subset(results: dict) -> dict:
    """The subset entry of a results.json with the most modalities (all of them when evaluated)."""
    return max(results["subsets"], key=lambda s: len(s["modalities"]))


def _full_name(results: dict) -> str:
    return "+".join(full_subset(results)["modalities"])


def paired_comparison(baseline: Sequence[dict], passion: Sequence[dict], regions: Sequence[str],
                      present: Sequence[Mapping[str, int]] | None = None) -> dict:
    """Paired differences from the results.json of each seed's two runs (same order of seeds).

    present: per seed, the number of training cases having each modality (for the rarest-modality
    grouping); without it the grouping is left out.
    """
    if len(baseline) != len(passion) or not baseline:
        raise ValueError("paired_comparison needs the same, non-zero number of baseline and PASSION results")
    out: dict = {"n_seeds": len(baseline), "mean_over_subsets": {}, "full_subset": {}}
    full = _full_name(baseline[0])
    for region in regions:
        out["mean_over_subsets"][region] = t_interval(
            [p["mean"]["dice"][region] - b["mean"]["dice"][region] for b, p in zip(baseline, passion)])
        out["full_subset"][region] = t_interval(
            [_subset_dice(p)[full][region] - _subset_dice(b)[full][region] for b, p in zip(baseline, passion)])
    if present is not None:
        groups: dict[str, dict[str, list[float]]] = {}
        for b, p, counts in zip(baseline, passion, present):
            bd, pd = _subset_dice(b), _subset_dice(p)
            per_seed: dict[str, dict[str, list[float]]] = {}
            for s in b["subsets"]:
                name = "+".join(s["modalities"])
                group = per_seed.setdefault(rarest_modality(s["modalities"], counts), {r: [] for r in regions})
                for region in regions:
                    group[region].append(pd[name][region] - bd[name][region])
            for mod, diffs in per_seed.items():
                target = groups.setdefault(mod, {r: [] for r in regions})
                for region in regions:
                    target[region].append(sum(diffs[region]) / len(diffs[region]))
        out["by_rarest_modality"] = {mod: {r: t_interval(v) for r, v in g.items()} for mod, g in groups.items()}
    return out


def _fmt(entry: dict) -> str:
    text = f"{entry['mean']:+.3f}"
    if entry["ci95"] is not None:
        lo, hi = entry["ci95"]
        text += f" [{lo:+.3f}, {hi:+.3f}]"
    return text


def paired_line(comparison: dict) -> str:
    """One markdown sentence: PASSION minus baseline per region, with intervals when n >= 2."""
    n = comparison["n_seeds"]
    parts = ", ".join(f"{r} {_fmt(e)}" for r, e in comparison["mean_over_subsets"].items())
    if n < 2:
        return (f"PASSION minus baseline, mean Dice over subsets, paired on 1 seed: {parts}. "
                f"One seed decides nothing: seed-to-seed spread is of the same size; "
                f"`benchmarks/accuracy.py` runs >= 5 paired seeds with 95 % intervals.")
    return f"PASSION minus baseline, mean Dice over subsets, {n} paired seeds, mean [95 % t-interval]: {parts}."

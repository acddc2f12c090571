"""Markdown tables shared by `passion evaluate` and the comparison report."""
from __future__ import annotations

from typing import Sequence

PRESENT, ABSENT = "●", "○"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table; `align` per column is 'l', 'c' or 'r' (default: l then r)."""
    n = len(header)
    if align is None:
        align = ["l"] + ["r"] * (n - 1)
    if len(align) != n:
        raise ValueError(f"{len(align)} alignments for {n} columns")
    for r in rows:
        if len(r) != n:
            raise ValueError(f"row {list(r)} has {len(r)} cells, header has {n}")
    rule = {"l": ":---", "c": ":---:", "r": "---:"}
    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "|" + "|".join(rule[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:  # missing or NaN
        return "n/a"
    return f"{value:.{digits}f}"


def subset_table(results: dict, dice_percent: bool = True, bold_mean: bool = True) -> str:
    """The paper's table: one row per modality subset with present modalities marked ●/○,
    Dice per region, then HD95 per region, and a last row with the mean over subsets.

    `results` is the dict written to results.json by evaluate (keys: modalities, regions,
    subsets [{modalities, dice, hd95}], mean {dice, hd95}).
    """
    mods = list(results["modalities"])
    regions = list(results["regions"])
    scale = 100.0 if dice_percent else 1.0
    dunit = "Dice %" if dice_percent else "Dice"
    header = [m.upper() if len(m) <= 5 else m for m in mods]
    header += [f"{dunit} {r}" for r in regions] + [f"HD95 {r} (mm)" for r in regions]
    rows = []
    for s in results["subsets"]:
        present = set(s["modalities"])
        row = [PRESENT if m in present else ABSENT for m in mods]
        row += [fmt(s["dice"][r] * scale) for r in regions] + [fmt(s["hd95"][r]) for r in regions]
        rows.append(row)
    mean = results["mean"]
    b = "**" if bold_mean else ""
    last = [f"{b}mean{b}"] + [""] * (len(mods) - 1)
    last += [f"{b}{fmt(mean['dice'][r] * scale)}{b}" for r in regions]
    last += [f"{b}{fmt(mean['hd95'][r])}{b}" for r in regions]
    rows.append(last)
    align = ["c"] * len(mods) + ["r"] * (2 * len(regions))
    return markdown_table(header, rows, align)

"""`passion report`: one markdown report comparing several runs, with the figures it embeds.

Reads only what runs leave on disk (config.yaml, metrics.jsonl, eval/<split>/results.json,
the split's split.json), so it works on any finished runs, also from other machines.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..run_dir import RunDir  # noqa: E402
from ..utils import PassionError, atomic_write_text  # noqa: E402

REGIONS = ("WT", "TC", "ET")


class RunRecord:
    """What the report needs of one run directory."""

    def __init__(self, run_dir: Path, split: str = "test"):
        self.run = RunDir(run_dir)
        self.dir = self.run.path
        if not self.run.config.is_file():
            raise PassionError(f"{self.dir}: no {self.run.config.name}; is this a run directory made by "
                               f"`passion train`?")
        if not self.run.is_evaluated(split):
            raise PassionError(f"{self.dir}: no evaluation on split {split!r}; run `passion evaluate {self.dir}` first")
        self.config = self.run.read_config()
        self.results = self.run.read_results(split)
        self.metrics = self.run.read_metrics()
        self.label = self._label()
        # the dataset's regions (BraTS: WT, TC, ET; MyoPS: LV, RV, MYO), without the post-processed one,
        # whose name engine/metrics.py states in the results (conventions.postprocess.name)
        post = self.results.get("conventions", {}).get("postprocess", {}).get("name")
        self.regions = tuple(r for r in self.results.get("regions", REGIONS) if r != post) or REGIONS

    def _label(self) -> str:
        return f"{self.config['model']['name']}+{self.config['objective']['name']}"

    def subset_names(self) -> list[str]:
        return ["+".join(s["modalities"]) for s in self.results["subsets"]]

    def table(self, kind: str) -> np.ndarray:
        """[subsets, regions] array of dice or hd95."""
        return np.array([[s[kind][r] for r in self.regions] for s in self.results["subsets"]], dtype=float)

    def mean(self, kind: str) -> np.ndarray:
        return np.array([self.results["mean"][kind][r] for r in self.regions], dtype=float)


def _unique_labels(runs: list[RunRecord]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        if r.label in seen or any(o.label == r.label for o in runs if o is not r):
            seen[r.label] = seen.get(r.label, 0) + 1
            r.label = f"{r.label} ({r.dir.name})"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _fmt(v: float, bold: bool) -> str:
    s = f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"
    return f"**{s}**" if bold else s


def _comparison_table(runs: list[RunRecord], kind: str) -> str:
    """Rows = subsets (+ mean), columns = region x run, best per row and region in bold."""
    better = np.argmax if kind == "dice" else np.argmin
    names = runs[0].subset_names()
    tables = np.stack([r.table(kind) for r in runs])  # [runs, subsets, regions]
    means = np.stack([r.mean(kind) for r in runs])
    REGIONS = runs[0].regions  # noqa: N806
    head = ["subset"] + [f"{reg} {r.label}" for reg in REGIONS for r in runs]
    if len(runs) > 1:
        head += [f"Δ{reg} {r.label}" for reg in REGIONS for r in runs[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [(n, tables[:, i, :]) for i, n in enumerate(names)] + [("**mean**", means)]
    for name, vals in rows:
        cells = [name]
        for j, _ in enumerate(REGIONS):
            best = better(vals[:, j])
            cells += [_fmt(vals[k, j], k == best and len(runs) > 1) for k in range(len(runs))]
        if len(runs) > 1:
            for j, _ in enumerate(REGIONS):
                cells += [f"{vals[k, j] - vals[0, j]:+.4f}" if kind == "dice" else f"{vals[k, j] - vals[0, j]:+.2f}"
                          for k in range(1, len(runs))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _delta_heatmap(runs: list[RunRecord], path: Path) -> None:
    names = runs[0].subset_names()
    base = runs[0].table("dice")
    others = runs[1:]
    REGIONS = runs[0].regions  # noqa: N806
    fig, axes = plt.subplots(1, len(others), figsize=(3.2 * len(others) + 1.5, 0.38 * len(names) + 1.8),
                             squeeze=False)
    lim = max(0.05, max(float(np.abs(r.table("dice") - base).max()) for r in others))
    for ax, r in zip(axes[0], others):
        delta = r.table("dice") - base
        im = ax.imshow(delta, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(REGIONS)), REGIONS)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for i in range(delta.shape[0]):
            for j in range(delta.shape[1]):
                ax.text(j, i, f"{delta[i, j]:+.3f}", ha="center", va="center", fontsize=7)
        ax.set_title(f"Dice: {r.label}\nminus {runs[0].label}", fontsize=9)
        ax.set_xlabel("region")
    fig.colorbar(im, ax=axes[0].tolist(), label="Δ Dice")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _per_modality_series(records: list[dict], key: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        value = rec.get(key)
        if isinstance(value, dict):
            x = rec.get("step", rec.get("epoch"))
            for mod, v in value.items():
                if isinstance(v, (int, float)):
                    series.setdefault(mod, []).append((x, float(v)))
    return series


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    if len(y) < 3 or n <= 1:
        return y
    n = min(n, len(y))
    return np.convolve(y, np.ones(n) / n, mode="valid")


def _training_curves(runs: list[RunRecord], path: Path) -> list[str]:
    """Total loss per run and per-modality single-modality losses, and below them the validation
    Dice per region (full subset and mean over subsets) of runs that validated; returns the
    per-modality keys found."""
    from ..method.objectives import TRAINING_CURVES, stat_catalogue  # each objective says what it logs
    from .figures import draw_val_dice, val_regions

    stats, _ = stat_catalogue()
    iters = {r.label: [m for m in r.metrics if m.get("type") == "iter"] for r in runs}
    mod_keys = [k for k, info in stats.items() if info.figure == TRAINING_CURVES
                and any(isinstance(rec.get(k), dict) for recs in iters.values() for rec in recs)]
    validated = {r.label: r.metrics for r in runs if val_regions(r.metrics)}
    val_regs = [reg for reg in runs[0].regions if any(reg in val_regions(m) for m in validated.values())]
    ncols = max(1 + len(mod_keys), len(val_regs))
    nrows = 2 if val_regs else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes[0][1 + len(mod_keys):]:
        ax.axis("off")
    if val_regs:
        for ax, reg in zip(axes[1], val_regs):
            draw_val_dice(ax, validated, reg)
        for ax in axes[1][len(val_regs):]:
            ax.axis("off")
    ax = axes[0][0]
    for r in runs:
        recs = iters[r.label]
        if not recs:
            continue
        x = np.array([m["step"] for m in recs])
        y = np.array([m["loss"] for m in recs])
        k = max(1, len(y) // 50)
        ax.plot(x[len(x) - len(_smooth(y, k)):], _smooth(y, k), label=r.label)
    ax.set_title("total training loss (moving average)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    for ax, key in zip(axes[0][1:], mod_keys):
        for r in runs:
            for mod, pts in _per_modality_series(iters[r.label], key).items():
                x, y = np.array(pts).T
                k = max(1, len(y) // 50)
                ax.plot(x[len(x) - len(_smooth(y, k)):], _smooth(y, k), label=f"{r.label} {mod}")
        ax.set_title(f"{stats[key].label} per modality")
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return mod_keys


def _epoch_figures(runs: list[RunRecord], out: Path) -> list[str]:
    """The per-epoch, per-modality figures the objectives declare (PASSION: beta and relative
    preference), each over the runs that log its stats; returns the report's lines for them."""
    from ..method.objectives import stat_catalogue

    stats, figures = stat_catalogue()
    parts = []
    for name, fig_info in figures.items():
        keys = [k for k, info in stats.items() if info.figure == name]
        if _epoch_figure(runs, keys, stats, out / f"{name}.png"):
            parts += [f"## {fig_info.heading}\n", f"![{fig_info.alt}]({name}.png)\n"]
    return parts


def _epoch_figure(runs: list[RunRecord], keys: list[str], stats: dict, path: Path) -> bool:
    """One row per run that logs any of `keys`, one panel per key: per-modality values per epoch."""
    runs = [r for r in runs if any(isinstance(m.get(k), dict) for m in r.metrics for k in keys)]
    if not runs:
        return False
    fig, axes = plt.subplots(len(runs), len(keys), figsize=(5.5 * len(keys), 3.4 * len(runs)), squeeze=False)
    for row, r in zip(axes, runs):
        epochs = [m for m in r.metrics if m.get("type") == "epoch"]
        for ax, key in zip(row, keys):
            for mod, pts in _per_modality_series([{**m, "step": m["epoch"]} for m in epochs], key).items():
                x, y = np.array(pts).T
                ax.plot(x + 1, y, marker="o", ms=3, label=mod)
            ax.set_title(f"{r.label}: {stats[key].label}")
            ax.set_xlabel("epoch")
            ax.legend(fontsize=8)
            if stats[key].zero_line:
                ax.axhline(0, color="grey", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _split_dirs(runs: list[RunRecord]) -> dict[Path, list[RunRecord]]:
    """Each distinct training split folder of the runs, with the runs trained on it."""
    out: dict[Path, list[RunRecord]] = {}
    for r in runs:
        value = (r.config.get("data") or {}).get("split")
        if value:  # config paths may be relative to where the run was trained
            out.setdefault(r.run.resolve(str(value), "data.split").resolve(), []).append(r)
    return out


def _split_section(runs: list[RunRecord]) -> str:
    """Realised missing rates and per-subset counts of each training split (METHOD.md section 2)."""
    from ..data.spec import get_spec
    from ..data.splits import training_description

    lines = []
    for split_dir, users in _split_dirs(runs).items():
        try:
            spec = get_spec(users[0].results.get("dataset") or "")
        except ValueError:
            spec = None  # a dataset without a preset: split.json names its spec
        try:
            desc = training_description(split_dir, spec)
        except PassionError as exc:
            lines += [f"_Split `{split_dir}`: {exc}_", ""]
            continue
        if desc is None:
            lines += [f"_Split `{split_dir}`: no split.json or train_missing.csv found._", ""]
            continue
        nominal = desc.get("nominal_missing_rate") or {}
        lines.append(f"Split `{split_dir}` (runs {', '.join(f'`{r.label}`' for r in users)}): "
                     f"{desc['cases']} training cases, {desc['complete_cases']} complete.\n")
        lines.append("| modality | nominal missing % | realised missing % | cases with it |\n|---|---|---|---|")
        for mod, v in desc["missing_rate"].items():
            nom = nominal.get(mod)
            lines.append(f"| {mod} | {'' if nom is None else f'{100 * nom:.1f}'} | {100 * v:.1f} | "
                         f"{desc['present'][mod]} |")
        ids = desc.get("subset_ids") or {}
        lines += ["", "Training cases per modality subset:\n", "| mask_id | subset | cases |\n|---|---|---|"]
        lines += [f"| {ids.get(name, '')} | {name} | {n} |" for name, n in desc["subset_counts"].items()]
        lines.append("")
    return "\n".join(lines) if lines else "_The runs' configs name no training split._"


def _config_diff(runs: list[RunRecord]) -> str:
    flat = [_flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f if k != "run_dir"})
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    if not differing:
        return "_The runs share the same configuration apart from their run directory._"
    head = "| key | " + " | ".join(r.label for r in runs) + " |"
    lines = [head, "|" + "---|" * (len(runs) + 1)]
    for k in differing:
        lines.append(f"| `{k}` | " + " | ".join(f"`{f.get(k)}`" for f in flat) + " |")
    return "\n".join(lines)


def write_comparison_report(run_dirs: list[str | Path], out_dir: str | Path, split: str = "test") -> Path:
    """Write OUT/report.md and its PNGs comparing the runs; the first run is the reference for deltas."""
    if not run_dirs:
        raise PassionError("give at least one run directory")
    runs = [RunRecord(Path(d), split) for d in run_dirs]
    _unique_labels(runs)
    names = runs[0].subset_names()
    for r in runs[1:]:
        if r.subset_names() != names:
            raise PassionError(f"{r.dir} was evaluated on different subsets than {runs[0].dir}; re-evaluate both "
                               f"with the same --subsets")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    conv = runs[0].results.get("conventions", {})
    parts = [f"# PASSION comparison report\n",
             f"Runs (first = reference for Δ): " + ", ".join(f"`{r.label}` ({r.dir})" for r in runs) + "\n",
             f"Evaluated on split `{split}`, {_count(runs[0].results.get('cases'))} cases, {len(names)} modality subsets. "
             f"Conventions: {json.dumps(conv)}\n",
             "## Mean over subsets\n", _mean_table(runs), "",
             *_paired_section(runs),
             "## Dice per subset (higher is better, best in bold)\n", _comparison_table(runs, "dice"), "",
             "## HD95 per subset in mm (lower is better, best in bold)\n", _comparison_table(runs, "hd95"), ""]
    if len(runs) > 1:
        _delta_heatmap(runs, out / "delta_dice.png")
        parts += ["## Dice difference to the reference run\n", "![delta heatmap](delta_dice.png)\n"]
    _training_curves(runs, out / "training_curves.png")
    parts += ["## Training curves\n", "![training curves](training_curves.png)\n"]
    if any(any(isinstance(m.get("val_dice"), dict) for m in r.metrics) for r in runs):
        parts += ["Bottom row: Dice on the val cases during training, full subset (solid) and mean over "
                  f"subsets (dashed); `{RunDir('.').best}` holds the epoch with the best mean.\n"]
    parts += _epoch_figures(runs, out)
    parts += _overlay_section(runs, out, split)
    parts += ["## Training split: realised missing rates\n", _split_section(runs), "",
              "## Configuration differences\n", _config_diff(runs), ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(parts))
    return report


def _overlay_section(runs: list[RunRecord], out: Path, split: str) -> list[str]:
    """Every run's overlay figure, side by side (one column per run)."""
    from urllib.parse import quote

    from .overlay import overlay_file_name, write_run_overlay

    cells, notes = [], []
    for r in runs:
        name = overlay_file_name(r.label)
        note = write_run_overlay(r.dir, r.label, split, out / name)
        cells.append(f"![overlay {r.label}]({quote(name, safe='+')})")
        if note:
            notes.append(f"_{note}_")
    return ["## Overlays: worst, median and best test case\n",
            "Rows: the full subset, each single modality and the two rarest training modalities; reference "
            "as contours, prediction as a translucent fill, per-panel Dice of that case.\n",
            "| " + " | ".join(r.label for r in runs) + " |", "|" + "---|" * len(runs),
            "| " + " | ".join(cells) + " |", "", *notes, ""]


def _paired_section(runs: list[RunRecord]) -> list[str]:
    """PASSION minus baseline over the pairs of runs that share a split and a training seed."""
    from .paired import paired_comparison, paired_line

    def key(r: RunRecord) -> tuple:
        return r.config["model"]["name"], r.config["data"]["split"], r.config["train"]["seed"]

    baselines = {key(r): r for r in runs if r.config["objective"]["name"] == "baseline"}
    pairs = [(baselines[key(r)], r) for r in runs
             if r.config["objective"]["name"] == "passion" and key(r) in baselines]
    if not pairs:
        return []
    comparison = paired_comparison([b.results for b, _ in pairs], [p.results for _, p in pairs], runs[0].regions)
    return ["## PASSION versus baseline, paired by seed\n", paired_line(comparison), ""]


def _mean_table(runs: list[RunRecord]) -> str:
    REGIONS = runs[0].regions  # noqa: N806
    head = ["run"] + [f"Dice {r}" for r in REGIONS] + [f"HD95 {r}" for r in REGIONS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dice = np.stack([r.mean("dice") for r in runs])
    hd = np.stack([r.mean("hd95") for r in runs])
    for k, r in enumerate(runs):
        cells = [r.label]
        cells += [_fmt(dice[k, j], len(runs) > 1 and k == int(np.argmax(dice[:, j]))) for j in range(len(REGIONS))]
        cells += [_fmt(hd[k, j], len(runs) > 1 and k == int(np.argmin(hd[:, j]))) for j in range(len(REGIONS))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _count(cases) -> str:
    """results.json lists the evaluated cases; older files may hold just their number."""
    if isinstance(cases, (list, tuple)):
        return str(len(cases))
    return "?" if cases is None else str(cases)

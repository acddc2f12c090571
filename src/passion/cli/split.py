"""`passion split`: make train/val/test lists and the imbalanced missing-modality table, or describe one."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..data.spec import DatasetSpec, get_spec
from ..data import splits as S
from ..utils import PassionError
from . import app


def _spec_for(name: str | None) -> DatasetSpec:
    try:
        return get_spec(name or "brats2020")
    except ValueError as exc:
        raise PassionError(str(exc)) from None


def _print_human(desc: dict, title: str) -> None:
    """Nominal vs realised missing rates, then the per-subset counts."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    nominal = desc.get("nominal_missing_rate")
    rates = Table(title=f"{title}: {desc['cases']} cases, {desc['complete_cases']} complete")
    rates.add_column("modality")
    if nominal is not None:
        rates.add_column("nominal missing %", justify="right")
    rates.add_column("realised missing %", justify="right")
    rates.add_column("present", justify="right")
    for mod in desc["modalities"]:
        cells = [mod]
        if nominal is not None:
            cells.append(f"{100 * nominal[mod]:.1f}")
        cells += [f"{100 * desc['missing_rate'][mod]:.1f}", str(desc["present"][mod])]
        rates.add_row(*cells)
    console.print(rates)
    subsets = Table(title="cases per modality subset")
    subsets.add_column("mask_id", justify="right")
    subsets.add_column("subset")
    subsets.add_column("cases", justify="right")
    for name, count in desc["subset_counts"].items():
        subsets.add_row(str(desc["subset_ids"][name]), name, str(count))
    console.print(subsets)


def _show(table: Path, dataset: str | None, missing_rates: str | None, as_json: bool) -> None:
    spec = _spec_for(dataset)
    rows = S.read_missing_csv(table, spec)
    nominal = S.parse_missing_rates(missing_rates, spec) if missing_rates else _known_nominal(table, spec)
    desc = S.describe_split(rows, spec, nominal)
    _warn(S.rate_warnings(desc))
    if as_json:
        typer.echo(json.dumps(desc))
    else:
        _print_human(desc, table.name)


def _warn(lines: list[str]) -> None:
    for line in lines:
        typer.secho(f"warning: {line}", fg="yellow", err=True)


def _known_nominal(table: Path, spec: DatasetSpec) -> list[float] | None:
    """Our split.json beside the table, else the reference file-name convention."""
    info_path = table.parent / "split.json"
    if info_path.is_file():
        try:
            nominal = json.loads(info_path.read_text()).get("nominal_missing_rate")
        except json.JSONDecodeError:
            nominal = None
        if isinstance(nominal, dict) and set(nominal) == set(spec.modalities):
            return [float(nominal[m]) for m in spec.modalities]
    return S.nominal_from_reference_name(table, spec)


@app.command("split")
def split_command(
    cache: Optional[Path] = typer.Argument(None, help="Preprocessed cache made by `passion prepare`."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for the split files."),
    val: Optional[float] = typer.Option(None, help="Validation fraction (default 0.1; 0 with --cases-from)."),
    test: Optional[float] = typer.Option(None, help="Test fraction (default 0.2; 0 with --cases-from)."),
    seed: int = typer.Option(1037, help="Seed for the split and the missing-modality table."),
    missing_rates: Optional[str] = typer.Option(
        None, "--missing-rates", help="Per-modality missing rates, e.g. flair=0.6,t1ce=0.4,t1=0.2,t2=0.8."),
    cases_from: Optional[Path] = typer.Option(
        None, "--cases-from", help="Make the table for this list of training cases (one per line) instead of a cache."),
    show: Optional[Path] = typer.Option(None, "--show", help="Describe an existing missing-modality CSV."),
    dataset: Optional[str] = typer.Option(
        None, "--dataset", help="Preset or description file when there is no cache (default brats2020)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing split files."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Split cases into train/val/test and give each training case a fixed modality subset."""
    if show is not None:
        if cache is not None or cases_from is not None:
            raise PassionError("--show describes a table; do not combine it with CACHE or --cases-from")
        _show(show, dataset, missing_rates, as_json)
        return
    if (cache is None) == (cases_from is None):
        raise PassionError("give exactly one of CACHE or --cases-from (or --show FILE.csv)")
    if out is None:
        raise PassionError("--out DIR is required")
    if cache is not None:
        if not cache.is_dir():
            raise PassionError(f"{cache}: no such cache directory")
        from ..data.cache import read_spec

        spec = read_spec(cache)
        if dataset is not None and _spec_for(dataset).name != spec.name:
            raise PassionError(f"{cache} holds dataset {spec.name}, not {dataset}")
        source: Path | list[str] = cache
        val = 0.1 if val is None else val
        test = 0.2 if test is None else test
    else:
        spec = _spec_for(dataset)
        source = S.read_case_list(cases_from)
        if not source:
            raise PassionError(f"{cases_from}: no cases found")
        val = 0.0 if val is None else val
        test = 0.0 if test is None else test
    rates = S.parse_missing_rates(missing_rates, spec)
    info = S.make_split(source, out, val=val, test=test, seed=seed, missing_rates=rates, force=force, spec=spec)
    desc = info["train_missing"]
    _warn(info["warnings"])
    if as_json:
        typer.echo(json.dumps({**desc, "out": str(out), "counts": info["counts"], "seed": seed}))
    else:
        c = info["counts"]
        typer.echo(f"wrote {out}: train {c['train']}, val {c['val']}, test {c['test']} cases (seed {seed})")
        _print_human(desc, "training cases")

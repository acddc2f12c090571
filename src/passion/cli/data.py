"""`passion synth` and `passion prepare`: thin wrappers over passion.data."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..utils import PassionError
from . import app


def parse_rates(text: str | None, modalities: tuple[str, ...], what: str = "drop rate") -> dict[str, float]:
    """'flair=0.6,t1ce=0.4' -> {'flair': 0.6, 't1ce': 0.4}, by plain splitting (never eval)."""
    rates: dict[str, float] = {}
    if not text or not text.strip():
        return rates
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise PassionError(f"bad {what} {item.strip()!r}: expected name=value, e.g. flair=0.6")
        if key not in modalities:
            raise PassionError(f"unknown modality {key!r} in {what}s; expected one of {', '.join(modalities)}")
        if key in rates:
            raise PassionError(f"modality {key!r} is given twice in {what}s")
        try:
            rate = float(value.strip())
        except ValueError:
            raise PassionError(f"bad {what} for {key}: {value.strip()!r} is not a number") from None
        if not 0.0 <= rate < 1.0:
            raise PassionError(f"{what} for {key} must be in [0, 1), got {value.strip()}")
        rates[key] = rate
    return rates


def _spec(name: str):
    from ..data.spec import get_spec

    try:
        return get_spec(name)
    except ValueError as exc:
        raise PassionError(str(exc)) from None


@app.command()
def synth(
    out: Path = typer.Argument(..., help="output folder (BraTS layout)"),
    cases: int = typer.Option(20, "--cases", help="number of cases"),
    shape: Optional[tuple[int, int, int]] = typer.Option(
        None, "--shape", help="volume size D H W (myops2020: H W S, slices last); default 96^3 or 256x256x8"),
    seed: int = typer.Option(0, "--seed", help="random seed; the same seed gives the same phantoms"),
    drop_rates: str = typer.Option("", "--drop-rates", help="omit modality files, e.g. flair=0.6,t1ce=0.4"),
    dataset: str = typer.Option("brats2020", "--dataset",
                                help="dataset preset or description file (.yaml/.json: modalities, labels, regions)"),
    layout: str = typer.Option("brats", "--layout", help="brats (<case>/<case>_<suffix>.nii.gz), nnunet (v2 raw) "
                                                          "or msd (4D images); 3D datasets"),
    workers: int = typer.Option(0, "--workers", help="processes (0: all cores)"),
    force: bool = typer.Option(False, "--force", help="write into a non-empty folder"),
) -> None:
    """Synthesise BraTS-like phantoms on real (MNI152) anatomy, or MyoPS-like cardiac phantoms."""
    spec = _spec(dataset)
    extra = {}
    if spec.spatial_dims == 2:
        if layout != "brats":
            raise PassionError(f"--layout {layout}: 2D phantoms are written in the brats layout only")
        from ..data.synthetic_myops import synthesize_dataset
    else:
        from ..data.synthetic import synthesize_dataset

        extra["layout"] = layout
    shape = tuple(shape) if shape else ((256, 256, 8) if spec.spatial_dims == 2 else (96, 96, 96))
    rates = parse_rates(drop_rates, spec.modalities)
    if workers < 0:
        raise PassionError(f"--workers must be 0 (all cores) or more, not {workers}")
    summary = synthesize_dataset(out, cases, shape, seed, rates, spec, workers or None, force, **extra)
    files = sum(sum(c["available"]) + 1 for c in summary["case_info"])
    missing = {m: sum(not c["available"][i] for c in summary["case_info"]) for i, m in enumerate(spec.modalities)}
    typer.echo(f"wrote {cases} cases ({files} NIfTI files) of {'x'.join(map(str, shape))} to {out}")
    if any(missing.values()):
        typer.echo("missing files per modality: " + ", ".join(f"{m} {n}" for m, n in missing.items()))


@app.command()
def prepare(
    raw: Path = typer.Argument(..., help="raw folder: BraTS (RAW/<case>/<case>_<modality>.nii.gz), nnU-Net v2 "
                                         "raw dataset or MSD task (detected from the folder)"),
    cache: Path = typer.Argument(..., help="output cache folder"),
    dataset: Optional[str] = typer.Option(
        None, "--dataset", help="preset or description file (.yaml/.json); default: the preset whose names the "
                                "folder's files or dataset.json fit (brats2020 for BraTS folders), else "
                                "dataset.json's own modalities and labels"),
    workers: int = typer.Option(1, "--workers", help="processes"),
    on_error: str = typer.Option("fail", "--on-error", help="fail: stop at the first bad case; skip: leave it out"),
    min_size: int = typer.Option(128, "--min-size", help="minimum crop size per axis (paper: 128)"),
    crop_size: Optional[int] = typer.Option(
        None, "--crop-size", help="in-plane centre crop of 2D datasets (myops2020: 256, zero-padded if smaller)"),
    spacing: Optional[tuple[float, float, float]] = typer.Option(
        None, "--spacing", help="target voxel spacing X Y Z in mm (default: the dataset's median spacing)"),
    orientation: Optional[str] = typer.Option(
        None, "--orientation", help="target axis codes, e.g. RAS or LPS (default: the most common one)"),
    strict: bool = typer.Option(False, "--strict", help="refuse cases whose modalities lie on different grids "
                                                        "(default: resample onto the first modality's grid)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Resample onto one grid, crop, z-score and cache a raw dataset for training (skips cases already done)."""
    from ..data.preprocess import prepare_dataset

    if on_error not in ("fail", "skip"):
        raise PassionError(f"--on-error must be 'fail' or 'skip', not {on_error!r}")
    if min_size < 1:
        raise PassionError(f"--min-size must be positive, not {min_size}")
    spec = _spec(dataset) if dataset else None
    if crop_size is not None:
        if spec is None or not spec.crop_size:
            raise PassionError("--crop-size applies to centre-cropped datasets (e.g. --dataset myops2020), "
                               f"not {spec.name if spec else 'the default dataset'}")
        if crop_size < 16:
            raise PassionError(f"--crop-size must be at least 16, not {crop_size}")
        from dataclasses import replace

        spec = replace(spec, crop_size=(crop_size,) * len(spec.crop_size))
    summary = prepare_dataset(raw, cache, spec, workers, on_error, min_size, progress=not quiet,
                              spacing=list(spacing) if spacing else None, orientation=orientation, strict=strict)
    grid = summary.get("grid")
    if summary["layout"] != "brats":
        channels = ", ".join(f"{k}->{v}" for k, v in summary["mapping"]["channels"].items())
        typer.echo(f"{summary['layout']} dataset read as {summary['dataset']} (channels {channels})")
    typer.echo(f"{summary['indexed']} of {summary['cases']} cases in {cache} "
               f"({summary['prepared']} prepared, {summary['already_done']} already done, "
               f"{len(summary['failed'])} failed)"
               + (f" at {' x '.join(f'{v:g}' for v in grid['spacing'])} mm, {grid['orientation']}" if grid else ""))

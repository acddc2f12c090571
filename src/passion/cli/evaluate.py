"""`passion evaluate` and `passion predict`: thin wrappers over passion.evaluate / passion.predict."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..utils import PassionError
from . import app


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="Run directory made by `passion train` (or a checkpoint file)."),
    checkpoint: str = typer.Option("last", "--checkpoint", help="last | best | EPOCH | path to a .pt file."),
    split: str = typer.Option("test", "--split", help="Split to evaluate (test, val, train) or a case list .txt."),
    subsets: str = typer.Option("all", "--subsets", help="all, or comma-separated subsets: flair+t1ce,t2,..."),
    overlap: Optional[float] = typer.Option(None, "--overlap", help="Sliding-window overlap (default: config, 0.5)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | bf16 | fp16 (default: config)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, auto (default: config)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default RUN_DIR/eval/<split>)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Use this cache instead of the run's."),
    subset_chunk: Optional[int] = typer.Option(None, "--subset-chunk",
                                               help="Subsets per sliding-window pass (bounds memory)."),
    fuse_batch: Optional[int] = typer.Option(None, "--fuse-batch",
                                             help="Subsets per fusion call (default 5; fewer saves memory, more is faster)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing evaluation."),
    show_progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Dice and HD95 (WT/TC/ET/ETpost) of every case for every modality subset."""
    from ..engine.evaluate import evaluate as run_evaluation
    from ..report.tables import subset_table
    from ..run_dir import RESULTS_FILE, RunDir

    res = run_evaluation(run_dir, checkpoint=checkpoint, split=split, subsets=subsets, overlap=overlap,
                         precision=precision, device=device, out_dir=out, progress=show_progress, cache=cache,
                         subset_chunk=subset_chunk, fuse_batch=fuse_batch, overwrite=overwrite)
    typer.echo(subset_table(res))
    dest = out or RunDir(res["run_dir"]).eval_dir(res["split"])
    typer.echo(f"results: {dest / RESULTS_FILE} (table: results.md, heatmap: heatmap.png, per case: per_case.csv, "
               "slices for the report's overlays: overlay_cases.npz)")


def _parse_modality_files(flair, t1ce, t1, t2, modality: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for name, path in (("flair", flair), ("t1ce", t1ce), ("t1", t1), ("t2", t2)):
        if path is not None:
            files[name] = path
    for item in modality:
        if "=" not in item:
            raise PassionError(f"--modality {item!r}: expected NAME=PATH, e.g. --modality t2f=case_t2f.nii.gz")
        name, path = item.split("=", 1)
        name = name.strip().lower()
        if name in files:
            raise PassionError(f"modality {name} given twice")
        files[name] = Path(path.strip())
    return files


@app.command()
def predict(
    inputs: list[Path] = typer.Argument(None, help="Case folder(s) <case>/<case>_<mod>.nii.gz, or folders of them."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Checkpoint file, or a run directory (last checkpoint)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder: <case>.nii.gz per case."),
    flair: Optional[Path] = typer.Option(None, "--flair", help="FLAIR file of a single case."),
    t1ce: Optional[Path] = typer.Option(None, "--t1ce", help="T1ce file of a single case."),
    t1: Optional[Path] = typer.Option(None, "--t1", help="T1 file of a single case."),
    t2: Optional[Path] = typer.Option(None, "--t2", help="T2 file of a single case."),
    modality: list[str] = typer.Option([], "--modality", help="NAME=PATH for other datasets or aliases, e.g. "
                                                              "t2f=case-t2f.nii.gz (repeatable)."),
    probabilities: bool = typer.Option(False, "--probabilities", help="Also write <case>_probs.nii.gz."),
    overlay: bool = typer.Option(False, "--overlay",
                                 help="Also write <case>.png: three orthogonal slices through the predicted "
                                      "tumour over each available modality."),
    postprocess: bool = typer.Option(False, "--postprocess",
                                     help="Apply the evaluation's post-processing (BraTS: drop a predicted ET "
                                          "under 500 mm^3)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | bf16 | fp16 (default: config)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, auto (default: config)."),
    strict: bool = typer.Option(False, "--strict", help="Refuse a case whose files lie on different grids "
                                                        "(default: resample onto the first modality's grid)."),
    label_convention: Optional[str] = typer.Option(
        None, "--label-convention", help="Write the raw label values of this dataset (e.g. brats2023: "
                                         "enhancing = 3) instead of the model's."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    show_progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Segment new cases with whatever modalities they have (files under the model's names or their
    aliases, e.g. a BraTS 2023 folder for a 2020 model); labels on each input's own grid."""
    from ..engine.predict import predict as run_prediction

    files = _parse_modality_files(flair, t1ce, t1, t2, modality)
    run_prediction(checkpoint, list(inputs or []), output, files=files or None, save_probabilities=probabilities,
                   device=device, precision=precision, overwrite=overwrite, postprocess=postprocess,
                   progress=show_progress, log=typer.echo, overlay=overlay, strict=strict,
                   label_convention=label_convention)

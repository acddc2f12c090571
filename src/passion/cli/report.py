"""`passion report` (compare runs) and `passion demo` (the whole job on phantoms)."""
from __future__ import annotations

from pathlib import Path

import typer

from . import app


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories; the first is the reference for deltas."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for report.md and its figures."),
    split: str = typer.Option("test", "--split", help="Which evaluation of the runs to compare."),
) -> None:
    """Write one markdown report (tables + figures) comparing evaluated runs."""
    from ..report.compare import write_comparison_report

    path = write_comparison_report(run_dirs, out, split=split)
    typer.echo(f"report: {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where the demo writes everything."),
    budget: str = typer.Option("quick", "--budget", help="quick (~10 min on 2 CPU cores) or full (~1 h)."),
    model: str = typer.Option("rfnet", "--model", help="Backbone to train twice (baseline vs PASSION)."),
    seed: int = typer.Option(1037, "--seed"),
    dataset: str = typer.Option("brats2020", "--dataset",
                                help="brats2020 (3D phantoms, mr2468) or myops2020 (2D cardiac phantoms, mr357)."),
) -> None:
    """Synthesise phantoms, prepare, split (mr2468 / mr357), train baseline and PASSION, evaluate, compare."""
    from ..demo import run_demo

    run_demo(out, budget=budget, model=model, seed=seed, log=typer.echo, dataset=dataset)

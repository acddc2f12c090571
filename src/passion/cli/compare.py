"""`passion compare`: several objectives x seeds on one backbone and split -> one comparison report."""
from __future__ import annotations

from pathlib import Path

import typer

from . import app


@app.command()
def compare(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config shared by every run (see configs/)."),
    objectives: str = typer.Option("baseline,passion,ogm_ge,pmr", "--objectives",
                                   help="Comma-separated objective names; the first is the report's reference."),
    seeds: str = typer.Option("1037", "--seeds", help="Comma-separated training seeds, e.g. 1037,1038."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the runs (<objective>_s<seed>), report/ "
                                                      "and summary.json."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key for every run (repeatable)."),
    split: str = typer.Option("test", "--split", help="Split to evaluate and compare on."),
) -> None:
    """Train and evaluate each objective with each seed (resuming unfinished runs), then compare them."""
    from ..engine.compare import run_comparison

    run_comparison(config, objectives, seeds, out, overrides=list(set_), split=split, log=typer.echo)

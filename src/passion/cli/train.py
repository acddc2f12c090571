"""`passion train`: train from a YAML config, or resume a run directory."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from ..config import load_config
from ..run_dir import RunDir
from ..utils import PassionError
from . import app


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (see configs/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set train.lr=1e-4 (repeatable)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory."),
    force: bool = typer.Option(False, "--force", help="Start over in a run directory that already has a run."),
) -> None:
    """Train a backbone with an objective (baseline, passion, ...); writes RUN_DIR."""
    from ..engine.trainer import train as run_training

    if resume is not None:
        if config is not None:
            raise PassionError("give either --config or --resume, not both (a resumed run uses its saved config)")
        saved = RunDir(resume).config
        if not saved.is_file():
            raise PassionError(f"cannot resume: {saved} does not exist")
        cfg = replace(load_config(saved, list(set_)), run_dir=str(resume))  # the run stays where it is
    else:
        if config is None:
            raise PassionError("--config is required (e.g. configs/demo_cpu.yaml), or --resume RUN_DIR")
        cfg = load_config(config, list(set_))
    run_dir = run_training(cfg, resume=resume is not None, force=force)
    typer.echo(f"run directory: {run_dir}")

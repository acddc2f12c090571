"""The `passion` command: a thin layer over the Python API.

Each group of verbs lives in its own module and registers itself on `app`:
data.py (synth, prepare), split.py (split), train.py (train), evaluate.py (evaluate, predict),
report.py (report, demo).
"""
from __future__ import annotations

import importlib
import sys

import typer

from ..utils import PassionError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="PASSION: multi-modal segmentation with missing modalities.")

_COMMAND_MODULES = ("data", "split", "train", "evaluate", "report", "compare")


def _register() -> None:
    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise


def main() -> None:
    _register()
    try:
        app()
    except PassionError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)

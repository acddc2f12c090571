"""Small shared helpers: atomic file writes, progress bars, one-line user errors."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


class PassionError(Exception):
    """An error caused by user input; the CLI prints its message as one line and exits 1."""


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def progress(iterable=None, total: int | None = None, desc: str = "", disable: bool = False, **kw):
    """A tqdm-like progress bar with ETA built on rich; works as an iterable wrapper."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    prog = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
        disable=disable, transient=False, console=Console(stderr=True),
    )
    task = prog.add_task(desc, total=total, status="")

    class _Bar:
        def __iter__(self):
            with prog:
                for item in iterable:
                    yield item
                    prog.advance(task)

        def __enter__(self):
            prog.__enter__()
            return self

        def __exit__(self, *exc):
            return prog.__exit__(*exc)

        def update(self, n: int = 1, status: str | None = None):
            prog.advance(task, n)
            if status is not None:
                prog.update(task, status=status)

        def set_status(self, status: str):
            prog.update(task, status=status)

    return _Bar()

"""Small shared helpers: atomic file writes, progress bars, one-line user errors."""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path


class PassionError(Exception):
    """An error caused by user input; the CLI prints its message as one line and exits 1."""


# read once at import (os.umask can only be read by setting it, which is not thread-safe later)
_UMASK = os.umask(0)
os.umask(_UMASK)


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what a plain open() would
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


def json_safe(obj):
    """NaN (e.g. HD95 not computed) -> None so that results.json is strict JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def read_jsonl(path: str | Path) -> list[dict]:
    """Every complete record of a JSON-lines file ([] when absent); a line cut by a kill is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out

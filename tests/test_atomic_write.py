"""Atomic writes replace a file only on success and leave it readable like a plain write."""
from __future__ import annotations

import os

import pytest

from passion.utils import atomic_write_text


def test_atomic_write_has_the_mode_of_a_plain_write(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = tmp_path / "report.md"
    atomic_write_text(atomic, "x")
    assert os.stat(atomic).st_mode & 0o777 == os.stat(plain).st_mode & 0o777  # mkstemp alone gives 0600


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old")

    class Boom(Exception):
        pass

    def fail(self, text):
        raise Boom

    monkeypatch.setattr(type(target), "write_text", fail)
    with pytest.raises(Boom):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]

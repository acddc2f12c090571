"""Splits: reference figures, generation rules, CSV format and validation, CLI behaviour."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from passion.cli import _register, app
from passion.data import splits as S
from passion.data.cache import write_case, write_index
from passion.data.spec import get_spec
from passion.utils import PassionError

REF = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2020_reference_splits"
needs_ref = pytest.mark.skipif(not REF.is_dir(), reason=f"reference split files not found at {REF}")
MR2468 = "flair=0.6,t1ce=0.4,t1=0.2,t2=0.8"
SPEC = get_spec("brats2020")

_register()
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["split", *args])


def error_text(result) -> str:
    """The one-line user error (main() prints it; the runner hands us the exception)."""
    assert result.exit_code != 0
    assert isinstance(result.exception, PassionError), result.output
    return str(result.exception)


def json_out(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def make_cache(root: Path, n: int = 12, missing: dict[int, list[bool]] | None = None) -> Path:
    """A tiny cache: n cases of 2x3x4 voxels; `missing` overrides some cases' availability."""
    cases = []
    for i in range(n):
        name = f"case_{i:03d}"
        avail = (missing or {}).get(i, [True] * 4)
        image = np.ones((4, 2, 3, 4), np.float32) * np.array(avail, np.float32)[:, None, None, None]
        write_case(root, name, image, np.zeros((2, 3, 4), np.uint8), {"name": name, "available": avail})
        cases.append({"name": name, "available": avail, "shape": [2, 3, 4]})
    write_index(root, SPEC, cases)
    return root


# ------------------------------------------------------------------ acceptance with reference files

@needs_ref
@pytest.mark.parametrize("tag, rates, complete", [
    ("mr2468", {"flair": 58.9, "t1ce": 38.4, "t1": 16.0, "t2": 80.4}, 9),
    ("mr1379", {"flair": 68.9, "t1ce": 28.8, "t1": 8.7, "t2": 89.5}, 4),
    ("mr8852", {"flair": 47.0, "t1ce": 79.9, "t1": 79.0, "t2": 13.2}, 3),
])
def test_show_reference_figures(tag, rates, complete):
    desc = json_out(run("--show", str(REF / f"Brats2020_imb_split_{tag}.csv"), "--json"))
    assert desc["cases"] == 219
    assert {m: round(100 * v, 1) for m, v in desc["missing_rate"].items()} == rates
    assert desc["complete_cases"] == complete
    assert sum(desc["subset_counts"].values()) == 219


@needs_ref
def test_show_human_output_has_percentages():
    result = run("--show", str(REF / "Brats2020_imb_split_mr2468.csv"))
    assert result.exit_code == 0, result.output
    for text in ("58.9", "38.4", "16.0", "80.4", "9 complete", "flair+t1ce+t1+t2"):
        assert text in result.stdout


@needs_ref
def test_reference_csv_round_trips_byte_identical():
    path = REF / "Brats2020_imb_split_mr2468.csv"
    rows = S.read_missing_csv(path)
    assert rows[0].name.startswith("HG_")
    assert S.rows_to_csv_text(rows) == path.read_bytes().decode()


@needs_ref
def test_cases_from_reference_train_list(tmp_path):
    out = tmp_path / "split"
    desc = json_out(run("--cases-from", str(REF / "train.txt"), "--out", str(out), "--missing-rates", MR2468, "--json"))
    assert desc["cases"] == 219
    for mod, ref in {"flair": 90, "t1ce": 135, "t1": 184, "t2": 43}.items():
        assert abs(desc["present"][mod] - ref) <= 3, (mod, desc["present"][mod])
    again = run("--cases-from", str(REF / "train.txt"), "--out", str(out), "--missing-rates", MR2468)
    assert "already exists" in error_text(again) and "--force" in error_text(again)
    forced = json_out(run("--cases-from", str(REF / "train.txt"), "--out", str(out),
                          "--missing-rates", MR2468, "--json", "--force"))
    assert forced["present"] == desc["present"]
    assert S.load_split(out).train == S.read_case_list(REF / "train.txt")


@needs_ref
def test_load_split_of_reference_directory():
    split = S.load_split(REF, table=REF / "Brats2020_imb_split_mr2468.csv")
    assert (len(split.train), len(split.val), len(split.test)) == (219, 50, 100)
    assert split.masks[split.train[0]] == (True, True, True, False)


# ------------------------------------------------------------------ generation rules

def test_pos_mask_ids_are_all_subsets_of_the_mask():
    assert S.pos_mask_ids((True, True, True, False), SPEC) == (1, 2, 3, 5, 6, 9, 10)
    assert S.pos_mask_ids((False, False, True, False), SPEC) == (2,)
    assert S.pos_mask_ids((True,) * 4, SPEC) == tuple(range(15))
    rows = S.imbalanced_missing_split([f"c{i}" for i in range(60)], [0.5, 0.3, 0.2, 0.7], 3, SPEC)
    for r in rows:
        subs = SPEC.subsets()
        assert r.mask == subs[r.mask_id]
        expected = [i for i, s in enumerate(subs) if all(r.mask[m] or not s[m] for m in range(4))]
        assert list(r.pos_mask_ids) == expected


def test_counts_follow_the_formula_and_seed_is_reproducible():
    names = [f"c{i:03d}" for i in range(100)]
    rates = [0.6, 0.4, 0.2, 0.8]
    a = S.imbalanced_missing_split(names, rates, 7, SPEC)
    assert a == S.imbalanced_missing_split(names, rates, 7, SPEC)
    assert a != S.imbalanced_missing_split(names, rates, 8, SPEC)
    counts = S.describe_split(a, SPEC)["subset_counts"]
    nominal = S.subset_counts_nominal(100, rates, SPEC)
    assert all(c >= 1 for c in nominal)
    for sub, k in zip(SPEC.subsets(), nominal):
        assert counts[SPEC.subset_name(sub)] >= k  # the remainder only adds cases
    assert sum(counts.values()) == 100


def test_train_val_test_split_is_disjoint_and_seeded():
    names = [f"c{i}" for i in range(50)]
    tr, va, te = S.train_val_test_split(names, 0.1, 0.2, 1037)
    assert (len(tr), len(va), len(te)) == (35, 5, 10)
    assert set(tr) | set(va) | set(te) == set(names) and not (set(tr) & set(va) or set(tr) & set(te))
    assert S.train_val_test_split(names, 0.1, 0.2, 1037) == (tr, va, te)
    with pytest.raises(PassionError):
        S.train_val_test_split(names, 0.5, 0.5, 1)


def test_genuinely_missing_modalities_stay_missing():
    names = [f"c{i}" for i in range(40)]
    genuine = {n: [True, True, True, True] for n in names}
    genuine["c0"] = [False, True, False, False]  # only t1ce exists
    genuine["c1"] = [True, False, True, True]
    rows = {r.name: r for r in S.imbalanced_missing_split(names, [0.5, 0.5, 0.5, 0.5], 1, SPEC, genuine)}
    assert rows["c0"].mask == (False, True, False, False)
    assert not rows["c1"].mask[1]


def test_make_split_from_cache(tmp_path):
    cache = make_cache(tmp_path / "cache", n=30, missing={0: [True, False, True, True]})
    out = tmp_path / "split"
    info = S.make_split(cache, out, val=0.1, test=0.2, seed=5, missing_rates=[0.6, 0.4, 0.2, 0.8])
    for f in S.SPLIT_FILES:
        assert (out / f).is_file()
    split = S.load_split(out)
    assert len(split.train) == info["counts"]["train"] == 21
    assert set(split.masks) == set(split.train)
    if "case_000" in split.masks:
        assert not split.masks["case_000"][1]
    saved = json.loads((out / "split.json").read_text())
    assert saved["seed"] == 5 and saved["nominal_missing_rate"]["t2"] == 0.8
    assert saved["train_missing"]["cases"] == 21
    again = S.make_split(cache, tmp_path / "split2", val=0.1, test=0.2, seed=5, missing_rates=[0.6, 0.4, 0.2, 0.8])
    assert (tmp_path / "split2" / "train_missing.csv").read_bytes() == (out / "train_missing.csv").read_bytes()
    assert again["train_missing"] == info["train_missing"]


def test_cli_from_cache_and_refuses_overwrite(tmp_path):
    cache = make_cache(tmp_path / "cache", n=20)
    out = tmp_path / "split"
    desc = json_out(run(str(cache), "--out", str(out), "--missing-rates", MR2468, "--json"))
    assert desc["cases"] == 14 and desc["counts"] == {"train": 14, "val": 2, "test": 4}
    before = (out / "train_missing.csv").read_bytes()
    again = run(str(cache), "--out", str(out), "--missing-rates", MR2468, "--seed", "9")
    assert "train.txt" in error_text(again)
    assert (out / "train_missing.csv").read_bytes() == before
    human = run(str(cache), "--out", str(out), "--missing-rates", MR2468, "--force")
    assert human.exit_code == 0 and "realised missing %" in human.stdout


# ------------------------------------------------------------------ bad input

def test_modality_present_in_no_training_case(tmp_path):
    cache = make_cache(tmp_path / "cache", n=6, missing={i: [True, True, True, False] for i in range(6)})
    with pytest.raises(PassionError, match="t2 is present in no training case"):
        S.make_split(cache, tmp_path / "out", val=0.0, test=0.0, seed=1, missing_rates=[0.5] * 4)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["flair=1.0", "t2=-0.1", "t1=nan", "flair=0.5,flair=0.2", "dwi=0.1",
                                  "flair:0.5", "t1=abc"])
def test_bad_missing_rates(text):
    with pytest.raises(PassionError):
        S.parse_missing_rates(text, SPEC)


def test_cli_bad_rate_is_one_line_error(tmp_path):
    lst = tmp_path / "cases.txt"
    lst.write_text("".join(f"c{i}\n" for i in range(20)))
    result = run("--cases-from", str(lst), "--out", str(tmp_path / "o"), "--missing-rates", "t2=1")
    assert "[0, 1)" in error_text(result)
    assert not (tmp_path / "o").exists()


GOOD = 'data_name,mask_id,mask,pos_mask_ids\r\na,2,"[False, False, True, False]",[2]\r\n'


@pytest.mark.parametrize("body, line", [
    ('data_name,mask_id,mask\r\n', 1),
    (GOOD + 'b,2,"[False, False, True]",[2]\r\n', 3),
    (GOOD + 'b,3,"[False, False, True, False]",[2]\r\n', 3),
    (GOOD + 'b,2,"[False, False, True, False]",[1]\r\n', 3),
    (GOOD + 'b,2,"[False, False, __import__, False]",[2]\r\n', 3),
    (GOOD + 'b,x,"[False, False, True, False]",[2]\r\n', 3),
    (GOOD + 'b,2,"[False, False, True, False]","[2, True]"\r\n', 3),
    (GOOD + 'b,0,"[False, False, False, False]",[]\r\n', 3),
    (GOOD + 'a,2,"[False, False, True, False]",[2]\r\n', 3),
    (GOOD + 'b,2,"[False, False, True, False]"\r\n', 3),
])
def test_malformed_csv_names_file_and_line(tmp_path, body, line):
    path = tmp_path / "bad.csv"
    path.write_bytes(body.encode())
    with pytest.raises(PassionError, match=rf"bad\.csv:{line}:"):
        S.read_missing_csv(path)
    result = run("--show", str(path))
    assert f"bad.csv:{line}" in error_text(result)


def test_written_csv_matches_reference_quoting(tmp_path):
    rows = [S.make_row("HG_x", (False, False, True, False), SPEC), S.make_row("LG_y", (True, True, True, False), SPEC)]
    S.write_missing_csv(tmp_path / "t.csv", rows)
    assert (tmp_path / "t.csv").read_bytes() == (
        b'data_name,mask_id,mask,pos_mask_ids\r\nHG_x,2,"[False, False, True, False]",[2]\r\n'
        b'LG_y,10,"[True, True, True, False]","[1, 2, 3, 5, 6, 9, 10]"\r\n')
    assert S.read_missing_csv(tmp_path / "t.csv") == rows


def test_console_script_prints_one_line_error(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "bad.csv"
    path.write_bytes((GOOD + 'b,2,"[False, False, eval, False]",[2]\r\n').encode())
    proc = subprocess.run([sys.executable, "-m", "passion", "split", "--show", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.csv:3:" in lines[0]

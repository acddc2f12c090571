"""The availability rule (data/availability.py): a case's mask under idt / idt_drop / pdt, and n[m]."""
from __future__ import annotations

import numpy as np
import pytest

from passion.data import availability as A
from passion.data.cache import write_case, write_index
from passion.data.datasets import TrainDataset
from passion.data.spec import get_spec
from passion.utils import PassionError

SPEC = get_spec("brats2020")  # flair, t1ce, t1, t2
FULL = (True, True, True, True)
NO_T1CE = (True, False, True, True)
GENUINE = {"a": FULL, "b": NO_T1CE, "c": FULL}
TABLE = {"a": (True, True, False, False), "b": (False, True, True, False), "c": (False, False, False, True)}


def resolve(setting, table=TABLE, genuine=GENUINE):
    return A.training_availability(genuine, list(genuine), table, setting, SPEC.modalities)


def test_idt_is_the_table_and_the_files():
    got = resolve("idt")
    # b's table claims t1ce, whose file is genuinely missing: only t1 is left
    assert got.masks == ((True, True, False, False), (False, False, True, False), (False, False, False, True))
    assert got.counts() == [1, 1, 1, 1]
    assert got.names == ("a", "b", "c") and got.setting == "idt"
    # a table given as rows in the order of the names means the same
    assert resolve("idt", table=[TABLE[n] for n in GENUINE]).masks == got.masks


def test_idt_drop_draws_among_the_subsets_of_the_fixed_mask():
    got = resolve("idt_drop")
    assert got.masks == resolve("idt").masks and got.counts() == [1, 1, 1, 1]
    choices = A.drop_choices((True, True, False, False), SPEC)
    assert set(choices) == {(True, False, False, False), (False, True, False, False), (True, True, False, False)}
    assert choices == sorted(choices, key=SPEC.subset_id)  # the reference order
    assert A.drop_choices((False, False, False, True), SPEC) == [(False, False, False, True)]
    assert len(A.drop_choices(FULL, SPEC)) == 15


def test_pdt_ignores_the_table_and_counts_every_case():
    complete = {"a": FULL, "c": FULL}
    got = resolve("pdt", genuine=complete)
    assert got.masks == (FULL, FULL)
    assert got.counts() == [2, 2, 2, 2]
    # pdt: every case has every modality, whatever rows are counted
    assert A.availability_counts([(True, False, False, False)] * 3, setting="pdt") == [3, 3, 3, 3]
    with pytest.raises(PassionError, match=r"pdt trains on complete cases, but 'b' \(1 cases in all\)"):
        resolve("pdt")


def test_genuinely_missing_modality_never_becomes_present():
    # drawing a split: the draw is limited to the files, and a draw sharing nothing with them keeps the files
    assert A.respect_genuine(FULL, NO_T1CE) == NO_T1CE
    assert A.respect_genuine((False, True, False, False), NO_T1CE) == NO_T1CE
    # reading a split: the table AND the files; no table means whatever files exist
    assert A.effective_mask((False, True, True, False), NO_T1CE, "b") == (False, False, True, False)
    assert A.effective_mask(None, NO_T1CE, "b") == NO_T1CE
    index = {"cases": [{"name": "x", "available": [1, 0, 1, 1]}, {"name": "y"}]}
    assert A.genuine_availability(index, 4) == {"x": NO_T1CE, "y": FULL}


def test_a_modality_in_no_case_is_an_error():
    rows = [(True, True, True, False)] * 3
    assert A.availability_counts(rows) == [3, 3, 3, 0]
    with pytest.raises(PassionError, match="modality t2 is present in no training case; cannot weight"):
        A.availability_counts(rows, require_all=True, modalities=SPEC.modalities)
    with pytest.raises(PassionError, match="modality 't2' is present in no training case of S$"):
        A.require_every_modality([3, 3, 3, 0], SPEC.modalities, " of S", quote=True)
    A.require_every_modality([1, 1, 1, 1], SPEC.modalities)  # nothing absent: no error


def test_an_empty_effective_mask_is_a_one_line_error_naming_the_case():
    with pytest.raises(PassionError) as err:
        A.effective_mask((False, True, False, False), NO_T1CE, "b")
    text = str(err.value)
    assert "\n" not in text and "'b'" in text and "no modality that exists in the cache" in text
    with pytest.raises(PassionError, match="'b'"):
        resolve("idt", table={**TABLE, "b": (False, True, False, False)})
    with pytest.raises(PassionError, match="'z' has no modality file"):
        A.effective_mask(None, (False,) * 4, "z")
    with pytest.raises(PassionError, match="unknown training setting 'sometimes'"):
        resolve("sometimes")


def test_the_dataset_uses_a_resolved_availability_as_given(tmp_path, monkeypatch):
    shape = (6, 6, 6)
    rng = np.random.default_rng(0)
    for name, avail in GENUINE.items():
        image = rng.normal(size=(4, *shape)).astype(np.float32) + 2.0
        image[~np.array(avail)] = 0.0
        write_case(tmp_path, name, image, rng.integers(0, 4, size=shape).astype(np.uint8),
                   {"name": name, "available": list(avail)})
    write_index(tmp_path, SPEC, [{"name": n, "available": list(a), "shape": list(shape)} for n, a in GENUINE.items()])
    direct = TrainDataset(tmp_path, list(GENUINE), TABLE, "idt", (4, 4, 4), augment=False, spec=SPEC)
    resolved = resolve("idt")
    assert tuple(direct.masks) == resolved.masks and direct.availability_counts() == resolved.counts()
    # given a resolved availability, the dataset does not read the cache's availability again
    monkeypatch.setattr("passion.data.datasets.cache_availability", lambda *a: pytest.fail("index re-read"))
    ds = TrainDataset(tmp_path, list(GENUINE), resolved, "idt", (4, 4, 4), augment=False, spec=SPEC)
    assert tuple(ds.masks) == resolved.masks
    assert tuple(ds[1]["mask"].tolist()) == (False, False, True, False)
    with pytest.raises(PassionError, match="availability given is for idt"):
        TrainDataset(tmp_path, list(GENUINE), resolved, "idt_drop", (4, 4, 4), spec=SPEC)
    # an edited table that leaves a case nothing fails at construction, naming the case
    monkeypatch.undo()
    with pytest.raises(PassionError, match="'b'.*no modality that exists"):
        TrainDataset(tmp_path, list(GENUINE), {**TABLE, "b": (False, True, False, False)}, "idt", (4, 4, 4),
                     spec=SPEC)

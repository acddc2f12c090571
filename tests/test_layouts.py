"""Raw layouts: the same phantoms written as BraTS 2020, BraTS 2023, nnU-Net v2 and MSD prepare into the same
cache; dataset.json names map onto presets or define the dataset; bad input is one line and leaves nothing."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from passion.cli import _register, app
from passion.data import layouts
from passion.data.cache import read_index, read_spec
from passion.data.nifti import write_label_map, write_nifti
from passion.data.preprocess import prepare_dataset
from passion.data.spec import get_spec
from passion.data.synthetic import synthesize_dataset
from passion.utils import PassionError

_register()
runner = CliRunner()
LAYOUTS = [("brats", "brats2020"), ("brats", "brats2023"), ("nnunet", "brats2020"), ("msd", "brats2020")]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Two 32^3 phantoms (seed 3; T1ce missing in one) in each layout."""
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for layout, dataset in LAYOUTS:
        spec = get_spec(dataset)
        raw = root / f"{layout}_{dataset}"
        synthesize_dataset(raw, 2, (32, 32, 32), 3, {spec.modalities[1]: 0.5}, spec, workers=1,
                           progress_bar=False, layout=layout)
        out[(layout, dataset)] = raw
    return out


def _cache_summary(cache: Path) -> dict:
    index = read_index(cache)
    summary = {}
    for case in index["cases"]:
        d = cache / "cases" / case["name"]
        summary[case["name"]] = (case["available"], np.bincount(np.load(d / "label.npy").ravel(), minlength=4).tolist(),
                                 np.load(d / "image.npy"))
    return summary


def test_every_layout_prepares_into_the_same_cache(written, tmp_path):
    """Same cases, availability, class voxel counts and images whatever the layout (MSD's labels 1 edema,
    2 non-enhancing, 3 enhancing and its channel order FLAIR, T1w, t1gd, T2w are mapped, not copied)."""
    caches = {}
    for (layout, dataset), raw in written.items():
        cache = tmp_path / f"{layout}_{dataset}"
        if layout == "brats":
            summary = prepare_dataset(raw, cache, None, min_size=32, progress=False)
        else:  # the CLI contract: no extra flag for nnU-Net and MSD folders
            result = runner.invoke(app, ["prepare", str(raw), str(cache), "--min-size", "32", "--quiet"])
            assert result.exit_code == 0, result.output
            assert f"{layout} dataset read as brats2020" in result.output
            summary = {"layout": read_index(cache)["layout"]}
        assert summary["layout"] == layout
        assert read_spec(cache).name == dataset
        caches[(layout, dataset)] = _cache_summary(cache)
    ref = caches[("brats", "brats2020")]
    assert sorted(ref) == ["Synth_0001", "Synth_0002"]
    assert any(not avail[1] for avail, _, _ in ref.values())  # a genuinely missing T1ce survives every layout
    assert all(counts[1] and counts[2] for _, counts, _ in ref.values())
    for key, other in caches.items():
        assert sorted(other) == sorted(ref), key
        for name in ref:
            assert other[name][0] == ref[name][0], (key, name)
            assert other[name][1] == ref[name][1], (key, name)
            np.testing.assert_array_equal(other[name][2], ref[name][2])


def test_msd_regions_mean_what_they_mean_in_brats(written):
    raw = layouts.open_raw(written[("msd", "brats2020")])
    assert raw.layout == "msd" and raw.spec.name == "brats2020"
    assert raw.mapping["labels"] == {0: "background", 1: "edema", 2: "necrotic_core", 3: "enhancing"}
    assert raw.mapping["channels"] == {"FLAIR": "flair", "T1w": "t1", "t1gd": "t1ce", "T2w": "t2"}
    assert raw.cases[0].label_values == {0: 0, 1: 2, 2: 1, 3: 4}  # file value -> BraTS 2020 value


def test_nnunet_images_ts_become_predict_inputs(written, tmp_path):
    src = written[("nnunet", "brats2020")]
    ts = tmp_path / "ds" / "imagesTs"
    ts.mkdir(parents=True)
    (tmp_path / "ds" / "dataset.json").write_text((src / "dataset.json").read_text())
    for p in (src / "imagesTr").iterdir():
        (ts / p.name).write_bytes(p.read_bytes())
    inputs = layouts.nnunet_test_inputs(tmp_path / "ds", get_spec("brats2020"))
    assert sorted(inputs) == ["Synth_0001", "Synth_0002"]
    assert inputs["Synth_0002"] == {"t1": ts / "Synth_0002_0000.nii.gz", "t1ce": ts / "Synth_0002_0001.nii.gz",
                                    "t2": ts / "Synth_0002_0002.nii.gz", "flair": ts / "Synth_0002_0003.nii.gz"}
    assert "t1ce" not in inputs["Synth_0001"]  # its T1ce file is missing
    # a brats2023 model gets the same files under its own modality names
    assert set(layouts.nnunet_test_inputs(ts, get_spec("brats2023"))["Synth_0002"]) == {"t2f", "t1c", "t1n", "t2w"}
    # `passion predict` takes the imagesTs folder itself and names outputs after the cases
    from oracle import oracle_checkpoint

    ckpt = oracle_checkpoint(tmp_path, get_spec("brats2020"), [32, 32, 32])
    result = runner.invoke(app, ["predict", "--checkpoint", str(ckpt), "--output", str(tmp_path / "pred"),
                                 "--no-progress", str(ts)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["Synth_0001.nii.gz", "Synth_0002.nii.gz"]
    assert nib.load(str(tmp_path / "pred" / "Synth_0001.nii.gz")).shape == (32, 32, 32)


# ---------------------------------------------------------------------------- hand-made tiny datasets

def _nnunet(root: Path, channels=("CT", "PET"), labels=None, cases=("a", "b"), label_values=(0, 1, 2),
            ending=".nii.gz", meta_extra=None) -> Path:
    """An nnU-Net v2 raw dataset of 8^3 volumes whose label maps hold `label_values`."""
    labels = labels or {"background": 0, "organ": 1, "lesion": 2}
    for name in cases:
        for c in range(len(channels)):
            write_nifti(root / "imagesTr" / f"{name}_{c:04d}{ending}", np.random.default_rng(c).random((8, 8, 8)) + 1,
                        np.eye(4), dtype=np.float32)
        seg = np.zeros((8, 8, 8), np.uint8)
        for i, v in enumerate(label_values):
            seg[i, :4, :4] = v
        write_label_map(root / "labelsTr" / f"{name}{ending}", seg, np.eye(4))
    meta = {"channel_names": {str(i): n for i, n in enumerate(channels)}, "labels": labels,
            "numTraining": len(cases), "file_ending": ending, **(meta_extra or {})}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_nnunet_dataset_defines_its_own_modalities_labels_and_regions(tmp_path):
    raw = _nnunet(tmp_path / "raw")
    prepare_dataset(raw, tmp_path / "cache", None, min_size=8, progress=False)
    spec = read_spec(tmp_path / "cache")
    assert spec.modalities == ("ct", "pet") and spec.class_names == ("background", "organ", "lesion")
    assert spec.regions == {"organ": (1,), "lesion": (2,)}
    assert np.bincount(np.load(tmp_path / "cache" / "cases" / "a" / "label.npy").ravel()).tolist() == [480, 16, 16]


def test_nnunet_region_labels_become_regions_of_several_classes(tmp_path):
    labels = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
    raw = _nnunet(tmp_path / "raw", channels=("A", "B"), labels=labels, label_values=(0, 1, 2, 3))
    spec = layouts.open_raw(raw).spec
    assert spec.class_names == ("background", "label_1", "label_2", "enhancing tumor")
    assert spec.regions == {"whole tumor": (1, 2, 3), "tumor core": (2, 3), "enhancing tumor": (3,)}


def test_nnunet_region_based_brats_labels_map_onto_brats_classes(tmp_path):
    """nnU-Net's own BraTS conversion: channels T1, T1ce, T2, Flair; labels 1 edema, 2 necrosis, 3 enhancing
    given as regions; each value is the BraTS class lying in exactly the same regions."""
    labels = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
    raw = _nnunet(tmp_path / "raw", channels=("T1", "T1ce", "T2", "Flair"), labels=labels, label_values=(0, 1, 2, 3))
    opened = layouts.open_raw(raw)
    assert opened.spec.name == "brats2020"
    assert opened.mapping["labels"] == {0: "background", 1: "edema", 2: "necrotic_core", 3: "enhancing"}
    prepare_dataset(raw, tmp_path / "cache", None, min_size=8, progress=False)
    label = np.load(tmp_path / "cache" / "cases" / "a" / "label.npy")
    assert [int((label == c).sum()) for c in range(4)] == [464, 16, 16, 16]  # necrosis row 2 -> class 1, ...
    assert (label[1, :4, :4] == 2).all() and (label[2, :4, :4] == 1).all() and (label[3, :4, :4] == 3).all()


def _fails(raw: Path, cache: Path, *args: str) -> str:
    result = runner.invoke(app, ["prepare", str(raw), str(cache), "--min-size", "8", "--quiet", *args])
    assert result.exit_code != 0
    assert isinstance(result.exception, PassionError), result.output
    message = str(result.exception)
    assert "\n" not in message
    assert not (cache / "dataset.json").exists()
    assert not (cache / "cases").exists() or not any((cache / "cases").iterdir())
    return message


def test_dataset_json_contradicting_the_files(tmp_path):
    raw = _nnunet(tmp_path / "n1", meta_extra={"numTraining": 3})
    assert "numTraining is 3 but the folder holds 2" in _fails(raw, tmp_path / "c1")
    raw = _nnunet(tmp_path / "n2", meta_extra={"file_ending": ".nii"})
    assert "file_ending is .nii but imagesTr holds" in _fails(raw, tmp_path / "c2")
    raw = _nnunet(tmp_path / "n3")
    write_nifti(raw / "imagesTr" / "a_0002.nii.gz", np.ones((8, 8, 8)), np.eye(4))
    assert "lists 2 channels but" in _fails(raw, tmp_path / "c3") and "a_0002" in _fails(raw, tmp_path / "c3")
    raw = _nnunet(tmp_path / "n4")
    write_label_map(raw / "labelsTr" / "zz.nii.gz", np.zeros((8, 8, 8)), np.eye(4))
    assert "zz.nii.gz: a label without any image" in _fails(raw, tmp_path / "c4")
    raw = _nnunet(tmp_path / "n5", channels=("FLAIR", "T1", "T2", "T1ce"))
    assert "label 'organ' is not a class of brats2020" in _fails(raw, tmp_path / "c5", "--dataset", "brats2020")


def test_unknown_label_values_name_the_file(tmp_path):
    raw = _nnunet(tmp_path / "raw", cases=("a",), label_values=(0, 1, 7))
    message = _fails(raw, tmp_path / "cache")
    assert "a.nii.gz" in message and "label value(s) 7 are not in dataset.json's labels" in message


def _msd(root: Path, channels: int, modalities=("FLAIR", "T1w", "t1gd", "T2w"), listed=("c1",)) -> Path:
    write_nifti(root / "imagesTr" / "c1.nii.gz", np.ones((8, 8, 8, channels)), np.eye(4), dtype=np.float32)
    write_label_map(root / "labelsTr" / "c1.nii.gz", np.zeros((8, 8, 8), np.uint8), np.eye(4))
    meta = {"modality": {str(i): m for i, m in enumerate(modalities)},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "numTraining": len(listed),
            "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in listed]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_4d_image_with_the_wrong_channel_count(tmp_path):
    message = _fails(_msd(tmp_path / "raw", channels=3), tmp_path / "cache")
    assert "c1.nii.gz: 3 channels, but dataset.json lists 4 modalities" in message
    message = _fails(_msd(tmp_path / "raw2", channels=4, listed=("c1", "c2")), tmp_path / "cache2")
    assert "lists image ./imagesTr/c2.nii.gz, which does not exist" in message


def test_brats_layout_preset_guessed_from_the_file_suffixes(written, tmp_path):
    from passion.data.synthetic_myops import synthesize_dataset as synth_myops

    assert layouts.open_raw(written[("brats", "brats2023")]).spec.name == "brats2023"
    assert layouts.open_raw(written[("brats", "brats2020")]).spec.name == "brats2020"
    synth_myops(tmp_path / "myops", cases=1, shape=(32, 32, 3), seed=1, workers=1, progress_bar=False)
    assert layouts.open_raw(tmp_path / "myops").spec.name == "myops2020"  # flat <case>_C0.nii.gz files

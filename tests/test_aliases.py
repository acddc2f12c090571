"""Modality aliases at prediction time: a brats2020 model segments a BraTS 2023 folder and a brats2023
model a 2020 folder; predict says which file fed which input; --label-convention picks the raw labels."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from passion.data.nifti import find_case_files
from passion.data.spec import get_spec
from passion.engine.predict import predict
from passion.utils import PassionError

from geometry_helpers import checkpoint, grid_affine, phantom, write_case
from oracle import ORACLE

SHAPE, AFFINE = (20, 20, 16), grid_affine((2.0, 2.0, 2.0))
B20, B23 = get_spec("brats2020"), get_spec("brats2023")


pytestmark = pytest.mark.usefixtures("one_thread")


def _folder(root, release: str):
    """The phantom as a BraTS 2020 (<case>_flair, _t2) or 2023 (<case>-t2f, -t2w) case folder."""
    volumes, structure = phantom(SHAPE, AFFINE)
    if release == "2023":
        case = write_case(root, "BraTS-GLI-00001-000", {"t2f": volumes["flair"], "t2w": volumes["t2"]}, AFFINE,
                          sep="-")
    else:
        case = write_case(root, "BraTS20_001", volumes, AFFINE)
    return case, structure


@pytest.mark.parametrize("model_spec, release, enhancing", [(B20, "2023", 4), (B23, "2020", 3)])
def test_a_model_segments_the_other_release_and_says_which_file_fed_which_input(
        tmp_path, model_spec, release, enhancing):
    ckpt = checkpoint(tmp_path, ORACLE, spacing=[2.0, 2.0, 2.0], orientation="RAS", spec=model_spec)
    case, structure = _folder(tmp_path / "raw", release)
    said = []
    out = predict(ckpt, [case], output_dir=tmp_path / "out", progress=False, log=said.append)
    assert out == [tmp_path / "out" / f"{case.name}.nii.gz"]
    np.testing.assert_array_equal(np.asarray(nib.load(str(out[0])).dataobj), np.where(structure, enhancing, 0))
    line = next(m for m in said if m.startswith(case.name))
    first, second = model_spec.modalities[0], model_spec.modalities[3]
    suffix = {"2023": ("-t2f", "-t2w"), "2020": ("_flair", "_t2")}[release]
    assert f"{first} <- {case.name}{suffix[0]}.nii.gz" in line and f"{second} <- {case.name}{suffix[1]}.nii.gz" in line
    assert "missing: " in line


def test_label_convention_writes_the_other_release_values(tmp_path):
    ckpt = checkpoint(tmp_path, ORACLE, spacing=[2.0, 2.0, 2.0], orientation="RAS", spec=B20)
    case, structure = _folder(tmp_path / "raw", "2023")
    out = predict(ckpt, [case], output_dir=tmp_path / "out", progress=False, log=None, label_convention="brats2023")
    np.testing.assert_array_equal(np.asarray(nib.load(str(out[0])).dataobj), np.where(structure, 3, 0))
    with pytest.raises(PassionError, match="label-convention myops2020: it has no class 'necrotic_core'"):
        predict(ckpt, [case], output_dir=tmp_path / "out2", progress=False, log=None, label_convention="myops2020")
    assert not (tmp_path / "out2").exists()


def test_alias_files_by_name_and_on_the_command_line(tmp_path):
    case, structure = _folder(tmp_path / "raw", "2023")
    found = find_case_files(case, B20, aliases=True)
    assert {m: p.name for m, p in found.modalities.items()} == {
        "flair": f"{case.name}-t2f.nii.gz", "t2": f"{case.name}-t2w.nii.gz"}
    assert not find_case_files(case, B20).modalities  # prepare keeps to the spec's own names
    ckpt = checkpoint(tmp_path, ORACLE, spacing=[2.0, 2.0, 2.0], orientation="RAS", spec=B20)
    from passion import cli

    cli._register()
    res = CliRunner().invoke(cli.app, ["predict", "--checkpoint", str(ckpt), "--output", str(tmp_path / "out"),
                                       "--modality", f"t2f={case / (case.name + '-t2f.nii.gz')}",
                                       "--label-convention", "brats2023", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"flair <- {case.name}-t2f.nii.gz" in res.output
    out = tmp_path / "out" / f"{case.name}.nii.gz"  # the case name comes from the alias-named file
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), np.where(structure, 3, 0))

"""Modalities of one case on different grids: resampled onto the first available modality's grid (in
spec order) with one line, or refused under strict, in prepare and in predict."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from passion.data import cache as cache_mod
from passion.data.preprocess import prepare_dataset
from passion.engine.predict import predict
from passion.utils import PassionError

from geometry_helpers import BRATS, checkpoint, grid_affine, phantom, write_case
from oracle import ORACLE

SHAPE, AFFINE = (20, 20, 16), grid_affine((2.0, 2.0, 2.0))
COARSE_SHAPE, COARSE = (10, 10, 8), grid_affine((4.0, 4.0, 4.0), origin=(1.0, 1.0, 1.0))  # same field of view


pytestmark = pytest.mark.usefixtures("one_thread")


def _mixed_case(root):
    """flair (first in spec order) at 2 mm; t2 and the label at 4 mm over the same field of view."""
    volumes, structure = phantom(SHAPE, AFFINE)
    coarse, coarse_structure = phantom(COARSE_SHAPE, COARSE)
    case = write_case(root, "mixed", {"flair": volumes["flair"]}, AFFINE)
    write_case(root, "mixed", {"t2": coarse["t2"]}, COARSE)
    nib.save(nib.Nifti1Image(np.where(coarse_structure, 4, 0).astype(np.uint8), COARSE), str(case / "mixed_seg.nii.gz"))
    return case, structure


def test_prepare_resamples_other_grids_onto_the_first_modality(tmp_path, capsys):
    case, structure = _mixed_case(tmp_path / "raw")
    prepare_dataset(tmp_path / "raw", tmp_path / "cache", BRATS, min_size=8, progress=False)
    err = capsys.readouterr().err
    assert "mixed_t2.nii.gz is on another grid than mixed_flair.nii.gz" in err
    assert "mixed_seg.nii.gz is on another grid" in err
    cached = cache_mod.read_case(tmp_path / "cache", "mixed")
    assert cached.meta["grid_shape"] == list(SHAPE) and np.allclose(cached.meta["spacing"], 2.0)
    # the 4 mm label, nearest-neighbour onto 2 mm, still covers the L's interior
    assert cached.label.max() == 3 and (cached.label == 3).sum() >= 0.5 * structure.sum()
    with pytest.raises(PassionError, match="mixed_t2.nii.gz has shape"):
        prepare_dataset(tmp_path / "raw", tmp_path / "cache_strict", BRATS, min_size=8, progress=False, strict=True)
    assert not (tmp_path / "cache_strict" / "cases" / "mixed").exists()


def test_predict_resamples_other_grids_onto_the_first_modality(tmp_path):
    case, structure = _mixed_case(tmp_path / "raw")
    ckpt = checkpoint(tmp_path, ORACLE, spacing=[2.0, 2.0, 2.0], orientation="RAS")
    said = []
    out = predict(ckpt, [case], output_dir=tmp_path / "out", progress=False, log=said.append)
    assert any("mixed_t2.nii.gz is on another grid" in m for m in said)
    img = nib.load(str(out[0]))
    assert img.shape == SHAPE and np.allclose(img.affine, AFFINE)  # flair's grid
    et = np.asarray(img.dataobj) == 4  # the oracle takes the max over flair and the blockier 4 mm t2
    assert et[structure].all() and not et[~ndimage.binary_dilation(structure, iterations=2)].any()
    with pytest.raises(PassionError, match="has shape"):
        predict(ckpt, [case], output_dir=tmp_path / "out_strict", progress=False, log=None, strict=True)
    assert not (tmp_path / "out_strict").exists()

"""`predict` puts a structure back at the voxels where it was, through crop, padding and z-score,
in 3D and 2D; post-processing removes a small ET by its volume in mm^3."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from passion.data.cache import write_index
from passion.data.spec import DatasetSpec, get_spec
from passion.engine.predict import predict

from geometry_helpers import write_case
from oracle import oracle_checkpoint

BRATS = get_spec("brats2020")
AFFINE = np.array([[-1.0, 0, 0, 90.0], [0, -1.2, 0, 120.0], [0, 0, 1.5, -70.0], [0, 0, 0, 1]])


def _checkpoint(root, spec, patch, min_size=16):
    cache = root / "cache"
    write_index(cache, spec, [], {"min_size": min_size})  # predict crops like the training cache
    return oracle_checkpoint(root, spec, patch, cache)


def _write(root, name, volumes: dict, affine):
    """{modality suffix: array} -> {modality suffix: path} of NIfTI files."""
    case = write_case(root, name, volumes, affine)
    return {suffix: case / f"{name}_{suffix}.nii.gz" for suffix in volumes}


def _case(shape, brain, structure):
    """A uniform brain (100) with a bright structure (300): z-scored, only the structure is above 0.5."""
    flair = np.zeros(shape, np.float32)
    flair[brain] = 100.0
    flair[structure] = 300.0
    t2 = np.zeros(shape, np.float32)
    t2[brain] = 100.0  # constant: z-scores to 0
    return flair, t2


def _predicted(tmp_path, ckpt, files, **kw):
    out = predict(ckpt, files=files, output_dir=tmp_path / "out", progress=False, log=None, overwrite=True, **kw)
    img = nib.load(str(out[0]))
    return img, np.asarray(img.dataobj)


def _l_shape(mask, a, b, c):
    """An asymmetric L (a flip or transpose of the output would move it): known voxels."""
    mask[a:a + 4, b:b + 8, c:c + 3] = True
    mask[a:a + 2, b:b + 2, c + 3:c + 9] = True
    return mask


@pytest.mark.parametrize("shape, brain, patch", [
    # cropped: the brain's box (28x22x22) is cut out of 40x36x30 and put back
    ((40, 36, 30), np.s_[5:33, 8:30, 4:26], [16, 16, 16]),
    # padded: axis 1 (14 voxels) is shorter than the window, which pads it
    ((20, 14, 24), np.s_[2:18, 1:13, 3:21], [16, 16, 16]),
])
def test_a_structure_comes_back_at_its_voxels_in_3d(tmp_path, shape, brain, patch):
    structure = _l_shape(np.zeros(shape, bool), 4 + brain[0].start, 2 + brain[1].start, 2 + brain[2].start)
    flair, t2 = _case(shape, brain, structure)
    files = _write(tmp_path / "raw", "geo", {"flair": flair, "t2": t2}, AFFINE)
    img, labels = _predicted(tmp_path, _checkpoint(tmp_path, BRATS, patch), files)
    assert img.shape == shape and np.allclose(img.affine, AFFINE)
    np.testing.assert_array_equal(labels, np.where(structure, 4, 0))  # enhancing tumour, raw label 4


def test_a_structure_comes_back_at_its_voxels_in_2d_crop_and_pad(tmp_path):
    """MyoPS subject 40x56 in plane, 3 slices; the 48x48 centre crop pads axis 0 and cuts axis 1."""
    spec = DatasetSpec.from_dict({**get_spec("myops2020").to_dict(), "crop_size": [48, 48]})
    shape = (40, 56, 3)
    body = np.zeros(shape, bool)
    body[2:38, 6:50, :] = True
    structure = np.zeros(shape, bool)
    structure[3:9, 8:20, 0] = True  # near the padded edge of axis 0, and the cut edge of axis 1
    structure[30:36, 40:44, 2] = True
    structure[30:32, 44:48, 2] = True
    c0, t2 = _case(shape, body, structure)
    files = _write(tmp_path / "raw", "heart", {"C0": c0, "T2": t2}, np.diag([1.25, 1.25, 8.0, 1.0]))
    img, labels = _predicted(tmp_path, _checkpoint(tmp_path, spec, [32, 32]), files)
    assert img.shape == shape
    np.testing.assert_array_equal(labels, np.where(structure, 2221, 0))  # the top class (scar), raw value


def test_predict_postprocessing_drops_a_small_et_by_its_volume_in_mm3(tmp_path):
    shape, brain = (24, 24, 24), np.s_[2:22, 2:22, 2:22]
    structure = _l_shape(np.zeros(shape, bool), 6, 6, 6)  # 96 + 24 = 120 voxels
    flair, t2 = _case(shape, brain, structure)
    ckpt = _checkpoint(tmp_path, BRATS, [16, 16, 16])
    one_mm = _write(tmp_path / "raw1", "small", {"flair": flair, "t2": t2}, np.eye(4))
    _, kept = _predicted(tmp_path, ckpt, one_mm)
    _, dropped = _predicted(tmp_path, ckpt, one_mm, postprocess=True)  # 120 mm^3 < 500
    assert (kept == 4).sum() == 120 and not dropped.any()
    two_mm = _write(tmp_path / "raw2", "small", {"flair": flair, "t2": t2}, np.diag([2.0, 2.0, 2.0, 1.0]))
    _, big = _predicted(tmp_path, ckpt, two_mm, postprocess=True)  # 120 voxels of 8 mm^3 = 960 mm^3
    np.testing.assert_array_equal(big, np.where(structure, 4, 0))

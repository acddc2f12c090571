"""Training/evaluation datasets and augmentation: masks per setting, zero channels, determinism."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from passion.data.augment import AugmentConfig, augment_patch, random_crop
from passion.data.cache import write_case, write_index
from passion.data.datasets import EvalDataset, TrainDataset, availability_counts
from passion.data.spec import get_spec
from passion.utils import PassionError

SPEC = get_spec("brats2020")
SHAPE = (10, 12, 9)
PATCH = (8, 8, 8)


def make_cache(root: Path, availability: list[list[bool]]) -> Path:
    """Non-zero, distinct intensities per modality so a wrongly kept channel would show."""
    rng = np.random.default_rng(0)
    cases = []
    for i, avail in enumerate(availability):
        name = f"case_{i}"
        image = rng.normal(size=(4, *SHAPE)).astype(np.float32) + np.arange(1, 5, dtype=np.float32)[:, None, None, None]
        image[~np.array(avail)] = 0.0
        label = rng.integers(0, 4, size=SHAPE).astype(np.uint8)
        write_case(root, name, image, label, {"name": name, "available": avail})
        cases.append({"name": name, "available": avail, "shape": list(SHAPE)})
    write_index(root, SPEC, cases)
    return root


@pytest.fixture
def cache(tmp_path) -> Path:
    full = [True] * 4
    return make_cache(tmp_path / "cache", [full, full, [True, False, True, True], full])


NAMES = [f"case_{i}" for i in range(4)]
MASKS = {
    "case_0": (True, True, False, False),
    "case_1": (False, False, False, True),
    "case_2": (True, True, True, True),  # t1ce genuinely missing in the cache
    "case_3": (True, False, True, True),
}


def subset_of(a, b) -> bool:
    return all(bj or not aj for aj, bj in zip(a, b))


def check_item(item: dict, allowed) -> None:
    mask = tuple(item["mask"].tolist())
    assert item["image"].dtype == torch.float32 and tuple(item["image"].shape) == (4, *PATCH)
    assert item["target"].dtype == torch.int64 and tuple(item["target"].shape) == PATCH
    assert any(mask) and subset_of(mask, allowed)
    assert item["mask_id"] == SPEC.subset_id(mask)
    for m, on in enumerate(mask):
        if not on:
            assert torch.count_nonzero(item["image"][m]) == 0
        else:
            assert torch.count_nonzero(item["image"][m]) > 0


def test_idt_uses_fixed_mask_and_respects_genuine_availability(cache):
    ds = TrainDataset(cache, NAMES, MASKS, "idt", PATCH, augment=True, seed=3)
    for i, name in enumerate(NAMES):
        item = ds[i]
        check_item(item, MASKS[name])
        assert item["name"] == name
    assert tuple(ds[2]["mask"].tolist()) == (True, False, True, True)
    assert tuple(ds[0]["mask"].tolist()) == MASKS["case_0"]
    assert ds.availability_counts() == [3, 1, 2, 3]
    assert set(int(t) for t in ds[0]["target"].unique()) <= {0, 1, 2, 3}


def test_idt_drop_draws_subsets_within_case_mask(cache):
    ds = TrainDataset(cache, NAMES, MASKS, "idt_drop", PATCH, augment=False, seed=3)
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        item = ds[0]
        check_item(item, MASKS["case_0"])
        seen.add(tuple(item["mask"].tolist()))
    assert seen == {(True, False, False, False), (False, True, False, False), (True, True, False, False)}
    ds.set_epoch(0)
    check_item(ds[2], (True, False, True, True))


def test_pdt_covers_every_subset_and_encoders_see_every_modality(cache):
    complete = ["case_0", "case_1", "case_3"]
    ds = TrainDataset(cache, complete, None, "pdt", (4, 4, 4), augment=True, seed=1)
    seen = set()
    for epoch in range(60):
        ds.set_epoch(epoch)
        item = ds[0]
        seen.add(tuple(item["mask"].tolist()))
        # the drawn subset masks only the fused teacher: no image channel is zeroed
        assert all(torch.count_nonzero(item["image"][m]) > 0 for m in range(4))
    assert len(seen) == 15
    assert ds.availability_counts() == [3, 3, 3, 3]


def test_pdt_refuses_a_case_with_a_missing_modality_file(cache):
    with pytest.raises(PassionError, match="pdt.*case_2"):
        TrainDataset(cache, NAMES, None, "pdt", (4, 4, 4), augment=False, seed=1)


def _foreground_share(ds: TrainDataset, epochs: int) -> float:
    hits = total = 0
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            hits += int(ds[i]["target"].any())
            total += 1
    return hits / total


def test_foreground_oversampling_keeps_its_promise(tmp_path):
    """A 1-voxel-per-class lesion in a 24^3 volume: uniform 8^3 crops rarely contain it, while a
    fraction f of oversampled crops always does, so the share with foreground is >= f."""
    shape = (24, 24, 24)
    image = np.random.default_rng(0).normal(size=(4, *shape)).astype(np.float32) + 2.0
    label = np.zeros(shape, np.uint8)
    label[3, 4, 5], label[20, 18, 2] = 1, 3
    write_case(tmp_path, "c", image, label, {"name": "c", "available": [True] * 4})
    write_index(tmp_path, SPEC, [{"name": "c", "available": [True] * 4, "shape": list(shape)}])
    always = TrainDataset(tmp_path, ["c"], None, "idt", PATCH, augment=True, seed=2, foreground_fraction=1.0)
    assert _foreground_share(always, 40) == 1.0
    uniform = TrainDataset(tmp_path, ["c"], None, "idt", PATCH, augment=False, seed=2, foreground_fraction=0.0)
    assert _foreground_share(uniform, 200) < 0.15
    third = TrainDataset(tmp_path, ["c"], None, "idt", PATCH, augment=False, seed=2, foreground_fraction=1 / 3)
    share = _foreground_share(third, 300)
    # binomial(300, >= 1/3): 3 standard deviations below 1/3 is 0.25
    assert share >= 0.25
    with pytest.raises(PassionError, match="foreground_fraction"):
        TrainDataset(tmp_path, ["c"], None, "idt", PATCH, foreground_fraction=1.5)


def test_determinism_by_seed_epoch_index(cache):
    a = TrainDataset(cache, NAMES, MASKS, "idt_drop", PATCH, augment=True, seed=11)
    b = TrainDataset(cache, NAMES, MASKS, "idt_drop", PATCH, augment=True, seed=11)
    a.set_epoch(2)
    b.set_epoch(2)
    x, y = a[1], b[1]
    assert torch.equal(x["image"], y["image"]) and torch.equal(x["target"], y["target"])
    b.set_epoch(3)
    assert not torch.equal(a[3]["image"], b[3]["image"])
    c = TrainDataset(cache, NAMES, MASKS, "idt_drop", PATCH, augment=True, seed=12)
    c.set_epoch(2)
    assert not torch.equal(a[3]["image"], c[3]["image"])


def test_same_patches_with_and_without_workers(cache):
    ds = TrainDataset(cache, NAMES, MASKS, "idt_drop", PATCH, augment=True, seed=5)
    ds.set_epoch(4)
    serial = [ds[i] for i in range(len(ds))]
    loader = DataLoader(ds, batch_size=1, num_workers=2, shuffle=False)
    for ref, batch in zip(serial, loader):
        assert torch.equal(ref["image"], batch["image"][0])
        assert torch.equal(ref["mask"], batch["mask"][0])
        assert batch["name"][0] == ref["name"]


def test_augmentation_keeps_missing_modalities_zero():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, *SHAPE)).astype(np.float32) + 3.0
    label = rng.integers(0, 4, size=SHAPE).astype(np.uint8)
    avail = [True, False, True, False]
    for seed in range(5):
        img, lab = augment_patch(image, label, PATCH, avail, np.random.default_rng(seed), AugmentConfig())
        assert img.shape == (4, *PATCH) and lab.shape == PATCH
        assert not img[1].any() and not img[3].any()
        assert img[0].any() and img[2].any()
        assert set(np.unique(lab)) <= {0, 1, 2, 3}


def test_crop_pads_small_volumes_with_zeros():
    image = np.ones((2, 3, 5, 4), np.float32)
    label = np.ones((3, 5, 4), np.uint8)
    img, lab = random_crop(image, label, (4, 4, 4), np.random.default_rng(0))
    assert img.shape == (2, 4, 4, 4) and lab.shape == (4, 4, 4)
    assert img[:, 3].sum() == 0 and lab[3].sum() == 0 and img[:, :3].all()


def test_intensity_jitter_is_bounded():
    image = np.full((1, 9, 9, 9), 2.0, np.float32)
    label = np.zeros((9, 9, 9), np.uint8)
    for seed in range(5):
        img, _ = augment_patch(image, label, (9, 9, 9), [True], np.random.default_rng(seed),
                               AugmentConfig(rotate_degrees=0.0, flip=False))
        v = float(img[0, 4, 4, 4])
        assert 2.0 * 0.9 - 0.1 <= v <= 2.0 * 1.1 + 0.1
        assert np.allclose(img, v)


@pytest.mark.parametrize("dims", [3, 2])
def test_rotation_and_flips_keep_image_and_label_aligned(dims):
    """An off-centre bright box labelled 2: after rotation (up to 10 degrees), jitter and flips the
    bright voxels and the labelled ones still coincide (IoU >= 0.9; rotating the label by the
    opposite angle gives 0.48, flipping it on another axis 0)."""
    shape = (20, 18, 16)[:dims]
    box = (slice(3, 10), slice(4, 13), slice(2, 7))[:dims]
    label = np.zeros(shape, np.uint8)
    label[box] = 2
    image = np.where(label == 2, 10.0, 1.0).astype(np.float32)[None].repeat(3, 0)
    avail = [True, False, True]
    flips = [np.flip(label, axes) for k in range(dims + 1) for axes in itertools.combinations(range(dims), k)]
    rotated = 0
    for seed in range(20):
        img, lab = augment_patch(image, label, shape, avail, np.random.default_rng(seed), AugmentConfig())
        assert not img[1].any()  # the missing modality stays exactly zero
        bright, labelled = img[[0, 2]].mean(0) > 5.5, lab == 2
        assert (bright & labelled).sum() / (bright | labelled).sum() >= 0.9, seed
        rotated += not any(np.array_equal(lab, f) for f in flips)
    assert rotated >= 8  # the draws really rotate (small angles leave a box label unchanged)


def test_eval_dataset_returns_full_volumes(cache):
    ds = EvalDataset(cache, NAMES)
    item = ds[2]
    assert tuple(item["image"].shape) == (4, *SHAPE) and item["label"].dtype == torch.int64
    assert item["available"].tolist() == [True, False, True, True]
    assert torch.count_nonzero(item["image"][1]) == 0
    assert item["name"] == "case_2" and item["meta"]["name"] == "case_2"
    batch = next(iter(DataLoader(ds, batch_size=None)))
    assert tuple(batch["image"].shape) == (4, *SHAPE)


def test_availability_counts_helper():
    assert availability_counts(MASKS) == [3, 2, 2, 3]  # raw split masks, before genuine availability
    assert availability_counts(list(MASKS.values()), setting="pdt") == [4, 4, 4, 4]
    with pytest.raises(PassionError, match="t1ce"):
        availability_counts([(True, False, False, False)], require_all=True, modalities=SPEC.modalities)


def test_bad_dataset_input(cache):
    with pytest.raises(PassionError, match="case_9"):
        TrainDataset(cache, ["case_9"], None, "pdt", PATCH)
    with pytest.raises(PassionError, match="setting"):
        TrainDataset(cache, NAMES, MASKS, "random", PATCH)
    with pytest.raises(PassionError, match="case_3"):
        TrainDataset(cache, NAMES, {k: v for k, v in MASKS.items() if k != "case_3"}, "idt", PATCH)
    with pytest.raises(PassionError, match="case_0"):
        TrainDataset(cache, NAMES, {**MASKS, "case_0": (False,) * 4}, "idt", PATCH)

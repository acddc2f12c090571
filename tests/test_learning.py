"""Learning health: a pipeline whose models do not learn fails here, not in the demo.

Every backbone, with the baseline and the PASSION objective, must overfit one phantom case
(all modalities, no augmentation) to a training WT Dice of at least 0.9 within a fixed number of
steps, through the real trainer and the demo's optimiser recipe (configs/demo_cpu.yaml). And every
setting (idt, idt_drop, pdt) must run training steps with finite losses on every backbone.

Fewer steps do not keep the bars: the poly lr decays over the whole run (measured: M2FTrans
baseline 0.26 at 50). What the runs save instead is the per-epoch checkpoint
(training_helpers.train_without_epoch_saves). Each recipe below was checked at training seeds 3-5
or 3-6 (the test runs seed 3), so that a change of float rounding does not flip it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from passion.config import load_config
from passion.data.cache import read_case, write_case, write_index
from passion.data.splits import make_split
from passion.demo import DEMO_CONFIG
from passion.engine.inference import predict_classes
from passion.engine.metrics import dice
from passion.engine.trainer import train
from passion.models import list_models

from training_helpers import safe_records, train_without_epoch_saves

# patch (= crop) size per backbone: mmFormer and M2FTrans need multiples of 16 and >= 32. RFNet at
# 24^3 and 100 steps, seeds 3-5: WT Dice 0.934-0.962 with PASSION, 0.932-0.973 baseline (at 32^3
# and 80 steps PASSION gave 0.916, 0.78, 0.914), in 60 % of the time.
PATCH = {"rfnet": 24, "mmformer": 32, "m2ftrans": 32}
OVERFIT_STEPS = {"rfnet": 100, "mmformer": 50, "m2ftrans": 70}
# base width per backbone (default 4). M2FTrans at width 4 stalls below the bar with PASSION whatever
# the lr (measured at 100 steps: 0.87 at lr 1.5e-2 and 2e-2, 0.19-0.25 at 3e-3/5e-3; 0.81 at 80 steps
# at the demo's 1e-2); at width 8 it reaches baseline 0.94 / PASSION 0.90 at step 80 (lr 1e-2) and, at
# lr 2e-2, 0.93 / 0.89 at step 55, 0.94 / 0.91 at 60, 0.95 / 0.94 at 70 (PASSION at seeds 4, 5: 0.93).
OVERFIT_WIDTH = {"m2ftrans": 8}
# mmFormer at lr 2e-2 and 50 steps (suite time): WT Dice 0.929-0.961 at seeds 3-6, both objectives
OVERFIT_LR = {"mmformer": 2e-2, "m2ftrans": 2e-2}  # else the demo's 1e-2
# Training WT Dice to reach within those steps, far above the 0.05-0.13 of a model stuck on the
# all-tumour plateau (the old lr 2e-3).
OVERFIT_DICE = {"rfnet": 0.9, "mmformer": 0.9, "m2ftrans": 0.9}
MODELS = list_models()


@pytest.fixture(scope="module")
def one_case(tmp_path_factory):
    """size -> (cache, split, name) of ONE phantom case: a size^3 crop of a 64^3 phantom (3.75 mm voxels)
    centred on its tumour, which fills 10 % of a 32^3 crop (25 % of a 24^3 one) with all three
    classes, as in the paper's 80^3 BraTS patches (5-20 %). In a whole small-phantom volume the tumour
    is 1-2 %: the weighted CE then gives background a weight of ~0.02 and every backbone first sits on
    an "all tumour" plateau (benchmarks/README.md). One cache per size, written on first use."""
    from passion.data.spec import get_spec
    from passion.data.synthetic import synthesize_case

    spec = get_spec("brats2020")
    case = synthesize_case(1, (64, 64, 64), seed=11, spec=spec)
    label = np.vectorize(lambda v: spec.label_map.get(int(v), 0))(case.seg).astype(np.uint8)
    centre = np.argwhere(label > 0).mean(0).round().astype(int)
    made: dict[int, tuple[Path, Path, str]] = {}

    def crop(size: int) -> tuple[Path, Path, str]:
        if size in made:
            return made[size]
        box = tuple(slice(s, s + size) for s in np.clip(centre - size // 2, 0, 64 - size))
        image = np.stack([case.images[m][box] for m in spec.modalities]).astype(np.float32)
        brain = image.any(axis=0)
        for m in range(len(image)):  # z-score over the brain, as `passion prepare` does
            vals = image[m][brain]
            image[m] = np.where(brain, (image[m] - vals.mean()) / vals.std(), 0.0)
        root = tmp_path_factory.mktemp(f"one_case_{size}")
        name = "tumour_crop"
        write_case(root / "cache", name, image, label[box], {"name": name, "available": [True] * 4})
        write_index(root / "cache", spec, [{"name": name, "available": [True] * 4, "shape": [size] * 3}])
        make_split([name], root / "split", val=0.0, test=0.0, seed=1)
        made[size] = (root / "cache", root / "split", name)
        return made[size]

    return crop


def _config(cache: Path, split: Path, run_dir: Path, model: str, objective: str, *extra: str, width: int = 4,
            patch: int = 32):
    return load_config(DEMO_CONFIG, [
        f"run_dir={run_dir}", f"data.cache={cache}", f"data.split={split}", f"model.name={model}",
        f"model.patch_size={patch}", f"model.base_width={width}", f"objective.name={objective}",
        "train.device=cpu", "train.threads=1", "train.val_cases=0", "data.workers=0", *extra])


@pytest.mark.parametrize("objective", ["baseline", "passion"])
@pytest.mark.parametrize("model", MODELS)
def test_overfits_one_phantom(one_case, tmp_path, model, objective):
    patch = PATCH.get(model, 32)
    cache, split, name = one_case(patch)
    run_dir = tmp_path / "run"
    # one step per epoch: an epoch is one pass over the one case (PASSION's weights N_iter/n[m] = 1)
    # and the poly schedule decays over the run, as in a real training
    cfg = _config(cache, split, run_dir, model, objective, "data.augment=false",
                  f"train.epochs={OVERFIT_STEPS.get(model, 100)}", "train.seed=3", "train.checkpoint_every_iters=0",
                  *([f"train.lr={OVERFIT_LR[model]}"] if model in OVERFIT_LR else []), width=OVERFIT_WIDTH.get(model, 4), patch=patch)
    net = train_without_epoch_saves(cfg)
    case = read_case(cache, name)
    pred = predict_classes(net, np.asarray(case.image), [[True] * 4], roi_size=(patch,) * 3)[0]
    wt = dice(pred > 0, case.label > 0)
    losses = [r["fuse"] for r in safe_records(run_dir) if r.get("type") == "iter"]
    steps = OVERFIT_STEPS.get(model, 100)
    assert wt >= OVERFIT_DICE.get(model, 0.9), (f"{model}/{objective} reached a training WT Dice of only {wt:.3f} "
                                                f"after {steps} steps (fused loss {losses[0]:.3f} -> {losses[-1]:.3f})")


@pytest.mark.parametrize("setting", ["pdt", "idt_drop"])
@pytest.mark.parametrize("model", MODELS)
def test_every_setting_trains_with_finite_losses(tiny_data, tmp_path, model, setting):
    """pdt used to give NaN at the second step: its encoders saw zeroed images (METHOD.md 5)."""
    run_dir = tmp_path / "run"
    for objective in ("baseline", "passion"):
        cfg = _config(tiny_data / "cache", tiny_data / "split", run_dir / objective, model, objective,
                      f"data.setting={setting}", "train.epochs=1", "train.iters_per_epoch=4")
        train(cfg)
        losses = [r["loss"] for r in safe_records(run_dir / objective) if r.get("type") == "iter"]
        assert len(losses) == 4 and all(np.isfinite(losses))

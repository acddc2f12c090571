"""The CUDA path: every backbone and objective on a GPU agrees with the CPU, bf16 runs, and a
run trains, evaluates and predicts on cuda. Skipped where no GPU is present (CI has none; these
ran on a lent H200, see benchmarks/README.md)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from passion.config import ObjectiveConfig, load_config
from passion.data.spec import get_spec
from passion.method import build_objective
from passion.models import build_model

from training_helpers import tiny_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")

BACKBONES = ["rfnet", "mmformer", "m2ftrans"]
SIZE = 32


@pytest.fixture(autouse=True)
def exact_cuda_math():
    """TF32 would make cuda-vs-cpu differences of 1e-3 legitimate; compare in true fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _batch(device, available=(True, False, True, True)):
    g = torch.Generator().manual_seed(0)
    target = torch.zeros(2, SIZE, SIZE, SIZE, dtype=torch.long)
    target[:, 8:24, 8:24, 8:24] = 2
    target[:, 12:20, 12:20, 12:20] = 1
    target[:, 14:18, 14:18, 14:18] = 3
    mask = torch.tensor([available, (True, True, False, True)])
    image = torch.randn(2, 4, SIZE, SIZE, SIZE, generator=g) * mask[:, :, None, None, None]
    return {"image": image.to(device), "target": target.to(device), "mask": mask.to(device)}


def _step(name: str, objective: str, device: str, precision: str = "fp32"):
    spec = get_spec("brats2020")
    torch.manual_seed(0)
    model = build_model(name, num_modalities=4, num_classes=spec.num_classes, base_width=4,
                        patch_size=(SIZE,) * 3).to(device)
    batch = _batch(device)
    if precision == "fp64":
        model = model.double()
        batch["image"] = batch["image"].double()
    model.eval()  # no dropout: the cpu and cuda draws differ by design
    obj = build_objective(objective, ObjectiveConfig(name=objective), num_modalities=4,
                          modality_names=list(spec.modalities), availability_counts=[10, 6, 8, 9],
                          iters_per_epoch=5, setting="idt")
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = obj(model, batch, 0)
    out.loss.backward()
    keep = torch.float64 if precision == "fp64" else torch.float32
    grads = {k: p.grad.detach().to(keep).cpu() for k, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach().to(keep).cpu(), grads


@pytest.mark.parametrize("objective", ["baseline", "passion"])
@pytest.mark.parametrize("name", BACKBONES)
def test_cuda_step_matches_cpu(name, objective):
    """In float64: in fp32 the two devices' reduction orders alone moved gradients by up to 5.4e-3
    of their scale (M2FTrans + PASSION's first encoder conv on an H200, TF32 off), so no bound
    there could tell noise from a bug. In float64 the H200 agreed to 1e-9 in the loss and 1e-7 of the
    gradient scale for five of the six cases; M2FTrans + PASSION's loss was 3.3e-8 apart while the
    class probabilities were still taken in fp32 (since fixed, not yet re-run on a GPU), hence 1e-7
    and 1e-6 here: still thousands of times below what a wrong mask or a missing term moves."""
    loss_cpu, grads_cpu = _step(name, objective, "cpu", "fp64")
    loss_gpu, grads_gpu = _step(name, objective, "cuda", "fp64")
    torch.testing.assert_close(loss_gpu, loss_cpu, rtol=1e-7, atol=1e-9)
    assert grads_gpu.keys() == grads_cpu.keys() and grads_cpu
    # relative to the largest gradient of the model: some gradients are zero in exact arithmetic
    # (a conv bias before instance norm) and only rounding noise on either device; a real bug (a
    # wrong mask, a missing term) moves gradients by O(scale)
    scale = max(g.abs().max().item() for g in grads_cpu.values())
    worst = max(((g - grads_cpu[k]).abs().max().item(), k) for k, g in grads_gpu.items())
    assert worst[0] < 1e-6 * scale, (worst, scale)


@pytest.mark.parametrize("name", BACKBONES)
def test_cuda_bf16_step_is_finite_and_close(name):
    """bf16 autocast: PASSION's step stays finite; the plain segmentation loss stays near fp32's
    (PASSION's distillation terms compare near-identical distributions and amplify bf16 rounding)."""
    _, grads16 = _step(name, "passion", "cuda", precision="bf16")
    assert grads16 and all(torch.isfinite(g).all() for g in grads16.values())
    loss32, _ = _step(name, "baseline", "cuda")
    loss16, _ = _step(name, "baseline", "cuda", precision="bf16")
    assert abs(loss16.item() - loss32.item()) < 0.05 * abs(loss32.item()), (loss16.item(), loss32.item())


@pytest.mark.parametrize("name", BACKBONES)
def test_cuda_train_evaluate_predict(name, tiny_data, synth_raw_dir, tmp_path):
    """bf16 training with loader workers and pinned memory on cuda; evaluation on cuda scores what
    the cpu scores; predict writes a label map on the input's grid."""
    import nibabel as nib

    from passion.engine.evaluate import evaluate
    from passion.engine.predict import predict
    from passion.engine.trainer import train

    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_data, run, **{
        "model.name": name, "model.patch_size": 32, "train.device": "cuda", "train.precision": "bf16",
        "data.workers": 2}))
    train(cfg)
    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 6
    gpu = evaluate(run, device="cuda", precision="fp32", progress=False)
    cpu = evaluate(run, device="cpu", precision="fp32", progress=False, out_dir=tmp_path / "eval_cpu")
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert len(gpu["subsets"]) == 15
    for g, c in zip(gpu["subsets"], cpu["subsets"]):
        for region, value in c["dice"].items():
            assert g["dice"][region] == pytest.approx(value, abs=0.02, nan_ok=True), (g["subset"], region)
    case = sorted(p for p in synth_raw_dir.iterdir() if p.is_dir())[0]
    written = predict(run, [case], tmp_path / "pred", device="cuda", progress=False, log=None)
    label = nib.load(str(written[0]))
    reference = nib.load(str(next(case.glob("*flair.nii*"))))
    assert label.shape == reference.shape
    assert (label.affine == reference.affine).all()


@pytest.mark.parametrize("objective", ["baseline", "passion"])
@pytest.mark.parametrize("name", BACKBONES)
def test_cuda_training_step_never_synchronises(name, objective):
    """The GPU twin of test_no_device_wait.py: with the mask on the host (as the trainer keeps it),
    a step's forward, backward and optimizer step make no synchronising CUDA call; reading the
    logged values (ObjectiveOutput.host_values) is the step's one."""
    spec = get_spec("brats2020")
    model = build_model(name, num_modalities=4, num_classes=spec.num_classes, base_width=4,
                        patch_size=(SIZE,) * 3).to("cuda").train()
    batch = {k: (v if k == "mask" else v.to("cuda")) for k, v in _batch("cpu").items()}
    obj = build_objective(objective, ObjectiveConfig(name=objective), num_modalities=4,
                          modality_names=list(spec.modalities), availability_counts=[10, 6, 8, 9],
                          iters_per_epoch=5, setting="idt")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4, amsgrad=True)

    def step():
        opt.zero_grad(set_to_none=True)
        out = obj(model, batch, 0)
        out.loss.backward()
        opt.step()
        return out

    step().host_values()  # warm-up: cuDNN's algorithm search and the allocator's first blocks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    loss, stats = out.host_values()
    assert math.isfinite(loss) and stats["loss"] == pytest.approx(loss)

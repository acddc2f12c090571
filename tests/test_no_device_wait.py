"""A training step never waits for its device before the one read of its logged values
(issue 17 item 4: no per-step host synchronisation beyond the logged scalars).

On the meta device tensors have shapes but no values, so everything that needs a value on the
host (``item()``, ``bool()``, ``nonzero``, indexing by a boolean mask, a copy to the CPU) raises
there. A step whose model and batch live on ``meta``, with the availability mask on the host
where the trainer keeps it, therefore runs through its forward, backward and optimizer step only
if nothing in it waits for the device; on a GPU each such wait drains the queue of kernels.
Host->device copies of masks, indices and weights must not block either (a blocking copy to a
GPU waits for every queued kernel): the step runs under a dispatch mode that records every
copy from the CPU to ``meta`` made without ``non_blocking``. The logged values stay on the
device until ``ObjectiveOutput.host_values`` reads them.

"""
from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from passion.config import ObjectiveConfig
from passion.method import build_objective
from passion.method.objectives.base import ObjectiveOutput, PendingStats
from passion.models import build_model, list_models

M, C, SIZE = 4, 4, 32
MASK = torch.tensor([[True, True, False, True], [False, True, True, True]])


class BlockingCopies(TorchDispatchMode):
    """Records where the code copies a host tensor to the device without ``non_blocking``."""

    def __init__(self):
        super().__init__()
        self.sites: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if func is torch.ops.aten._to_copy.default else args[1] if func is torch.ops.aten.copy_.default \
            else None
        dst_device = kwargs.get("device") if func is torch.ops.aten._to_copy.default else \
            (args[0].device if src is not None else None)
        if src is not None and dst_device is not None and src.device.type == "cpu" \
                and torch.device(dst_device).type == "meta" and not kwargs.get("non_blocking", False):
            ours = [f for f in traceback.extract_stack() if "/passion/" in f.filename]
            self.sites.append(f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "outside passion")
        return func(*args, **kwargs)


def meta_step(model_name: str, objective: str, checkpointing: str = "off",
              mask: torch.Tensor = MASK) -> tuple[ObjectiveOutput, torch.nn.Module]:
    model = build_model(model_name, num_modalities=M, num_classes=C, base_width=4,
                        patch_size=(SIZE,) * 3).to("meta").train()
    model.set_activation_checkpointing(checkpointing)
    obj = build_objective(objective, ObjectiveConfig(name=objective), num_modalities=M,
                          modality_names=["flair", "t1ce", "t1", "t2"], availability_counts=[8] * M,
                          iters_per_epoch=8, setting="idt")
    batch = {"image": torch.empty(2, M, SIZE, SIZE, SIZE, device="meta"),
             "target": torch.empty(2, SIZE, SIZE, SIZE, dtype=torch.long, device="meta"),
             "mask": mask.clone()}  # the host, as Trainer._to_device leaves it
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4, amsgrad=True)
    with BlockingCopies() as copies:
        out = obj(model, batch, 0)
        out.loss.backward()
        out.add_stats(obj.after_backward(model, 0))  # OGM-GE's gradient modulation
        opt.step()
    assert not copies.sites, f"blocking host->device copies at {copies.sites}"
    return out, model


@pytest.mark.parametrize("objective", ["baseline", "passion", "dwa", "uncertainty", "ogm_ge", "pmr"])
@pytest.mark.parametrize("model_name", list_models())
def test_a_training_step_runs_without_reading_the_device(model_name, objective):
    out, model = meta_step(model_name, objective)
    assert out.loss.device.type == "meta" and out.loss.dim() == 0
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)
    assert isinstance(out.pending_stats, PendingStats) and out.pending_stats.values.device.type == "meta"
    with pytest.raises(NotImplementedError, match="meta"):  # the one read, left to the trainer
        out.host_values()


@pytest.mark.parametrize("model_name", list_models())
def test_a_checkpointed_passion_step_runs_without_reading_the_device(model_name):
    out, _ = meta_step(model_name, "passion", "all")
    assert out.loss.device.type == "meta"


def test_a_passion_step_whose_students_reuse_teacher_rows_runs_without_reading_the_device():
    one_modality = torch.tensor([[False, True, False, False], [True, False, True, False]])
    out, _ = meta_step("rfnet", "passion", mask=one_modality)  # sample 0's student is its teacher row
    assert out.loss.device.type == "meta"


def test_pairs_are_read_from_the_host_mask_and_shared_on_the_device():
    model = build_model("rfnet", num_modalities=M, num_classes=C, base_width=4, patch_size=(16,) * 3).to("meta")
    features = model.encode(torch.empty(2, M, 16, 16, 16, device="meta"), MASK)
    b_idx, m_idx = features.pairs(MASK)
    assert b_idx.device.type == "meta" and b_idx.numel() == int(MASK.sum())
    assert features.pairs(MASK.clone()) == (b_idx, m_idx)  # same mask values: the same tensors
    gathered = features.pair_scales(b_idx, m_idx)
    assert features.pair_scales(*features.pairs(MASK)) is gathered  # no second gather
    every = features.pair_scales(*features.pairs())  # every pair in order: views, no copy
    assert all(v._base is s for v, s in zip(every, features.scales))


def test_host_values_reads_the_loss_and_the_stats_once():
    values = torch.tensor([2.0, 3.0])
    out = ObjectiveOutput(torch.tensor(1.5), PendingStats(values, lambda v: {"a": v[0], "b": v[1]}))
    assert out.host_values() == (1.5, {"a": 2.0, "b": 3.0})
    values.fill_(9.0)  # read already: the step's values are not read again
    assert out.stats == {"a": 2.0, "b": 3.0}
    out.add_stats(PendingStats(torch.tensor([4.0]), lambda v: {"hook": v[0]}))  # after_backward's
    out.add_stats({"host": 5.0})
    out.add_stats(None)
    assert out.host_values() == (1.5, {"a": 9.0, "b": 9.0, "hook": 4.0, "host": 5.0})
    assert ObjectiveOutput(torch.tensor(0.25), {"x": 1.0}).host_values() == (0.25, {"x": 1.0})

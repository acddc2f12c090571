"""`benchmarks/train_step.py --reference DIR` against a tiny fake of the paper's code.

The fake (written here, never the paper's code) has the public code's contract: `models/rfnet.py`
and `models/rfnet_passion.py` with module constants `H = W = Z = 80` and `Model(num_cls)`, forward
`(x, mask)` -> (fused softmax, per-modality softmax or 0, region softmaxes) for the baseline and
`(x, mask, target, temp)` -> (fused softmax, prm loss, sep/kl/proto losses and distances per
modality) for PASSION, `.cuda()` calls on its buffers, and `utils/criterions.py`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

_BASELINE = '''
import os
import torch
import torch.nn as nn

H = W = Z = 80


class Model(nn.Module):
    def __init__(self, num_cls=4):
        super().__init__()
        self.fuse = nn.Conv3d(4, num_cls, 1)
        self.sep = nn.Conv3d(1, num_cls, 1)
        self.zeros = torch.zeros(1, 1, H, W, Z)  # the real code sizes its zero features from H/W/Z
        self.is_training = False
        self.mask_type = "idt"

    def _log(self):
        with open(os.environ["FAKE_REF_LOG"], "a") as fh:
            fh.write(__name__ + "\\n")

    def heads(self, x, mask):
        x = x * mask[:, :, None, None, None].float() + self.zeros.cuda()  # fails unless H/W/Z were patched
        fuse = torch.softmax(self.fuse(x), 1)
        seps = tuple(torch.softmax(self.sep(x[:, i:i + 1]), 1) if mask[0, i] else 0 for i in range(4))
        return fuse, seps

    def forward(self, x, mask):
        self._log()
        fuse, seps = self.heads(x, mask)
        return fuse, seps, (fuse, fuse)
'''

_PASSION = _BASELINE + '''
from utils.criterions import dice_loss, softmax_weighted_loss


class _Passion(Model):
    def forward(self, x, mask, target=None, temp=1.0):
        self._log()
        assert target is not None and target.shape[1] == 4 and temp == 4.0
        fuse, seps = self.heads(x, mask)
        sep = torch.zeros(4).cuda().float()
        kl = torch.zeros(4).cuda().float()
        dist = torch.zeros(4).cuda().float()
        for i, s in enumerate(seps):
            if mask[0, i]:
                sep[i] = softmax_weighted_loss(s, target, num_cls=4) + dice_loss(s, target, num_cls=4)
                kl[i] = (s - fuse.detach()).square().mean()
                dist[i] = 0.1 * (i + 1)
        return fuse, dice_loss(fuse, target, num_cls=4).reshape(1), sep, kl, kl * 0.5, dist


Model = _Passion  # a self-contained module, as upstream: its own H/W/Z size the zero features
'''

_CRITERIONS = '''
import torch


def dice_loss(output, target, num_cls=5, eps=1e-7, up_op=None):
    inter = (output * target).sum()
    return 1.0 - 2.0 * inter / (output.sum() + target.sum() + eps)


def softmax_weighted_loss(output, target, num_cls=5, up_op=None):
    return -(target * torch.log(output.clamp(min=0.005, max=1))).mean()
'''


def _fake_reference(root: Path) -> Path:
    """root/code/{models,utils} (namespace packages, as upstream); returns the repository root."""
    code = root / "code"
    (code / "models").mkdir(parents=True)
    (code / "utils").mkdir()
    (code / "models" / "rfnet.py").write_text(_BASELINE)
    (code / "models" / "rfnet_passion.py").write_text(_PASSION)
    (code / "utils" / "criterions.py").write_text(_CRITERIONS)
    return root


def test_reference_harness_interleaves_and_reports_both(tmp_path):
    ref = _fake_reference(tmp_path / "PASSION")
    log = tmp_path / "calls.log"
    env = {**os.environ, "FAKE_REF_LOG": str(log), "OMP_NUM_THREADS": "1"}
    steps, warmup = 2, 1
    cmd = [sys.executable, str(BENCH / "train_step.py"), "--reference", str(ref), "--models", "rfnet",
           "--size", "16", "--available", "3", "--precisions", "fp32", "--threads", "1",
           "--steps", str(steps), "--warmup", str(warmup), "--timeout", "300"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)

    # the existing contract: results (ours) and PASSION over baseline
    assert [r["objective"] for r in out["results"]] == ["baseline", "passion"]
    assert set(out["passion_vs_baseline"]["rfnet/fp32"]) == {"time_x", "peak_rss_x"}
    assert out["reference"]["dir"] == str((ref / "code").resolve())
    assert out["reference"]["cuda_shim"] is True  # the fake calls .cuda(); torch here may have no CUDA

    for ours, theirs in zip(out["results"], out["reference_results"]):
        assert "error" not in ours and "error" not in theirs, (ours, theirs)
        for side in (ours, theirs):
            assert side["step_s_median"] > 0 and side["peak_rss_mb"] > 0
            assert len(side["step_s_all"]) == steps and side["threads"] == 1
            assert side["sequence"] == ["ours", "reference"] * (warmup + steps)  # interleaved, ours first
            assert side["available_modalities"] == 3 and side["size"] == 16
        assert theirs["reference_module"] == ("models.rfnet" if ours["objective"] == "baseline"
                                              else "models.rfnet_passion")
        assert theirs["patched_constants"] == {"H": [80, 16], "W": [80, 16], "Z": [80, 16]}
        key = f"rfnet/{ours['objective']}/fp32/16"
        ratio = out["ours_vs_reference"][key]
        assert ratio["time_x"] == round(ours["step_s_median"] / theirs["step_s_median"], 2)
        assert ratio["peak_rss_x"] == round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 2)
        if ours.get("peak_heap_mb") is not None:  # glibc: the in-use heap is compared as well
            assert 0 < ours["peak_heap_mb"] <= ours["peak_rss_mb"] and theirs["peak_heap_mb"] > 0
            assert ratio["peak_heap_x"] == round(ours["peak_heap_mb"] / theirs["peak_heap_mb"], 2)
    assert set(out["reference_passion_vs_baseline"]["rfnet/fp32"]) == {"time_x", "peak_rss_x"}

    # the reference really ran every step: warmup + steps interleaved, warmup + 1 alone for the memory
    calls = log.read_text().split()
    assert calls.count("models.rfnet") == calls.count("models.rfnet_passion") == 2 * warmup + steps + 1


def test_cuda_shim_only_inside_and_reference_imports_do_not_leak(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import reference_step as rs
    finally:
        sys.path.remove(str(BENCH))
    cuda_before, module_cuda_before = torch.Tensor.cuda, torch.nn.Module.cuda
    t, lin = torch.zeros(2), torch.nn.Linear(1, 1)
    with rs.cuda_to_cpu_shim():
        assert t.cuda() is t and t.cuda(non_blocking=True) is t and lin.cuda() is lin
    assert torch.Tensor.cuda is cuda_before and torch.nn.Module.cuda is module_cuda_before
    try:
        with rs.cuda_to_cpu_shim():
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert torch.Tensor.cuda is cuda_before

    ref = rs.resolve_dir(_fake_reference(tmp_path / "PASSION"))
    sentinel = object()
    saved = sys.modules.get("models", sentinel)
    a, crit = rs.import_reference(ref, "rfnet_passion")
    b, _ = rs.import_reference(ref, "rfnet_passion")
    assert sys.modules.get("models", sentinel) is saved and "models.rfnet" not in sys.modules
    assert "utils.criterions" not in sys.modules and a is not b and callable(crit.dice_loss)
    rs.patch_size_constants(a, 32)
    assert (a.H, b.H) == (32, 80)  # each import is its own module: patching one leaves the other


def test_heap_peak_sees_an_allocation_freed_inside_the_block():
    sys.path.insert(0, str(BENCH))
    try:
        from models import HeapPeak
    finally:
        sys.path.remove(str(BENCH))
    with HeapPeak() as idle:
        pass
    if idle.mb is None:
        pytest.skip("no glibc mallinfo2 on this platform")
    with HeapPeak(period=0.001) as heap:
        big = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, freed before the block ends
        time.sleep(0.02)
        del big
    assert heap.mb >= idle.mb + 60, (heap.mb, idle.mb)

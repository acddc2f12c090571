"""torchrun / DDP on CPU with gloo: two ranks agree, match one process, and resume after a kill."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from passion.config import load_config
from passion.engine.checkpoint import load_checkpoint

from training_helpers import config_file, safe_records, tiny_overrides

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_step_worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    """One optimisation step's gradients and PASSION stats, as seen by `rank`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    from passion.engine.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    try:
        batch = trainer._to_device(next(iter(trainer._batches(0, 0))))
        trainer.objective.start_epoch(0)
        result = trainer.step_module(batch, 0)
        result.loss.backward()
        grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                 for n, p in trainer.model.named_parameters()}
        torch.save({"grads": grads, "gate": result.stats.get("gate"), "rp": result.stats.get("relative_preference", {}),
                    "names": list(batch["name"])}, f"{out}/rank{rank}.pt")
    finally:
        trainer.close()


def _run_worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    from passion.engine.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    try:
        trainer.train()
        torch.save({"model": trainer.model.state_dict(), "objective": trainer.objective.state_dict()},
                   f"{out}/final_rank{rank}.pt")
    finally:
        trainer.close()


def test_ddp_gradients_and_gate_equal_one_process_with_the_same_global_batch(tiny_data, tmp_path):
    ddp_overrides = tiny_overrides(tiny_data, tmp_path / "ddp", **{"train.batch_size": 1, "train.iters_per_epoch": 1})
    mp.spawn(_first_step_worker, args=(2, _free_port(), ddp_overrides, str(tmp_path)), nprocs=2, join=True)
    single = tiny_overrides(tiny_data, tmp_path / "single", **{"train.batch_size": 2, "train.iters_per_epoch": 1})
    (tmp_path / "one").mkdir()
    _first_step_worker(0, 1, _free_port(), single, str(tmp_path / "one"))

    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    one = torch.load(tmp_path / "one" / "rank0.pt")
    assert r0["names"] + r1["names"] == one["names"]  # the same global batch
    assert r0["gate"] == r1["gate"] == one["gate"]
    for m in r0["rp"]:
        assert r0["rp"][m] == pytest.approx(one["rp"][m], abs=1e-6)
    # float tolerance relative to the largest gradient: conv biases before InstanceNorm have
    # gradients that are pure rounding noise, so a per-tensor relative check would be meaningless
    scale = max(g.abs().max().item() for g in one["grads"].values())
    for name, g in one["grads"].items():
        assert torch.equal(r0["grads"][name], r1["grads"][name]), name
        assert (r0["grads"][name] - g).abs().max().item() <= 2e-4 * scale, name


@pytest.mark.parametrize("checkpointing", ["off", "all"])
def test_two_ranks_end_with_identical_weights_and_beta(tiny_data, tmp_path, checkpointing):
    """`all` also under DDP: per-row blocks checkpointed row by row use each weight several times."""
    overrides = tiny_overrides(tiny_data, tmp_path / "run", **{"train.iters_per_epoch": 2,
                                                              "train.activation_checkpointing": checkpointing})
    mp.spawn(_run_worker, args=(2, _free_port(), overrides, str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "final_rank0.pt"), torch.load(tmp_path / "final_rank1.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["objective"] == b["objective"]
    beta = a["objective"]["preference"]["beta"]
    assert any(abs(v - 1.0) > 1e-6 for v in beta)  # beta moved, identically on both ranks
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["last.pt"]  # only rank 0 writes


def _torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), "-m", "passion", "train", *args]


def test_killed_two_process_run_resumes_to_the_same_weights(tiny_data, tmp_path):
    extra = {"train.checkpoint_every_iters": 1, "train.iters_per_epoch": 2}
    reference = tmp_path / "reference"
    cfg_ref = config_file(tmp_path, tiny_overrides(tiny_data, reference, **extra))
    subprocess.run(_torchrun(["--config", str(cfg_ref)]), check=True, capture_output=True)

    killed = tmp_path / "killed"
    (tmp_path / "k").mkdir()
    cfg_killed = config_file(tmp_path / "k", tiny_overrides(tiny_data, killed, **extra))
    proc = subprocess.Popen(_torchrun(["--config", str(cfg_killed)]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if (killed / "checkpoints" / "last.pt").is_file() and any(r.get("step", 0) >= 1 for r in safe_records(killed)):
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        proc.wait()
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["step"] < 4, "the run finished before the kill"

    subprocess.run(_torchrun(["--resume", str(killed)]), check=True, capture_output=True)
    a = load_checkpoint(reference / "checkpoints" / "last.pt")
    b = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["objective"] == b["objective"]
    lines = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["type"] == "iter"] == [1, 2, 3, 4]

"""The training loop: data, model, objective, optimiser, schedule, precision, DDP, checkpoints.

Exact resume is a design goal: the data order and augmentation of every iteration are a pure
function of (seed, epoch, index), and a checkpoint carries everything else that changes
(weights, optimiser, objective state, RNG states, position in the epoch, best validation score),
so a run killed at any point and resumed reaches the same weights and metrics as an
uninterrupted one. Validation (engine/validation.py) consumes no training RNG.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError, save_config
from ..data.cache import preprocess_record, read_index, read_spec
from ..data.spec import DatasetSpec
from ..utils import PassionError, progress
from .checkpoint import build_model_for, load_checkpoint, restore_rng_state, rng_state, save_checkpoint, seed_everything
from .epoch_means import EpochMeans
from .metrics_log import MetricsLog, attach_text_log
from ..run_dir import RunDir
from .validation import is_better, is_validation_epoch
from .runtime import autocast, configure_host, resolve_device, warn_if_slow_precision
from .distributed import DistContext, init_distributed, shutdown

log = logging.getLogger("passion.train")

# Config sections that define what a checkpoint *is*; resuming with any of them changed is refused.
_IDENTITY_KEYS = ("data", "model", "objective")


def poly_lr(base_lr: float, epoch: int, epochs: int, power: float) -> float:
    return base_lr * (1.0 - epoch / epochs) ** power


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress (== epochs completed at an epoch boundary)
    iteration: int = 0  # iterations completed within `epoch`
    step: int = 0  # global iterations completed


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, force: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.files = RunDir(self.run_dir)
        t = cfg.train
        configure_host(t.threads, t.reuse_freed_memory)
        self.device = resolve_device(t.device)
        self.dist: DistContext = init_distributed(self.device, t.distributed_backend)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = resolve_device(t.device, self.dist.local_rank)
            torch.cuda.set_device(self.device)
        autocast(self.device, t.precision)  # validates precision vs device early

        self._check_run_dir(resume, force)
        self._setup_data()
        self._setup_model_and_objective()
        self.state = TrainState()
        self.best: dict | None = None  # {"val_score", "epoch" (0-based), "step"} of best.pt
        self.last_val = ""  # progress-bar text of the latest validation
        self.epoch_means = EpochMeans()
        self.metrics_log = MetricsLog(self.run_dir, self.dist.is_main, tensorboard=t.tensorboard)
        if resume:
            self._resume()
        elif self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.files.config)
            self.files.metrics.write_text("")
        self.dist.barrier()

    # ----------------------------------------------------------------- setup
    def _check_run_dir(self, resume: bool, force: bool) -> None:
        last = self.files.last
        if resume:
            if not last.is_file():
                raise PassionError(f"cannot resume: {last} does not exist")
        elif last.is_file() and not force:
            raise PassionError(
                f"{self.run_dir} already holds a training run; use --resume {self.run_dir} to continue it "
                f"or --force to start over")
        elif force and self.dist.is_main:
            self.files.discard_training()

    def _setup_data(self) -> None:
        from ..data.datasets import TrainDataset
        from ..data.splits import load_split

        cfg = self.cfg
        if not cfg.data.cache:
            raise ConfigError("data.cache is not set (a folder made by `passion prepare`)")
        if not cfg.data.split:
            raise ConfigError("data.split is not set (a folder made by `passion split`)")
        self.spec: DatasetSpec = read_spec(cfg.data.cache)
        index = read_index(cfg.data.cache)
        self.preprocess = preprocess_record(index)  # predict repeats it (min_size, spacing, orientation)
        shapes = {c["name"]: c.get("shape") for c in index["cases"]}
        split = load_split(cfg.data.split)
        self.train_cases = list(split.train)
        if not self.train_cases:
            raise ConfigError(f"{cfg.data.split}: the training list is empty")
        missing = [n for n in self.train_cases if n not in shapes]
        if missing:
            raise ConfigError(f"training case {missing[0]!r} from {cfg.data.split} is not in cache {cfg.data.cache}")
        patch = cfg.model.patch_size
        if len(patch) != self.spec.spatial_dims:
            raise ConfigError(f"model.patch_size {patch} has {len(patch)} axes but {self.spec.name} images have "
                              f"{self.spec.spatial_dims}")
        for name in self.train_cases:
            shape = shapes[name]
            if shape and any(p > s for p, s in zip(patch, shape)):
                raise ConfigError(f"model.patch_size {patch} is larger than case {name!r} ({list(shape)}) in "
                                  f"{cfg.data.cache}; use a smaller patch or prepare with a larger --min-size")
        available = self._training_availability(split, index)
        self.dataset = TrainDataset(
            cfg.data.cache, self.train_cases, available, setting=cfg.data.setting, patch_size=patch,
            augment=cfg.data.augment, seed=cfg.train.seed, spec=self.spec,
            foreground_fraction=cfg.data.foreground_fraction)
        per_iter = cfg.train.batch_size * self.dist.world_size
        self.iters_per_epoch = cfg.train.iters_per_epoch or math.ceil(len(self.train_cases) / per_iter)
        self._setup_validation(split)

    def _setup_validation(self, split) -> None:
        """The fixed val cases (checked now, so that a bad val list fails before training)."""
        from .validation import val_case_names

        try:
            self.val_names, self.val_note = val_case_names(self.cfg, split.val, self.spec)
        except PassionError as exc:
            raise ConfigError(str(exc)) from None

    def _training_availability(self, split, index: dict):
        """Each training case's mask and the counts n[m] (data/availability.py: the split's table
        AND the cache's files for idt*, complete cases for pdt); any conflict is a ConfigError."""
        from ..data.availability import genuine_availability, require_every_modality, training_availability

        setting = self.cfg.data.setting
        if setting != "pdt" and split.masks is None:
            raise ConfigError(f"data.setting={setting} needs the missing-modality table "
                              f"{self.cfg.data.split}/train_missing.csv (made by `passion split`)")
        try:
            available = training_availability(genuine_availability(index, self.spec.num_modalities),
                                              self.train_cases, split.masks, setting, self.spec.modalities)
            self.availability = available.counts()
            require_every_modality(self.availability, self.spec.modalities, quote=True, where=(
                f" of {self.cfg.data.split}; PASSION's availability weight would divide by zero"))
        except PassionError as exc:
            raise ConfigError(str(exc)) from None
        return available

    def _setup_model_and_objective(self) -> None:
        from ..method import ObjectiveModule, build_objective

        cfg = self.cfg
        seed_everything(cfg.train.seed)
        try:
            self.model = build_model_for(cfg, self.spec).to(self.device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.model.set_activation_checkpointing(cfg.train.activation_checkpointing)
        if cfg.train.compile:
            self.model.compile_stages()
        try:
            self.objective = build_objective(
                cfg.objective.name, cfg.objective, num_modalities=self.spec.num_modalities,
                modality_names=list(self.spec.modalities), availability_counts=list(self.availability),
                iters_per_epoch=self.iters_per_epoch, setting=cfg.data.setting)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.objective.all_reduce = self.dist.all_reduce_sum
        step = ObjectiveModule(self.model, self.objective)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # no device_ids: DDP would then move the batch's inputs, the host-side mask included;
            # the trainer already put each tensor where it belongs
            step = DDP(step, device_ids=None, find_unused_parameters=True)
        self.step_module = step
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
            weight_decay=t.weight_decay, amsgrad=t.amsgrad)
        self.scaler = torch.amp.GradScaler("cuda", enabled=(t.precision == "fp16"))

    # ----------------------------------------------------------------- checkpoints
    def _payload(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "config_hash": self.cfg.hash(),
            "spec": self.spec.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"type": "poly", "epoch": self.state.epoch, "power": self.cfg.train.poly_power},
            "objective": self.objective.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "epoch": self.state.epoch,
            "iteration": self.state.iteration,
            "step": self.state.step,
            "world_size": self.dist.world_size,
            "best": self.best,
            "epoch_means": self.epoch_means.state_dict(),
            "preprocess": self.preprocess,
        }

    def save(self, name: str) -> None:
        if self.dist.is_main:
            save_checkpoint(self.files.checkpoints / name, self._payload())

    def _resume(self) -> None:
        ckpt = load_checkpoint(self.files.last, map_location=self.device)
        saved = ckpt["config"]
        now = self.cfg.to_dict()
        for key in _IDENTITY_KEYS:
            if saved.get(key) != now.get(key):
                diff = [k for k in set(saved.get(key, {})) | set(now.get(key, {}))
                        if saved.get(key, {}).get(k) != now.get(key, {}).get(k)]
                raise PassionError(
                    f"checkpoint {self.files.last} was made with a different {key} config "
                    f"({', '.join(f'{key}.{k}' for k in sorted(diff))}); refusing to resume")
        if ckpt.get("world_size", 1) != self.dist.world_size:
            raise PassionError(f"checkpoint was written by {ckpt.get('world_size')} process(es), "
                               f"this run has {self.dist.world_size}; resume with the same number")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.objective.load_state_dict(ckpt["objective"])
        self.scaler.load_state_dict(ckpt["scaler"])
        restore_rng_state(ckpt["rng"])
        self.state = TrainState(epoch=ckpt["epoch"], iteration=ckpt["iteration"], step=ckpt["step"])
        self.best = ckpt.get("best")
        self.epoch_means.load_state_dict(ckpt.get("epoch_means") or EpochMeans().state_dict())
        if self.dist.is_main:
            self.metrics_log.truncate(self.state.step, self.state.epoch)
            log.info("resumed from epoch %d iteration %d", self.state.epoch, self.state.iteration)

    # ----------------------------------------------------------------- loop
    def _epoch_order(self, epoch: int) -> list[int]:
        """Case indices this rank visits in `epoch`: a seeded permutation, sharded by rank."""
        n = len(self.train_cases)
        g = np.random.default_rng([self.cfg.train.seed, epoch])
        per_rank = self.iters_per_epoch * self.cfg.train.batch_size
        total = per_rank * self.dist.world_size
        order = np.concatenate([g.permutation(n) for _ in range(math.ceil(total / n))])[:total]
        return order[self.dist.rank::self.dist.world_size].tolist()

    def _batches(self, epoch: int, start_iter: int):
        from torch.utils.data import DataLoader, Subset

        bs = self.cfg.train.batch_size
        order = self._epoch_order(epoch)[start_iter * bs:]
        self.dataset.set_epoch(epoch)
        # Starting a loader draws its workers' base seed from `generator`, by default the global
        # torch RNG; a mid-epoch resume starts one more loader than the uninterrupted run, which
        # would shift every later dropout mask. A (seed, epoch) generator leaves the global RNG alone.
        loader_rng = torch.Generator().manual_seed(self.cfg.train.seed * 100_003 + epoch)
        loader = DataLoader(
            Subset(self.dataset, order), batch_size=bs, shuffle=False, drop_last=False,
            num_workers=self.cfg.data.workers, persistent_workers=False,
            pin_memory=self.device.type == "cuda", generator=loader_rng)
        yield from loader

    def _to_device(self, batch: dict) -> dict:
        """The batch's tensors on the training device, except the availability mask: the models
        and objectives read which encoders and pairs to run from it, and on the host that costs
        no wait for the device (models.interface.host_mask)."""
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) and k != "mask" else v)
                for k, v in batch.items()}

    def train(self) -> Path:
        cfg, t = self.cfg, self.cfg.train
        total_steps = t.epochs * self.iters_per_epoch
        bar = progress(total=total_steps, desc="train", disable=not self.dist.is_main)
        bar.update(self.state.step)
        self.step_module.train()
        if self.val_note and self.dist.is_main:
            log.info(self.val_note)
        with bar:
            while self.state.epoch < t.epochs:
                epoch = self.state.epoch
                lr = poly_lr(t.lr, epoch, t.epochs, t.poly_power)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                if self.state.iteration == 0:
                    self.objective.start_epoch(epoch)
                for batch in self._batches(epoch, self.state.iteration):
                    record = self._train_step(batch, epoch, lr)
                    bar.update(1, status=f"epoch {epoch + 1}/{t.epochs} loss {record['loss']:.4f}{self.last_val}")
                    if t.checkpoint_every_iters and self.state.step % t.checkpoint_every_iters == 0 \
                            and self.state.iteration < self.iters_per_epoch:
                        self.save(self.files.last.name)
                self._end_epoch(epoch, lr, bar)
        self.metrics_log.close()
        self.dist.barrier()
        return self.run_dir

    def _train_step(self, batch: dict, epoch: int, lr: float) -> dict:
        t = self.cfg.train
        started = time.perf_counter()
        batch = self._to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, t.precision):
            out = self.step_module(batch, epoch)
        self.scaler.scale(out.loss).backward()
        self.scaler.unscale_(self.optimizer)  # the hook and clipping see true gradients (no-op unless fp16)
        out.add_stats(self.objective.after_backward(self.model, epoch))  # e.g. OGM-GE's modulation
        # the step's one device->host copy (loss and logged stats), once backward and the hook are
        # queued and before the weights change
        loss_value, stats = out.host_values()
        if not math.isfinite(loss_value):
            raise PassionError(f"loss became {loss_value} at epoch {epoch} iteration {self.state.iteration}; "
                               f"try train.precision=fp32 or a lower train.lr")
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.iteration += 1
        self.state.step += 1
        elapsed = time.perf_counter() - started
        record = {"type": "iter", "epoch": epoch, "iteration": self.state.iteration, "step": self.state.step,
                  "loss": loss_value, "lr": lr, "seconds": elapsed,
                  "samples_per_s": batch["image"].shape[0] * self.dist.world_size / max(elapsed, 1e-9)}
        record.update(stats)
        self.epoch_means.add(record)
        if self.state.step % max(1, t.log_every) == 0 or self.state.iteration == self.iters_per_epoch:
            self.metrics_log.append(record)
        return record

    def _end_epoch(self, epoch: int, lr: float, bar=None) -> None:
        stats = self.objective.end_epoch(epoch) or {}
        record = {"type": "epoch", "epoch": epoch, "step": self.state.step, "lr": lr}
        record.update(stats)
        record.update(self.epoch_means.means())
        self.epoch_means.reset()
        val = self._validate(epoch, bar)
        record.update(val)
        self.metrics_log.append(record)
        self.state.epoch += 1
        self.state.iteration = 0
        if val and is_better(val["val_score"], self.best):
            self.best = {"val_score": val["val_score"], "epoch": epoch, "step": self.state.step}
            self.save(self.files.best.name)  # before last.pt: a kill in between replays the epoch to the same decision
        self.save(self.files.last.name)
        if (epoch + 1) in set(self.cfg.train.save_epochs):
            self.save(self.files.checkpoint(epoch + 1).name)
        log.info("epoch %d done: %s", epoch, {k: v for k, v in record.items() if not isinstance(v, dict)})

    def _validate(self, epoch: int, bar=None) -> dict:
        """Validation fields of the epoch record (empty when this epoch does not validate).

        Rank 0 validates with the unwrapped model while the other ranks wait; the result is
        broadcast so that every rank holds the same best score."""
        t = self.cfg.train
        if not self.val_names or not is_validation_epoch(epoch, t.epochs, t.val_every):
            return {}
        result: dict = {}
        if self.dist.is_main:
            from .validation import validate

            status = None
            if bar is not None:
                status = lambda text: bar.set_status(f"epoch {epoch + 1}/{t.epochs} {text}")  # noqa: E731
            result = validate(self.model, self.cfg.data.cache, self.val_names, self.spec,
                              roi_size=self.cfg.model.patch_size, subsets=t.val_subsets,
                              overlap=self.cfg.eval.overlap, sw_batch_size=self.cfg.eval.sw_batch_size or 1,
                              device=self.device, precision=t.precision, status=status)
        result = self.dist.broadcast_object(result)
        mean = result["val_dice"]["mean"]
        self.last_val = " | val " + " ".join(f"{r} {v:.2f}" for r, v in mean.items() if v is not None)
        if self.dist.is_main:
            log.info("epoch %d validation on %d cases: score %s, mean Dice over subsets %s, full subset %s",
                     epoch, result["val_cases"], result["val_score"], mean, result["val_dice"]["full"])
        return result

    def close(self) -> None:
        shutdown(self.dist)


def train(cfg: Config, resume: bool = False, force: bool = False) -> Path:
    """Train a model as `cfg` says; returns the run directory. The Python API under `passion train`."""
    trainer = Trainer(cfg, resume=resume, force=force)
    handler = None
    try:
        handler = attach_text_log(trainer.run_dir, trainer.dist.is_main)
        note = warn_if_slow_precision(trainer.device, cfg.train.precision) if trainer.dist.is_main else None
        if note:
            log.warning(note)
        return trainer.train()
    finally:
        trainer.close()
        if handler is not None:  # a later run in this process (the demo's second objective) logs elsewhere
            log.removeHandler(handler)
            handler.close()

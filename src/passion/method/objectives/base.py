"""The objective base: the protocol every training objective implements, its options and its stats.

An objective turns (model, batch, epoch) into a loss plus named statistics and owns any
state that outlives a step (PASSION's beta, DWA's loss history, PMR's prototypes). It talks
to the model only through the backbone contract (encode / fuse / decode_single), so it works
with every backbone. A new objective is one module: an options dataclass, a class with the
``register_objective`` decorator, and the ``stats`` it logs (how the report shows them).

Every hook the trainer calls is declared here with a default, so the trainer calls them all
unconditionally. Under DDP, call the objective inside the wrapped module's forward (see
ObjectiveModule); every statistic that decides a weight goes through the injectable
``all_reduce`` (a sum across ranks), so all ranks make identical decisions.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ...config import ConfigError, ObjectiveConfig
from ..preference import AllReduce, availability_weights, identity_all_reduce

Stats = dict[str, Any]

# the report figure that shows a per-modality statistic per iteration (report/compare.py)
TRAINING_CURVES = "training_curves"


@dataclass
class PendingStats:
    """Logged values still on the step's device: one flat tensor and how to name its numbers.

    Reading them waits for the device, so the trainer reads them once per step, after the
    backward pass (``ObjectiveOutput.host_values``): on a GPU the forward and backward kernels
    are queued without a stop in between.
    """

    values: Tensor
    name: Callable[[list[float]], Stats]


@dataclass
class ObjectiveOutput:
    """loss: scalar to backpropagate; stats: JSON-ready floats and {modality name: float} maps,
    given as such or as PendingStats, which are copied to the host when first read."""

    loss: Tensor
    pending_stats: Stats | PendingStats = field(default_factory=dict)
    _more: list = field(default_factory=list, init=False, repr=False)
    _read: tuple[float, Stats] | None = field(default=None, init=False, repr=False)

    @property
    def stats(self) -> Stats:
        return self.host_values()[1]

    def add_stats(self, more: Stats | PendingStats | None) -> None:
        """Stats of a later hook of the same step (``Objective.after_backward``), read with these."""
        if more:
            self._more.append(more)
            self._read = None

    def host_values(self) -> tuple[float, Stats]:
        """(the loss as a float, the stats): one device->host copy for the loss and every pending value."""
        if self._read is None:
            parts = [self.pending_stats, *self._more]
            pending = [p for p in parts if isinstance(p, PendingStats)]
            flat = torch.cat([self.loss.detach().float().reshape(1)]
                             + [p.values.detach().float().reshape(-1).to(self.loss.device) for p in pending])
            values = flat.cpu().tolist()
            stats: Stats = {}
            pos = 1
            for p in parts:
                if isinstance(p, PendingStats):
                    n = p.values.numel()
                    p = p.name(values[pos:pos + n])
                    pos += n
                stats.update(p)
            self._read = (values[0], stats)
        return self._read


# ---------------------------------------------------------------- how stats are shown

@dataclass(frozen=True)
class StatInfo:
    """How the report shows one logged statistic.

    label: display name with its unit or role ("sep loss", "task-wise weight β");
    figure: "" (logged only), TRAINING_CURVES (a per-modality curve per iteration), or the name
    of a per-epoch figure the objective declares in ``figures`` (per modality, per epoch);
    zero_line: draw y = 0 (signed quantities).
    """

    label: str
    figure: str = ""
    zero_line: bool = False


@dataclass(frozen=True)
class FigureInfo:
    """A per-epoch report figure (written as <name>.png): its section heading and alt text."""

    heading: str
    alt: str


# ---------------------------------------------------------------- options

class Options:
    """Base of every objective's options dataclass: typed fields with defaults, plus ``rules``.

    parse_options converts each value to its field's annotated type (``int | None`` allows
    null) and then checks the rules in order; errors are one line naming the key.
    """

    def rules(self) -> Iterable[tuple[str, bool, str]]:
        """(key, is valid, what it must be); evaluated lazily, so later rules may assume earlier ones."""
        return ()


@dataclass
class NoOptions(Options):
    """For objectives without hyper-parameters."""


@dataclass
class ModulationWindow(Options):
    """Options of an objective that acts only in the epochs [modulation_starts, modulation_ends)."""

    modulation_starts: int = 0
    modulation_ends: int | None = None  # null: never stop

    def rules(self):
        yield "modulation_starts", self.modulation_starts >= 0, "must be >= 0"
        yield ("modulation_ends", self.modulation_ends is None or self.modulation_ends > self.modulation_starts,
               "must be > modulation_starts (or null for no end)")

    def modulating(self, epoch: int) -> bool:
        return epoch >= self.modulation_starts and (self.modulation_ends is None or epoch < self.modulation_ends)


def boolean(value) -> bool:
    """YAML/CLI booleans: true/false, yes/no, 1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(value)


_KINDS: dict[str, Callable[[Any], Any]] = {"float": float, "int": int, "str": str, "bool": boolean}
_KIND_NAMES = {"bool": "true or false"}


def _kind_of(annotation: str) -> tuple[Callable[[Any], Any], str, bool]:
    """'int | None' -> (converter, name for errors, null allowed); annotations may be strings (postponed) or types."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in text.split("|")]
    optional = "None" in parts
    base = [p for p in parts if p != "None"]
    if len(base) != 1 or base[0] not in _KINDS:
        raise TypeError(f"option type {annotation!r} is not one of {', '.join(_KINDS)} (optionally | None)")
    return _KINDS[base[0]], _KIND_NAMES.get(base[0], base[0]), optional


def option_names(options_type: type[Options]) -> list[str]:
    return [f.name for f in dataclasses.fields(options_type)]


def parse_options(options_type: type[Options], values: Mapping[str, Any] | None, objective: str,
                  where: str = "objective.options") -> Options:
    """Build ``options_type`` from a mapping: unknown keys, wrong types and broken rules fail with one line."""
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(values).__name__}")
    known = option_names(options_type)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"objective {objective!r} has no option(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known)) or 'none'}")
    kwargs = {}
    for f in dataclasses.fields(options_type):
        if f.name not in values:
            continue
        convert, kind, optional = _kind_of(f.type)
        value = values[f.name]
        if value is None and optional:
            kwargs[f.name] = None
            continue
        try:
            kwargs[f.name] = convert(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.{f.name} must be {kind}, got {value!r}") from None
    options = options_type(**kwargs)
    for key, ok, what in options.rules():
        if not ok:
            raise ConfigError(f"{where}.{key} {what}, got {getattr(options, key)!r}")
    return options


# ---------------------------------------------------------------- the protocol

class Objective(abc.ABC):
    """Base of all objectives: modality names, setting, availability weights, options, all_reduce hook."""

    name: ClassVar[str] = ""
    options_type: ClassVar[type[Options]] = NoOptions
    # what the objective logs and how the report shows it; keys shared by several objectives
    # must be described identically (checked at registration)
    stats: ClassVar[dict[str, StatInfo]] = {}
    figures: ClassVar[dict[str, FigureInfo]] = {}

    def __init__(self, cfg: ObjectiveConfig, num_modalities: int, modality_names: Sequence[str],
                 availability_counts: Sequence[int], iters_per_epoch: int, setting: str,
                 all_reduce: AllReduce | None = None):
        if len(modality_names) != num_modalities:
            raise ConfigError(f"objective: {len(modality_names)} modality names for {num_modalities} modalities")
        self.cfg = cfg
        self.num_modalities = num_modalities
        self.modality_names = list(modality_names)
        self.setting = setting
        self.weights = availability_weights(list(availability_counts), iters_per_epoch,
                                            self.modality_names, setting)
        self.all_reduce: AllReduce = all_reduce or identity_all_reduce
        self.options = self.read_options(cfg)

    @classmethod
    def read_options(cls, cfg: ObjectiveConfig) -> Options:
        """This objective's options from ``objective.options``. An objective without options ignores
        them, so one config can drive `passion compare` over such objectives and one that has them."""
        if cls.options_type is NoOptions:
            return NoOptions()
        return parse_options(cls.options_type, cfg.options, cls.name)

    @abc.abstractmethod
    def __call__(self, model: nn.Module, batch: dict[str, Tensor], epoch: int) -> ObjectiveOutput: ...

    def after_backward(self, model: nn.Module, epoch: int) -> Stats | PendingStats | None:
        """Hook between backward and the optimiser step, on unscaled gradients (gradient-modulating
        objectives such as OGM-GE); returns extra stats for the step (read with the step's own,
        ``ObjectiveOutput.add_stats``) or None. No-op by default."""
        return None

    def start_epoch(self, epoch: int) -> None:
        """Hook before the first step of an epoch (no-op by default)."""

    def end_epoch(self, epoch: int) -> Stats:
        """Hook after the last step of an epoch; returns per-epoch statistics."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned (nothing by default)."""

    def in_warmup(self, epoch: int) -> bool:
        return epoch < int(self.cfg.warmup_epochs)

    def per_modality(self, values: Sequence[float]) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.modality_names, values)}


# ---------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Objective]] = {}


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    def deco(cls: type[Objective]) -> type[Objective]:
        catalogue, figures = stat_catalogue()
        for key, info in cls.stats.items():
            if key in catalogue and catalogue[key] != info:
                raise TypeError(f"objective {name!r} describes stat {key!r} as {info}, another objective "
                                f"as {catalogue[key]}; a stat name means one thing")
            if info.figure not in ("", TRAINING_CURVES) and info.figure not in {**figures, **cls.figures}:
                raise TypeError(f"objective {name!r}: stat {key!r} names undeclared figure {info.figure!r}")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def list_objectives() -> list[str]:
    return sorted(_REGISTRY)


def objective_class(name: str) -> type[Objective]:
    if name not in _REGISTRY:
        raise ConfigError(f"objective.name must be one of {', '.join(list_objectives())}, got {name!r}")
    return _REGISTRY[name]


def stat_catalogue() -> tuple[dict[str, StatInfo], dict[str, FigureInfo]]:
    """Every registered objective's stats and per-epoch figures, in registration order."""
    stats: dict[str, StatInfo] = {}
    figures: dict[str, FigureInfo] = {}
    for cls in _REGISTRY.values():
        for key, info in cls.stats.items():
            stats.setdefault(key, info)
        for key, fig in cls.figures.items():
            figures.setdefault(key, fig)
    return stats, figures


def build_objective(name: str, cfg: ObjectiveConfig, num_modalities: int, modality_names: Sequence[str],
                    availability_counts: Sequence[int], iters_per_epoch: int, setting: str,
                    all_reduce: AllReduce | None = None) -> Objective:
    """Build a registered objective; unknown names, bad options and absent modalities fail with one line."""
    return objective_class(name)(cfg, num_modalities, modality_names, availability_counts,
                                 iters_per_epoch, setting, all_reduce=all_reduce)


class ObjectiveModule(nn.Module):
    """Backbone + objective as one module, so DDP's forward wraps the whole loss computation.

    DDP only synchronises gradients correctly when the graph is built inside its forward;
    the objective calls encode/fuse/decode_single directly, so wrap this module instead.
    """

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, Tensor], epoch: int) -> ObjectiveOutput:
        return self.objective(self.model, batch, epoch)


def flatten_stats(stats: Stats, sep: str = "/") -> dict[str, float]:
    """{"sep": {"flair": x}} -> {"sep/flair": x}: for TensorBoard-like scalar sinks."""
    flat: dict[str, float] = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            flat.update({f"{key}{sep}{k}": float(v) for k, v in value.items()})
        else:
            flat[key] = float(value)
    return flat

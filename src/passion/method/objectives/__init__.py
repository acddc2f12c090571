"""Training objectives behind one interface: the base protocol (base.py), the segmentation terms they
share (terms.py) and one module per objective. Importing the package registers every objective."""
from .base import (TRAINING_CURVES, FigureInfo, NoOptions, Objective, ObjectiveModule, ObjectiveOutput, Options,
                   StatInfo, Stats, boolean, build_objective, flatten_stats, list_objectives, objective_class,
                   option_names, parse_options, register_objective, stat_catalogue)
from .baseline import BaselineObjective
from .passion import PassionObjective, PassionOptions
from .loss_balancers import DWAObjective, DWAOptions, UncertaintyObjective, UncertaintyOptions
from .ogm_ge import OGMGEObjective, OGMGEOptions
from .pmr import PMRObjective, PMROptions

__all__ = [
    "TRAINING_CURVES", "BaselineObjective", "DWAObjective", "DWAOptions", "FigureInfo", "NoOptions",
    "OGMGEObjective", "OGMGEOptions", "Objective", "ObjectiveModule", "ObjectiveOutput", "Options",
    "PMRObjective", "PMROptions", "PassionObjective", "PassionOptions", "StatInfo", "Stats",
    "UncertaintyObjective", "UncertaintyOptions", "boolean", "build_objective", "flatten_stats",
    "list_objectives", "objective_class", "option_names", "parse_options", "register_objective",
    "stat_catalogue",
]

"""Training objectives (baseline, PASSION) and their losses; see METHOD.md sections 4-5."""
from .objective import (BaselineObjective, Objective, ObjectiveModule, ObjectiveOutput, PassionObjective,
                        build_objective, flatten_stats, list_objectives, register_objective)
from .preference import PreferenceState, availability_weights
from .loss_balancers import DWAObjective, UncertaintyObjective
from .ogm_ge import OGMGEObjective
from .pmr import PMRObjective

__all__ = [
    "BaselineObjective", "DWAObjective", "OGMGEObjective", "Objective", "ObjectiveModule", "ObjectiveOutput",
    "PMRObjective", "PassionObjective", "UncertaintyObjective",
    "PreferenceState", "availability_weights", "build_objective", "flatten_stats", "list_objectives",
    "register_objective",
]

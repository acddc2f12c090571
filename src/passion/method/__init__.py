"""Training objectives and their losses; see METHOD.md sections 4-5 and method/objectives/."""
from .objectives import (BaselineObjective, DWAObjective, OGMGEObjective, Objective, ObjectiveModule,
                         ObjectiveOutput, PassionObjective, PMRObjective, UncertaintyObjective, build_objective,
                         flatten_stats, list_objectives, register_objective)
from .preference import PreferenceState, availability_weights

__all__ = [
    "BaselineObjective", "DWAObjective", "OGMGEObjective", "Objective", "ObjectiveModule", "ObjectiveOutput",
    "PMRObjective", "PassionObjective", "UncertaintyObjective",
    "PreferenceState", "availability_weights", "build_objective", "flatten_stats", "list_objectives",
    "register_objective",
]

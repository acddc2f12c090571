"""Training objectives (baseline, PASSION) and their losses; see METHOD.md sections 4-5."""
from .objective import (BaselineObjective, Objective, ObjectiveModule, ObjectiveOutput, PassionObjective,
                        build_objective, flatten_stats, list_objectives, register_objective)
from .preference import PreferenceState, availability_weights

__all__ = [
    "BaselineObjective", "Objective", "ObjectiveModule", "ObjectiveOutput", "PassionObjective",
    "PreferenceState", "availability_weights", "build_objective", "flatten_stats", "list_objectives",
    "register_objective",
]

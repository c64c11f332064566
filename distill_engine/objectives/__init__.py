"""The objective registry. Importing this package registers every built-in objective."""

from .base import (OBJECTIVES, Objective, ObjectiveConfig, ObjectiveError, TapShapes,
                   build_objective, register)
from . import cross_entropy, feature, relation  # noqa: F401  (registration)

__all__ = ["OBJECTIVES", "Objective", "ObjectiveConfig", "ObjectiveError", "TapShapes",
           "build_objective", "register"]

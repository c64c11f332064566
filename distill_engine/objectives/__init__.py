"""The objective registry. Importing this package imports every module in it, and so
registers every objective: a new objective is a new module here, with no list to edit."""

import importlib
import pkgutil

from .base import (MASK_SEED, OBJECTIVES, RECORDED_TAPS, Objective, ObjectiveConfig, ObjectiveError,
                   StudentPass, TapNeed, TapShapes, build_objective, objective_kind_problem, register)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["MASK_SEED", "OBJECTIVES", "Objective", "ObjectiveConfig", "ObjectiveError",
           "RECORDED_TAPS", "StudentPass", "TapNeed", "TapShapes", "build_objective",
           "objective_kind_problem", "register"]

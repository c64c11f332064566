"""Model families, one module each; importing this package registers every one of them
(a new family is a new module here, found without editing any list)."""

import importlib
import pkgutil

from .base import FAMILIES, InputShape, ModelFamily, ModelRecipe, arch_problem, register_family

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FAMILIES", "InputShape", "ModelFamily", "ModelRecipe", "arch_problem", "register_family"]

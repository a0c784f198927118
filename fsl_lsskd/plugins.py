"""Discovery of registered components: importing a package imports every module in it, so adding a
dataset, method or evaluator is adding one file that registers one class."""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

_PACKAGES = ("fsl_lsskd.data", "fsl_lsskd.backbones", "fsl_lsskd.methods", "fsl_lsskd.eval")


def import_submodules(package: str) -> None:
    """Import every non-private module of ``package`` (runs their ``@register`` decorators)."""
    pkg: ModuleType = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def load_all() -> None:
    """Populate every registry."""
    for package in _PACKAGES:
        import_submodules(package)

"""Name -> component registries for datasets, backbones, methods and readouts; they fill themselves.

A component is added by ONE file in its package that decorates one class with
``@REGISTRY.register("name")``. Each registry knows its package: the first lookup (``get``, ``names``,
``in``, iteration) imports every public module of that package (names without a leading underscore), so
there is no list of modules or names to edit anywhere. Looking up an unknown name raises
:class:`~fsl_lsskd.errors.UnknownNameError` naming the closest valid name and listing all of them.

Backbones are timm models: the few-shot standards register in timm's own registry (``@register_model``)
and in :data:`BACKBONES`, which lists them for ``fsl-bench ls``; any other timm CNN name is accepted by
:func:`fsl_lsskd.backbones.create_backbone`.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
import threading
from typing import Callable, Dict, Generic, Iterator, List, Optional, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


def import_submodules(package: str) -> None:
    """Import every public (non-underscore) module of ``package``, running their ``@register`` decorators."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


class Registry(Generic[T]):
    """A named registry of components of one ``kind`` ("method", "dataset", ...), filled by importing
    ``package`` on first use."""

    def __init__(self, kind: str, package: Optional[str] = None) -> None:
        self.kind = kind
        self.package = package
        self._items: Dict[str, T] = {}
        self._loaded = package is None
        self._lock = threading.RLock()

    def _load(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if not self._loaded:
                self._loaded = True  # set first: modules of the package may look names up while importing
                try:
                    import_submodules(self.package)
                except BaseException:
                    self._loaded = False
                    raise

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name`` (a second, different object under one name is an error)."""
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            try:
                setattr(obj, "registry_name", name)
            except (AttributeError, TypeError):  # functions/builtins that refuse attributes
                pass
            return obj

        return deco

    def get(self, name: str) -> T:
        """The component registered as ``name``; :class:`UnknownNameError` lists the valid names."""
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str, also: str = "") -> str:
        """``unknown <kind> 'x'. Did you mean 'y'? Valid <kind>s: ...`` (``also``: extra valid names, e.g.
        "or any timm CNN name")."""
        self._load()
        close = difflib.get_close_matches(str(name), self._items, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {', '.join(sorted(self._items))}{also}"

    def names(self) -> List[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._items)


DATASETS: Registry = Registry("dataset", "fsl_lsskd.data")
METHODS: Registry = Registry("method", "fsl_lsskd.methods")
READOUTS: Registry = Registry("readout", "fsl_lsskd.eval")
BACKBONES: Registry = Registry("backbone", "fsl_lsskd.backbones")

ALL = {"datasets": DATASETS, "backbones": BACKBONES, "methods": METHODS, "readouts": READOUTS}


def check_names(*, where: str = "", **names_by_kind) -> None:
    """Raise :class:`UnknownNameError` for the first unregistered name, e.g.
    ``check_names(methods=["ce"], readouts=["protonet"], where="bench.yaml: `methods`")``; ``where`` prefixes
    the message. Backbones also accept any timm CNN name (:func:`fsl_lsskd.backbones.check_backbone_name`)."""
    prefix = f"{where}: " if where else ""
    for kind, names in names_by_kind.items():
        for name in names or ():
            if kind == "backbones" and is_backbone_name(name):
                continue
            try:
                ALL[kind].get(name)
            except UnknownNameError:
                also = TIMM_HINT if kind == "backbones" else ""
                raise UnknownNameError(f"{prefix}{ALL[kind].unknown_message(name, also=also)}") from None


TIMM_HINT = (", or any timm CNN name (e.g. resnet18, efficientnet_b0; list them with "
             "`python -c \"import timm; print(timm.list_models())\"`)")


def is_backbone_name(name: str) -> bool:
    """A registered few-shot backbone or any timm model name (whether a timm model is a usable CNN is decided
    by :func:`fsl_lsskd.backbones.create_backbone`)."""
    import timm

    return name in BACKBONES or timm.is_model(name)

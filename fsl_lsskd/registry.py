"""Name -> component registries for datasets, backbones, methods and readouts; they fill themselves.

A component is added by ONE file in its package that decorates one class with
``@REGISTRY.register("name")``. Each registry knows its package and finds its names without importing anything:
it reads the source of every public module of the package (names without a leading underscore) for
``REGISTRY.register("literal name")`` calls, so there is no list of modules or names to edit anywhere, and
listing names, checking a name and naming the valid ones in an error cost milliseconds (the components import
torch, timm and learn2learn). ``get(name)`` imports the one module that registers ``name``.
``tests/test_registry_cli.py`` checks that the names found in the sources are exactly what importing every
module registers. Looking up an unknown name raises :class:`~fsl_lsskd.errors.UnknownNameError` naming the
closest valid name and listing all of them.

Backbones are timm models: the few-shot standards register in timm's own registry (``@register_model``)
and in :data:`BACKBONES`, which lists them for ``fsl-bench ls``; any other timm CNN name is accepted by
:func:`fsl_lsskd.backbones.create_backbone`.
"""
from __future__ import annotations

import ast
import difflib
import functools
import importlib
import importlib.util
import json
import pkgutil
import threading
from pathlib import Path
from typing import Callable, Dict, FrozenSet, Generic, Iterator, List, Optional, Tuple, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


def import_submodules(package: str) -> None:
    """Import every public (non-underscore) module of ``package``, running their ``@register`` decorators."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def registered_in_source(package: str, symbol: str) -> Dict[str, str]:
    """``{name: module}`` of every ``symbol.register("name")`` call in the public modules of ``package``, read
    from their source files; nothing is imported but ``package``'s parent (``fsl_lsskd``)."""
    spec = importlib.util.find_spec(package)  # imports the parent package only, not ``package`` itself
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not a package")
    found: Dict[str, str] = {}
    for info in pkgutil.iter_modules(spec.submodule_search_locations):
        if info.name.startswith("_"):
            continue
        module = f"{package}.{info.name}"
        mod_spec = info.module_finder.find_spec(module)  # the file, without importing the package
        if mod_spec is None or not mod_spec.origin or not mod_spec.origin.endswith(".py"):
            continue
        source = Path(mod_spec.origin).read_text(encoding="utf-8")
        if f"{symbol}.register(" not in source:
            continue
        for node in ast.walk(ast.parse(source, filename=mod_spec.origin)):
            registered = _registered_name(node, symbol)
            if registered is not None:
                found[registered] = module
    return found


def _registered_name(node: ast.AST, symbol: str) -> Optional[str]:
    """``"name"`` when ``node`` is a ``symbol.register("name")`` call (a string literal), else None."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == symbol and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return node.args[0].value
    return None


_MISSING = object()  # not decidable from the source: import
_DEFAULT = object()  # decided: the class chain reaches the package's base class without assigning it


class _NameRef(str):
    """A class attribute assigned a bare name in the source (``config_cls = CEConfig``)."""


@functools.lru_cache(maxsize=None)
def _package_classes(package: str, symbol: str) -> Tuple[Dict[str, Optional[ast.ClassDef]], Dict[str, ast.ClassDef]]:
    """``({class name: its AST, or None when two modules define it}, {registered name: its class's AST})`` of
    every module of ``package``, parsed once from the sources (nothing imported)."""
    spec = importlib.util.find_spec(package)
    classes: Dict[str, ast.ClassDef] = {}
    registered: Dict[str, ast.ClassDef] = {}
    for path in sorted(Path(p) for loc in spec.submodule_search_locations for p in Path(loc).glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            classes[node.name] = None if node.name in classes else node  # a name defined twice: ambiguous
            for deco in node.decorator_list:
                name = _registered_name(deco, symbol)
                if name is not None:
                    registered[name] = node
    return classes, registered


def _static_class_constant(package: str, symbol: str, name: str, attr: str):
    """The literal ``attr`` of the class that ``symbol.register(name)`` decorates, following its single base
    through the classes the package's modules define (sources only); :data:`_DEFAULT` when the
    chain ends at a class without bases that never assigns ``attr``; :data:`_MISSING` when it cannot be decided
    from the source (a non-literal value, several bases, a base defined elsewhere)."""
    classes, registered = _package_classes(package, symbol)
    node, seen = registered.get(name), set()
    while node is not None and node.name not in seen:
        seen.add(node.name)
        for stmt in node.body:
            target = (stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else
                      stmt.target if isinstance(stmt, ast.AnnAssign) and stmt.value is not None else None)
            if isinstance(target, ast.Name) and target.id == attr:
                if isinstance(stmt.value, ast.Name):  # e.g. ``config_cls = CEConfig``: resolved by the caller
                    return _NameRef(stmt.value.id)
                try:
                    return ast.literal_eval(stmt.value)
                except ValueError:
                    return _MISSING
        bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
        if len(bases) != len(node.bases) or len(bases) > 1:
            return _MISSING
        if not bases:
            return _DEFAULT
        node = classes.get(bases[0])
    return _MISSING


class Registry(Generic[T]):
    """A named registry of components of one ``kind`` ("method", "dataset", ...) registered by the modules of
    ``package`` through the module-level name ``symbol`` (``METHODS``): names come from the sources
    (:func:`registered_in_source`), a component from importing its module on first :meth:`get`."""

    def __init__(self, kind: str, package: Optional[str] = None, symbol: Optional[str] = None,
                 light_module: Optional[str] = None) -> None:
        self.kind = kind
        #: a torch-free module of the package whose top-level classes :meth:`class_constant` may import (the
        #: methods' config dataclasses: ``fsl_lsskd.methods.configs``)
        self.light_module = light_module
        self.package = package
        self.symbol = symbol
        self._items: Dict[str, T] = {}
        self._modules: Optional[Dict[str, str]] = None if package else {}
        self._lock = threading.RLock()
        self._constants: Dict[tuple, object] = {}

    def modules(self) -> Dict[str, str]:
        """``{name: module that registers it}`` from the package's sources (read once)."""
        if self._modules is None:
            with self._lock:
                if self._modules is None:
                    self._modules = registered_in_source(self.package, self.symbol)
        return self._modules

    def load_all(self) -> None:
        """Import every public module of the package (what registers is then in the registry)."""
        if self.package:
            import_submodules(self.package)

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
        """The component registered as ``name`` (importing its module); :class:`UnknownNameError` lists the valid
        names."""
        if name not in self._items and name in self.modules():
            importlib.import_module(self.modules()[name])
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def class_constant(self, name: str, attr: str, default=None):
        """Class attribute ``attr`` of the component registered as ``name``, read from its module's source when
        the class (or a base class defined in the package) assigns it a literal (``needs_teacher = True``) or a
        class of :attr:`light_module` (``config_cls = CEConfig``), so that planning a grid and computing training
        identities need no torch import; otherwise the attribute of the imported component (any other value, or
        one inherited from outside the package), ``default`` when it has none.
        ``tests/test_cli_startup.py`` checks that both ways agree for every registered name. Raises
        :class:`UnknownNameError` for an unknown ``name``."""
        if name not in self:
            raise UnknownNameError(self.unknown_message(name))
        if name not in self._items and self.package:
            key = (name, attr)
            if key not in self._constants:
                self._constants[key] = _static_class_constant(self.package, self.symbol, name, attr)
            found = self._constants[key]
            if isinstance(found, _NameRef):
                found = self._light_name(found)
            if found is not _MISSING:
                return default if found is _DEFAULT else found
        return getattr(self.get(name), attr, default)

    def _light_name(self, name: str):
        """``name`` from :attr:`light_module` (imported: it is torch-free), :data:`_MISSING` when it has none."""
        if not self.light_module:
            return _MISSING
        return getattr(importlib.import_module(self.light_module), name, _MISSING)

    def unknown_message(self, name: str, also: str = "") -> str:
        """``unknown <kind> 'x'. Did you mean 'y'? Valid <kind>s: ...`` (``also``: extra valid names, e.g.
        "or any timm CNN name")."""
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {', '.join(names)}{also}"

    def names(self) -> List[str]:
        """Every registered name, sorted (nothing is imported)."""
        return sorted(set(self.modules()) | set(self._items))

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self.modules()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


DATASETS: Registry = Registry("dataset", "fsl_lsskd.data", "DATASETS")
METHODS: Registry = Registry("method", "fsl_lsskd.methods", "METHODS", light_module="fsl_lsskd.methods.configs")
READOUTS: Registry = Registry("readout", "fsl_lsskd.eval", "READOUTS", light_module="fsl_lsskd.eval.configs")
BACKBONES: Registry = Registry("backbone", "fsl_lsskd.backbones", "BACKBONES")

ALL = {"datasets": DATASETS, "backbones": BACKBONES, "methods": METHODS, "readouts": READOUTS}


def check_names(*, where: str = "", **names_by_kind) -> None:
    """Raise :class:`UnknownNameError` for the first unregistered name, e.g.
    ``check_names(methods=["ce"], readouts=["protonet"], where="bench.yaml: `methods`")``; ``where`` prefixes
    the message. Backbones also accept any timm CNN name (:func:`fsl_lsskd.backbones.check_backbone_name`).
    Imports no component."""
    prefix = f"{where}: " if where else ""
    for kind, names in names_by_kind.items():
        for name in names or ():
            if name in ALL[kind] or (kind == "backbones" and is_backbone_name(name)):
                continue  # nothing imported for a registered name (timm only for an unregistered backbone)
            also = TIMM_HINT if kind == "backbones" else ""
            raise UnknownNameError(f"{prefix}{ALL[kind].unknown_message(name, also=also)}")


TIMM_HINT = (", or any timm CNN name (e.g. resnet18, efficientnet_b0; list them with "
             "`python -c \"import timm; print(timm.list_models())\"`)")


def is_backbone_name(name: str) -> bool:
    """A registered few-shot backbone or any timm model name (whether a timm model is a usable CNN is decided
    by :func:`fsl_lsskd.backbones.create_backbone`). Imports nothing for a registered name, and timm only when
    :func:`timm_model_names` has no cached list for the installed timm."""
    if name in BACKBONES:
        return True
    return str(name).split(".", 1)[0] in timm_model_names()  # timm.is_model: the name without a pretrained tag


def timm_model_names() -> FrozenSet[str]:
    """timm's architecture names (``timm.list_models()``), cached per timm version in
    ``$FSL_BENCH_CACHE/timm/models-<version>.json``, so a backbone name is checked without importing timm and
    torch (seconds) once the cache exists; the first call imports timm and writes it (or only reads, when the
    cache directory cannot be written)."""
    from importlib import metadata

    from .utils import atomic_write_text, cache_dir

    try:
        version = metadata.version("timm")
    except metadata.PackageNotFoundError:
        version = None
    path = cache_dir() / "timm" / f"models-{version}.json" if version else None
    if path is not None and path.is_file():
        try:
            return frozenset(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass  # unreadable or half-written by an old version: rebuilt below
    import timm

    names = frozenset(timm.list_models())
    if path is not None and getattr(timm, "__version__", version) == version:
        try:
            atomic_write_text(path, json.dumps(sorted(names)))
        except OSError:
            pass
    return names

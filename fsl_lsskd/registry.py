"""Name -> class registries for datasets, backbones, methods and evaluators.

A component is added by decorating one class with ``@REGISTRY.register("name")``;
looking up an unknown name raises :class:`~fsl_lsskd.errors.UnknownNameError` listing the valid names.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Generic, Iterator, List, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named registry; ``kind`` is used in error messages ("method", "dataset", ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
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
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


DATASETS: Registry = Registry("dataset")
METHODS: Registry = Registry("method")
EVALUATORS: Registry = Registry("evaluator")
# Backbones live in timm's own registry; this list records the few-shot standards we register there.
BACKBONES: Registry = Registry("backbone")

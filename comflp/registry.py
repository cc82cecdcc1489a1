"""Registries: one per idea (model types, proposal scores, searches, rules), names given once.

A registry maps a config string to an entry, as ESPnet's ``ClassChoices`` and WeNet's
config-string tables do. An entry registers itself where it is defined
(``@MODEL_TYPES.register("hf")``); a registry made with ``package`` imports every module of
that package the first time it is read, so adding an entry is one new module there and
nothing else (docs/DESIGN.md, "Adding a model type, a score, a search").
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from comflp.errors import InputError

T = TypeVar("T")


class UnknownChoice(InputError):
    """A name that is not in a registry; the message lists the names that are."""


class Registry(Generic[T]):
    """Names -> entries of one kind: in registration order, or sorted by name for a registry
    filled by its package's modules (whose import order depends on who imports them first)."""

    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self.package = package
        self._entries: dict[str, T] = {}
        self._discovered = package is None

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated class or function under ``name``."""

        def add(entry: T) -> T:
            self.add(name, entry)
            return entry

        return add

    def add(self, name: str, entry: T) -> None:
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        module = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(module.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> tuple[str, ...]:
        self._discover()
        return tuple(sorted(self._entries) if self.package else self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __getitem__(self, name: str) -> T:
        self._discover()
        if name not in self._entries:
            raise UnknownChoice(
                f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}"
            )
        return self._entries[name]

    def check(self, names: list[str] | tuple[str, ...], option: str) -> None:
        """UnknownChoice naming ``option`` unless every name is registered."""
        bad = [n for n in names if n not in self]
        if bad:
            raise UnknownChoice(
                f"{option}: unknown {self.kind} {', '.join(bad)}; choose from {', '.join(self.names())}"
            )

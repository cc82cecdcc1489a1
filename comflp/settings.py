"""Typed settings: one dataclass per stage holds each option's default and help text, once.

A ``bin/`` entry point builds its command line from its stage's dataclass
(:func:`add_settings`) and turns the parsed arguments back into it (:func:`from_args`); every
field ``name`` becomes ``--name``, the same name run.sh uses, and ``tests/test_settings.py``
checks run.sh's defaults against these (docs/DESIGN.md, "Settings").

Field types understood: ``int``, ``float``, ``str``, ``bool`` (``true``/``false``), ``Path``,
their ``| None`` forms, and ``list[int]``/``list[str]`` (one or more values, each of which may
hold several separated by spaces, as run.sh passes them: ``--num_prune "2 4 6"``; a list option
given twice collects both, as ``--set a=1 --set b=2`` should).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

REQUIRED: Any = dataclasses.MISSING


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    aliases: tuple[str, ...] = (),
    low: float | None = None,
) -> Any:
    """A settings field: its default (:data:`REQUIRED` for none), help text, allowed values
    (or a function giving them, e.g. a registry's names), other option strings and, for a
    number, its smallest allowed value."""
    meta = {"help": help, "choices": choices, "aliases": aliases, "low": low}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def str2bool(value: str) -> bool:
    v = value.lower()
    if v in ("true", "yes", "1"):
        return True
    if v in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the type without ``| None``, whether it is a list)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _parse_type(base: Any, low: float | None = None) -> Callable[[str], Any]:
    if base is bool:
        return str2bool
    if low is None:
        return base

    def bounded(text: str) -> Any:
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if base is int else 'a number'}, got {text!r}"
            ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {text}")
        return value

    return bounded


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


def add_settings(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--name`` option per field of the settings dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        base, is_list = _base_type(hints[f.name])
        choices = f.metadata.get("choices")
        default = _default(f)
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "help": f.metadata.get("help", "")
            + ("" if default is REQUIRED else f" (default: {_show(default)})"),
            "required": default is REQUIRED,
            "type": str if is_list else _parse_type(base, f.metadata.get("low")),
        }
        if default is not REQUIRED:
            kwargs["default"] = None if is_list else default
        if is_list:
            kwargs.update(nargs="+", action="extend")
        elif choices is not None:
            kwargs["choices"] = choices() if callable(choices) else choices
        parser.add_argument(f"--{f.name}", *f.metadata.get("aliases", ()), **kwargs)


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _split_list(cls: type, f: dataclasses.Field, value: Any) -> Any:
    """A list option's values, each argument split at spaces and converted."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return value
    base, _ = _base_type(typing.get_type_hints(cls)[f.name])
    words = [w for v in value for w in v.split()]
    try:
        items = [base(w) for w in words]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--{f.name} {' '.join(value)}: expected {base.__name__} values"
        ) from None
    choices = f.metadata.get("choices")
    allowed = choices() if callable(choices) else choices
    bad = [w for w in items if allowed is not None and w not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(
            f"--{f.name}: unknown {', '.join(map(str, bad))}; choose from {', '.join(allowed)}"
        )
    return items


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """The settings dataclass ``cls`` from parsed arguments (extra arguments are ignored)."""
    values = {}
    for f in dataclasses.fields(cls):
        _, is_list = _base_type(typing.get_type_hints(cls)[f.name])
        value = getattr(args, f.name)
        if is_list:
            value = _default(f) if value is None else _split_list(cls, f, value)
        values[f.name] = value
    return cls(**values)


def defaults(cls: type) -> dict[str, Any]:
    """Every field's default (REQUIRED ones left out)."""
    return {f.name: _default(f) for f in dataclasses.fields(cls) if _default(f) is not REQUIRED}


__all__ = ["REQUIRED", "add_settings", "defaults", "from_args", "option", "str2bool"]

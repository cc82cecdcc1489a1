"""What every proposal score is: built from the stage-4 dump, saved, loaded, drawn, and asked
for the scores of pruning proposals (the coarse search's input).

Stage 5 builds each score named in ``--scores`` once and writes ``scores/<name>/`` (its file,
``heatmap.png``, ``settings.json``); stage 6 loads them and ranks proposals with their
:meth:`ProposalScore.scorer`. Scores register themselves in :data:`SCORES`; a new one is one
module in this package (docs/DESIGN.md, "Adding a score").
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from comflp.errors import InputError
from comflp.prune.search import ProposalScorer
from comflp.registry import Registry
from comflp.settings import add_settings, from_args, option

SCORES: Registry[type[ProposalScore]] = Registry("score", "comflp.prune.scores")


@dataclass(kw_only=True)
class NoOptions:
    """The options of a score that takes none; a score with options declares its own dataclass
    of :func:`~comflp.settings.option` fields as its ``Options``, which ``--score_conf`` sets."""


@dataclass(kw_only=True)
class ScoreChoice:
    """The scores stages 5-8 build, rank proposals by and report (docs/SEARCH_QUALITY.md)."""

    scores: list[str] = option(
        ["residual_sum", "dc", "consensus"],
        "coarse scores: each built once by stage 5 (a composite one, the consensus, of the "
        "others); stage 6 merges the composite's top K and each other score's first few",
        choices=lambda: SCORES.names(),
    )


class ProposalScore(ABC):
    """A coarse score of pruning proposals: higher means better to prune."""

    name: ClassVar[str]  # its registry name
    file_name: ClassVar[str]  # what it stores in scores/<name>/
    Options: ClassVar[type] = NoOptions  # its options, set by --score_conf
    needs_frames: ClassVar[bool] = False  # refuses a dump of utterance means
    aggregates: ClassVar[bool] = False  # scores blocks, so --coarse_aggregation applies

    @classmethod
    @abstractmethod
    def build(cls, layer_feats: Sequence[np.ndarray], options: Any) -> ProposalScore:
        """The score of L+1 (rows, D) arrays in layer-index order (the dump), with ``options``
        an instance of its :attr:`Options`; ValueError when they cannot be used."""

    @classmethod
    @abstractmethod
    def read(cls, path: Path) -> ProposalScore:
        """A score written by :meth:`write`; ValueError says what is wrong with the file."""

    @abstractmethod
    def write(self, path: Path) -> None:
        """Write the score's file (the caller makes it atomic)."""

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @abstractmethod
    def scorer(self, aggregation: str = "mean") -> ProposalScorer:
        """What the coarse search ranks proposals with (``aggregation``: matrix scores only)."""

    @abstractmethod
    def heatmap(self, path: Path, title: str) -> None:
        """Draw the score as a layer-by-layer heatmap PNG."""


class CompositeScore(ProposalScore):
    """A score made of the other scores of ``--scores``: stage 5 composes it from their built
    scores (nothing of the dump), stage 6 binds it to their loaded ones. Its coarse ranking joins
    the fine search whole; its members' only their first ``--score_top_k``."""

    min_members: ClassVar[int] = 2
    members: tuple[str, ...]

    @classmethod
    def build(cls, layer_feats: Sequence[np.ndarray], options: Any) -> ProposalScore:
        raise ValueError(f"{cls.name} is composed of the other scores of --scores, not built")

    @classmethod
    @abstractmethod
    def compose(cls, scores: dict[str, ProposalScore], options: Any) -> CompositeScore:
        """The score of the members ``scores`` (name -> built score, in --scores order)."""

    @abstractmethod
    def bind(self, scores: dict[str, ProposalScore], max_size: int) -> CompositeScore:
        """This score with its members' loaded scores, for proposals of up to ``max_size``
        layers; ValueError naming a member that ``scores`` lacks."""


def is_composite(name: str) -> bool:
    return issubclass(SCORES[name], CompositeScore)


def split_scores(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the scores built from the dump, the composites of them) among ``names``; InputError
    for a composite with too few members."""
    built = [n for n in names if not is_composite(n)]
    composites = [n for n in names if is_composite(n)]
    for name in composites:
        if len(built) < SCORES[name].min_members:
            raise InputError(
                f"--scores {' '.join(names)}: {name} needs {SCORES[name].min_members} or more "
                f"other scores, got {len(built)}"
            )
    return built, composites


def score_options(names: Sequence[str], conf: Sequence[str]) -> dict[str, Any]:
    """Each score of ``names`` with its :attr:`ProposalScore.Options`, defaults overridden by
    ``conf``'s ``SCORE.OPTION=VALUE`` items; InputError naming ``--score_conf`` and what was
    expected for an item that does not parse or names another score or option."""
    values: dict[str, dict[str, str]] = {name: {} for name in names}
    for item in conf:
        key, sep, value = item.partition("=")
        name, dot, field_name = key.partition(".")
        if not (sep and dot and field_name):
            raise InputError(
                f"--score_conf {item}: expected SCORE.OPTION=VALUE, e.g. dc.batch_size=8"
            )
        if name not in values:
            raise InputError(
                f"--score_conf {item}: {name!r} is not one of --scores ({' '.join(names)})"
            )
        allowed = {f.name: f for f in fields(SCORES[name].Options)}
        if field_name not in allowed:
            takes = ", ".join(f"{f}={_show(SCORES[name].Options, f)}" for f in allowed)
            what = f"the options {takes}" if takes else "no options"
            raise InputError(f"--score_conf {item}: score {name} takes {what}")
        values[name][field_name] = value
    return {name: _parse_options(SCORES[name].Options, name, v) for name, v in values.items()}


def describe_options(options: dict[str, Any]) -> str:
    """``score_options``' result in one line, e.g. ``dc batch_size=32``."""
    said = [
        f"{name} " + " ".join(f"{k}={v}" for k, v in asdict(o).items())
        for name, o in options.items()
        if fields(o)
    ]
    return "; ".join(said) or "no options"


def _show(options_type: type, field_name: str) -> str:
    return str(getattr(options_type(), field_name))


def _parse_options(options_type: type, name: str, values: dict[str, str]) -> Any:
    """An ``options_type`` from text values, each checked as its field's type and bounds."""
    parser = argparse.ArgumentParser(exit_on_error=False, add_help=False)
    add_settings(parser, options_type)
    argv = [w for k, v in values.items() for w in (f"--{k}", v)]
    try:
        return from_args(options_type, parser.parse_args(argv))
    except (argparse.ArgumentError, argparse.ArgumentTypeError) as e:
        given = " ".join(f"{name}.{k}={v}" for k, v in values.items())
        raise InputError(f"--score_conf {given}: {getattr(e, 'message', e)}") from None


def read_score_file(path: Path) -> ProposalScore:
    """A score file of any registered score, recognised by its suffix (``--matrix`` of
    bin/search.py takes a matrix ``.npy`` or residual-sum statistics ``.npz``)."""
    readers: dict[str, type[ProposalScore]] = {}
    for name in SCORES:
        cls = SCORES[name]
        if issubclass(cls, CompositeScore):  # made of other scores: nothing to search alone
            continue
        owner = next(c for c in cls.__mro__ if "read" in vars(c))  # the file format's class
        readers.setdefault(Path(cls.file_name).suffix, owner)
    suffix = Path(path).suffix
    if suffix not in readers:
        raise ValueError(f"a score file ends in {' or '.join(readers)}, got {Path(path).name!r}")
    return readers[suffix].read(Path(path))

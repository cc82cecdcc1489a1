"""run.sh's closed-set options checked against the registries and tuples that define them,
before any job starts: a bad name ends the run with one line naming the choices, instead of a
job log holding argparse's usage block, or a stage that has already rewritten its outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from comflp.adapters.base import MODEL_TYPES
from comflp.errors import InputError
from comflp.prune.evaluator import METRICS
from comflp.prune.rules import RULES
from comflp.prune.scores.base import SCORES, score_options
from comflp.prune.search import AGGREGATIONS, MODES
from comflp.prune.searches.base import SEARCHES
from comflp.prune.searches.refine import DEFAULT_REFINE, REFINE_MODES
from comflp.settings import REQUIRED, option


def _decoding_methods(model_type: str) -> tuple[str, ...] | None:
    """What the model type's classes decode with; None where it depends on the model
    (ESPnet's), checked when the model is loaded."""
    cls = MODEL_TYPES[model_type]
    names: list[str] = []
    for each in (cls, *cls.also_loads):
        if not isinstance(each.decoding_methods, tuple):
            return None
        names += [m for m in each.decoding_methods if m not in names]
    return tuple(names)


# option -> (its choices given the settings, whether it takes several space-separated values);
# in this order, so that --model_type is known before --decoding_method is checked
CHOICES: dict[str, tuple[Callable, bool]] = {
    "model_type": (lambda s: MODEL_TYPES.names(), False),
    "scores": (lambda s: SCORES.names(), True),
    "search_methods": (lambda s: SEARCHES.names(), True),
    "rules": (lambda s: ("all", *RULES.names()), True),
    "fine_rules": (lambda s: RULES.names(), True),
    "refine": (lambda s: REFINE_MODES, False),
    "fine_metric": (lambda s: METRICS, False),
    "search_mode": (lambda s: MODES, False),
    "coarse_aggregation": (lambda s: AGGREGATIONS, False),
    "decoding_method": (lambda s: _decoding_methods(s.model_type), False),
    "ct2_quantization": (lambda s: MODEL_TYPES["ctranslate2"].quantizations, False),
}


@dataclass(kw_only=True)
class PreflightSettings:
    """The values run.sh was given, one per option of :data:`CHOICES`."""

    model_type: str = option(REQUIRED, "as run.sh's")
    scores: str = option(REQUIRED, "as run.sh's")
    search_methods: str = option(REQUIRED, "as run.sh's")
    rules: str = option(REQUIRED, "as run.sh's")
    fine_rules: str = option("", "as run.sh's (none: '')")
    refine: str = option(DEFAULT_REFINE, "as run.sh's")
    fine_metric: str = option(REQUIRED, "as run.sh's")
    search_mode: str = option(REQUIRED, "as run.sh's")
    coarse_aggregation: str = option(REQUIRED, "as run.sh's")
    decoding_method: str = option(REQUIRED, "as run.sh's")
    ct2_quantization: str = option(REQUIRED, "as run.sh's")
    score_conf: str = option("", "as run.sh's: checked against the scores' own options")


def preflight(s: PreflightSettings) -> None:
    """InputError for the first option whose value is not among its choices, then for a
    --score_conf item the scores do not take."""
    for name, (choices, several) in CHOICES.items():
        allowed = choices(s)
        value = getattr(s, name)
        bad = [v for v in (value.split() if several else [value]) if v not in (allowed or [v])]
        if bad:
            whose = f" for --model_type {s.model_type}" if name == "decoding_method" else ""
            raise InputError(
                f"--{name} {value}: unknown {' '.join(bad)}{whose}; "
                f"choose from {', '.join(allowed)}"
            )
    score_options(s.scores.split(), s.score_conf.split())

"""The method registry of stage 7: which layers each method prunes from which model.

A method entry names the model it prunes (type and directory), the layers it removes from it,
and what its search cost (wall time, pruned models evaluated). Entries with the same model and
layers are decoded once. Searches (stage 6) are read from their ``search.json``; fixed rules
(:data:`comflp.prune.rules.FIXED_RULES`) and random seeds are computed here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from comflp.expdir import (
    CORRELATION_SETTINGS,
    DUMP_INFO,
    METHODS,
    METHODS_FINETUNED,
    METHODS_STRUCTURED,
    PROPOSALS,
    ExpDir,
)
from comflp.prune.rules import FIXED_RULES, random_layers
from comflp.utils import atomic_write_json

SEARCH_METHODS = ("comflp", "glp", "oracle")
# The method lists in compare/, by the stage that writes them: 7 (compare), 8 (finetune),
# 9 (structured).
METHOD_LISTS = {"compare": METHODS, "finetune": METHODS_FINETUNED, "structured": METHODS_STRUCTURED}


@dataclass
class Method:
    name: str  # e.g. comflp_dc_fine, drop_top, random, glp, oracle, unpruned
    num_prune: int
    pruned: list[int]  # layer numbers of the model in model_dir
    model_dir: str
    search_seconds: float | None = None
    evaluations: int | None = None  # pruned models evaluated by the search
    seed: int | None = None
    note: str = ""
    original_pruned: list[int] | None = None  # for display: layers removed from the original model
    model_type: str = "native"

    @property
    def key(self) -> str:
        """Identifies what is decoded: the model and the layers removed from it."""
        layers = "-".join(map(str, self.pruned)) or "none"
        return f"{self.model_dir.strip('/').replace('/', '_')}__prune_{layers}"


@dataclass
class MethodList:
    methods: list[Method] = field(default_factory=list)

    def add(self, method: Method) -> None:
        self.methods.append(method)

    def save(self, path: Path) -> None:
        atomic_write_json(path, [asdict(m) for m in self.methods])

    @classmethod
    def load(cls, *paths: Path) -> MethodList:
        out = cls()
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: method list not found (run stage 7)")
            out.methods += [Method(**m) for m in json.loads(Path(path).read_text())]
        return out

    def unique(self) -> dict[str, Method]:
        """One method per decoding key, in first-seen order."""
        seen: dict[str, Method] = {}
        for m in self.methods:
            seen.setdefault(m.key, m)
        return seen


def read_search(exp: ExpDir, method: str, num_prune: int) -> dict:
    """A stage-6 ``search.json``; FileNotFoundError says which run of stage 6 writes it."""
    path = exp.search_result(method, num_prune)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found (run stage 6 with --num_prune {num_prune} and "
            f"{method} among its searches)"
        )
    return json.loads(path.read_text())


def best_fine_measure(exp: ExpDir, measures: list[str], nums: list[int]) -> tuple[str, dict]:
    """The measure whose fine search reached the lowest dev metric, averaged over the P values
    (the first such measure on a tie), and every measure's average."""
    means = {
        m: sum(read_search(exp, f"comflp_{m}", p)["best_metric"] for p in nums) / len(nums)
        for m in measures
    }
    return min(means, key=means.get), means


def comflp_methods(
    exp: ExpDir, measure: str, num_prune: int, model: tuple[str, str]
) -> list[Method]:
    """The coarse-only and coarse+fine choices of stage 6 for one measure and P.

    Search cost: the layer dump and the correlation matrix (stages 4-5) plus the coarse search;
    the fine search adds its evaluations. ``model``: (type, directory) of the pruned model.
    """
    method = f"comflp_{measure}"
    search = read_search(exp, method, num_prune)
    proposals = json.loads((exp.search(method, num_prune) / PROPOSALS).read_text())
    dump_seconds = json.loads((exp.dump / DUMP_INFO).read_text()).get("seconds", 0.0)
    settings = exp.correlation(measure) / CORRELATION_SETTINGS
    corr_seconds = json.loads(settings.read_text())["seconds"]
    matrix_cost = dump_seconds + corr_seconds  # search["seconds"]: coarse + fine search
    model_type, model_dir = model
    return [
        Method(
            f"{method}_coarse",
            num_prune,
            proposals[0]["layers"],
            model_dir,
            matrix_cost + search["coarse_seconds"],
            0,
            note="top coarse proposal",
            model_type=model_type,
        ),
        Method(
            f"{method}_fine",
            num_prune,
            search["best_layers"],
            model_dir,
            matrix_cost + search["seconds"],
            search["evaluations"],
            note=f"best of {search['evaluations']} by dev {search['metric']}",
            model_type=model_type,
        ),
    ]


def metric_search_method(
    exp: ExpDir, method: str, num_prune: int, model: tuple[str, str]
) -> Method | None:
    """GLP's or the oracle's choice from stage 6 (None when stage 6 skipped it, logged)."""
    search = read_search(exp, method, num_prune)
    if "skipped" in search:
        logging.info(f"{method}, P={num_prune}: skipped in stage 6 ({search['skipped']})")
        return None
    how = {"glp": "greedy", "oracle": "exhaustive"}[method]
    return Method(
        method,
        num_prune,
        search["best_layers"],
        model[1],
        search["seconds"],
        search["evaluations"],
        note=f"{how} by dev {search['metric']}",
        model_type=model[0],
    )


def rule_methods(
    num_layers: int, num_prune: int, random_seeds: int, model: tuple[str, str]
) -> list[Method]:
    """The fixed rules of :data:`FIXED_RULES` and ``random_seeds`` random choices."""
    model_type, model_dir = model
    methods = [
        Method(
            name,
            num_prune,
            list(rule(num_layers, num_prune)),
            model_dir,
            0.0,
            0,
            note=note,
            model_type=model_type,
        )
        for name, (rule, note) in FIXED_RULES.items()
    ]
    methods += [
        Method(
            "random",
            num_prune,
            list(random_layers(num_layers, num_prune, seed)),
            model_dir,
            0.0,
            0,
            seed=seed,
            model_type=model_type,
        )
        for seed in range(random_seeds)
    ]
    return methods


def list_methods(
    exp: ExpDir,
    model: tuple[str, str],
    num_layers: int,
    prunes: list[int],
    searches: list[str],
    measures: list[str],
    random_seeds: int,
) -> MethodList:
    """Every method of stage 7's table: the unpruned model, then per P the searches of stage
    6 (CoMFLP per measure, GLP, the oracle) and the fixed rules."""
    methods = MethodList()
    methods.add(
        Method("unpruned", 0, [], model[1], note=f"{num_layers} layers", model_type=model[0])
    )
    for p in prunes:
        if "comflp" in searches:
            for measure in measures:
                methods.methods += comflp_methods(exp, measure, p, model)
        methods.methods += rule_methods(num_layers, p, random_seeds, model)
        for method in ("glp", "oracle"):
            if method in searches and (found := metric_search_method(exp, method, p, model)):
                methods.add(found)
    return methods

"""Stage 7: which layers each method prunes, and one results table for all of them.

A method entry names the model it prunes (an experiment directory), the layers it removes
from it, and what its search cost (wall time, pruned models evaluated). Entries with the same
model and layers are decoded once. The table has one row per method and number of pruned
layers P; random selection is summarised over its seeds as mean and standard deviation.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from comflp.utils import atomic_write_json

METHODS_NAME = "methods.json"


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
                raise FileNotFoundError(
                    f"{path}: method list not found (run stage 7's layer selection)"
                )
            out.methods += [Method(**m) for m in json.loads(Path(path).read_text())]
        return out

    def unique(self) -> dict[str, Method]:
        """One method per decoding key, in first-seen order."""
        seen: dict[str, Method] = {}
        for m in self.methods:
            seen.setdefault(m.key, m)
        return seen


def comflp_methods(exp_dir: Path, measure: str, num_prune: int) -> list[Method]:
    """The coarse-only and coarse+fine choices of stage 6 for one measure and P.

    Search cost: the layer dump and the correlation matrix (stages 4-5) plus the coarse search;
    the fine search adds its evaluations.
    """
    search_dir = exp_dir / "search" / f"{measure}_prune{num_prune}"
    fine_path = search_dir / "fine_search.json"
    if not fine_path.is_file():
        raise FileNotFoundError(
            f"{fine_path}: not found (run stage 6 with --num_prune {num_prune} "
            f"and --measures including {measure})"
        )
    fine = json.loads(fine_path.read_text())
    proposals = json.loads((search_dir / "proposals.json").read_text())
    dump_seconds = json.loads((exp_dir / "dump/info.json").read_text()).get("seconds", 0.0)
    corr_seconds = json.loads((exp_dir / f"correlation/{measure}/settings.json").read_text())[
        "seconds"
    ]
    coarse_cost = dump_seconds + corr_seconds + fine["coarse_seconds"]
    return [
        Method(
            f"comflp_{measure}_coarse",
            num_prune,
            proposals[0]["layers"],
            str(exp_dir),
            coarse_cost,
            0,
            note="top coarse proposal",
        ),
        Method(
            f"comflp_{measure}_fine",
            num_prune,
            fine["best_layers"],
            str(exp_dir),
            coarse_cost + fine["seconds"],
            len(fine["candidates"]),
            note=f"best of {len(fine['candidates'])} by dev {fine['metric']}",
        ),
    ]


@dataclass
class Row:
    method: str
    num_prune: int
    pruned: str
    errors: dict[str, dict[str, float]]  # set -> {"wer": , "cer": } (means)
    spread: dict[str, dict[str, float]]  # set -> std over seeds (random only)
    params: int
    rtf: float
    search_seconds: float | None
    evaluations: int | None


def build_rows(
    methods: MethodList,
    scores: dict[str, dict[str, dict]],
    params: dict[str, int],
    rtf: dict[str, float],
) -> list[Row]:
    """One row per (method name, P); ``scores[key][set]`` holds ``{"wer": , "cer": }``."""
    groups: dict[tuple[str, int], list[Method]] = {}
    for m in methods.methods:
        groups.setdefault((m.name, m.num_prune), []).append(m)
    rows = []
    for (name, p), group in groups.items():
        sets = list(scores[group[0].key])
        errors, spread = {}, {}
        for s in sets:
            errors[s] = {
                u: statistics.mean(scores[m.key][s][u] for m in group) for u in ("wer", "cer")
            }
            if len(group) > 1:
                spread[s] = {
                    u: statistics.stdev(scores[m.key][s][u] for m in group) for u in ("wer", "cer")
                }
        shown = (
            group[0].original_pruned if group[0].original_pruned is not None else group[0].pruned
        )
        pruned = (" ".join(map(str, shown)) or "-") if len(group) == 1 else f"{len(group)} seeds"
        costs = [m.search_seconds for m in group if m.search_seconds is not None]
        rows.append(
            Row(
                method=name,
                num_prune=p,
                pruned=pruned,
                errors=errors,
                spread=spread,
                params=params[group[0].key],
                rtf=statistics.mean(rtf[m.key] for m in group),
                search_seconds=statistics.mean(costs) if costs else None,
                evaluations=group[0].evaluations,
            )
        )
    return sorted(rows, key=lambda r: r.num_prune)


def _fmt_error(row: Row, s: str, unit: str) -> str:
    value = f"{row.errors[s][unit]:.2f}"
    return value + (f" ± {row.spread[s][unit]:.2f}" if s in row.spread else "")


def results_table(
    rows: list[Row], sets: list[str], metrics: tuple[str, ...] = ("wer", "cer")
) -> str:
    """Markdown: method, P, pruned layers, error rates per set, parameters, RTF, search cost.

    ``metrics``: the error rates shown (``wer``, ``cer``); Mandarin, written without spaces,
    shows CER only.
    """
    head = ["method", "P", "pruned layers"]
    for s in sets:
        head += [f"{s} {m.upper()}" for m in metrics]
    head += ["params", "RTF", "search (s)", "evaluations"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, str(r.num_prune), r.pruned]
        for s in sets:
            cells += [_fmt_error(r, s, m) for m in metrics]
        cells += [
            f"{r.params / 1e6:.2f}M",
            f"{r.rtf:.4f}",
            "-" if r.search_seconds is None else f"{r.search_seconds:.1f}",
            "-" if r.evaluations is None else str(r.evaluations),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

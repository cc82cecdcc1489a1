"""The rows stage 7 decodes: which layers each method removes from which model.

A method entry names the model it prunes (type and directory), the stack and the layers it
removes from it, and what its search cost (wall time, pruned models evaluated). Entries with
the same model, stack and layers are decoded once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from comflp.utils import atomic_write_json


@dataclass
class Method:
    name: str  # e.g. comflp, comflp_dc_fine, drop_top, random, glp, oracle, unpruned
    num_prune: int
    pruned: list[int]  # layer numbers of the model in model_dir (of `stack`)
    model_dir: str
    search_seconds: float | None = None
    evaluations: int | None = None  # pruned models evaluated by the search
    seed: int | None = None
    note: str = ""
    original_pruned: list[int] | None = None  # for display: layers removed from the original model
    model_type: str = "native"
    stack: str = "encoder"

    @property
    def key(self) -> str:
        """Identifies what is decoded: the model and the layers removed from it."""
        layers = "-".join(map(str, self.pruned)) or "none"
        where = "" if self.stack == "encoder" or not self.pruned else f"{self.stack}_"
        return f"{self.model_dir.strip('/').replace('/', '_')}__prune_{where}{layers}"


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

"""Every file and folder name of an experiment directory, in one place.

::

    exp/<experiment>/
      config.yaml model.pt tokenizer.model tokens.txt cmvn.json   the model (stages 3, 6, 8, 9)
      epoch-N.pt checkpoint-latest.pt history.json final_dev.json training_curves.png tensorboard/
      log/                                  every stage's logs
      dump/                                 stage 4: layerKK.ark/.scp, info.json, parts/J/
      scores/<score>/                       stage 5: the score's file (matrix.npy, stats.npz, ...),
                                                     heatmap.png, settings.json
      search/<search>_prune<P>/             stage 6: search.json, pruned/
      decoder/                              stages 4-6 and 8 on the decoder stack: dump/, scores/,
                                                     search/, finetune/
      compare/                              stage 7: methods*.json, decode/<set>/<model>/, results.json,
                                                     error_vs_prune.png, tradeoff.png
      finetune/<method>_prune<P>/           stage 8: a training experiment directory (a model
                                                     of another library: its own files + train.yaml)
      structured/sparsity<t>/               stage 9: a training experiment directory whose
                                                     model.pt is the pruned model, structure.json
      RESULTS.md                            stage 7: the table of every method

``run.sh`` hands these folders from stage to stage by passing ``--exp_dir`` and the names
(score, search, P, stack); the entry points build the paths here. A model trained elsewhere (Hugging
Face, ESPnet) keeps its own format in its own directory; its experiment directory holds
everything from the dump on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# A comflp model directory (experiment directory or pruned model).
CONFIG = "config.yaml"
MODEL = "model.pt"
TOKENIZER = "tokenizer.model"
TOKENS = "tokens.txt"
CMVN = "cmvn.json"
# Beside a model saved in its own library's format (Hugging Face): what comflp did to it.
PRUNE_INFO = "comflp_prune.json"
# Training.
TRAIN_CONFIG = "train.yaml"  # fine-tuning a model saved in its own format: the train section
LATEST_CHECKPOINT = "checkpoint-latest.pt"
HISTORY = "history.json"
DISTIL_RESULT = "distil.json"  # stage 8 with a teacher: the recovery's record, written last
FINAL_DEV = "final_dev.json"
TRAINING_CURVES = "training_curves.png"
TENSORBOARD = "tensorboard"
# Stage outputs.
DUMP_INFO = "info.json"
HEATMAP = "heatmap.png"
SCORE_SETTINGS = "settings.json"
SEARCH_RESULT = "search.json"
PRUNED = "pruned"
# compare/'s method lists, by the stage that writes them: 7, 8, 9.
METHOD_LISTS = {
    "compare": "methods.json",
    "finetune": "methods_finetuned.json",
    "structured": "methods_structured.json",
}
STRUCTURE = "structure.json"
RESULTS_JSON = "results.json"
ERROR_PLOT = "error_vs_prune.png"
TRADEOFF_PLOT = "tradeoff.png"
RESULTS_MD = "RESULTS.md"
# One decoding of one set (compare/decode/<set>/<model>/).
DECODE_PART = "part{part}.json"
SCORES = "scores.json"
SCORE_TABLE = "result.md"
REF_TEXT = "ref.txt"
HYP_TEXT = "hyp.txt"
ALIGNMENT = "alignment.{unit}.txt"


@dataclass(frozen=True)
class ExpDir:
    """The paths of one experiment directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def dump(self) -> Path:
        return self.root / "dump"

    def dump_part(self, part: int) -> Path:
        return self.dump / "parts" / str(part)

    def stack(self, name: str) -> ExpDir:
        """Where stages 4-6 of a stack write: the experiment itself for the encoder."""
        return self if name == "encoder" else ExpDir(self.root / name)

    def score(self, name: str) -> Path:
        return self.root / "scores" / name

    def search(self, name: str, num_prune: int) -> Path:
        return self.root / "search" / f"{name}_prune{num_prune}"

    def search_result(self, name: str, num_prune: int) -> Path:
        return self.search(name, num_prune) / SEARCH_RESULT

    def pruned_model(self, name: str, num_prune: int) -> Path:
        return self.search(name, num_prune) / PRUNED

    def finetune(self, name: str, num_prune: int) -> Path:
        return self.root / "finetune" / f"{name}_prune{num_prune}"

    def structured(self, target_sparsity: float) -> Path:
        return self.root / "structured" / f"sparsity{target_sparsity:g}"

    @property
    def compare(self) -> Path:
        return self.root / "compare"

    def decoded(self, eval_set: str, key: str) -> Path:
        """Where one model's decoding of one set goes."""
        return self.compare / "decode" / eval_set / key

    @property
    def results_md(self) -> Path:
        return self.root / RESULTS_MD

#!/usr/bin/env python3
"""Stage 9: list the structured-pruned models as methods (compare/methods_structured.json), so
that stage 7's table gets their rows beside CoMFLP + fine-tuning.

P of a row is the number of layers whose parameters the pruning removed in total,
round(sparsity x L), so that it sits beside the layer-pruning rows of the same size."""

import argparse
import json
from pathlib import Path

from comflp.asr.checkpoint import load_experiment_config
from comflp.cli import UsageError, add_common_args, run
from comflp.expdir import HISTORY, METHODS_STRUCTURED, STRUCTURE, ExpDir
from comflp.prune.methods import Method, MethodList


def structured_method(sp_dir: Path, num_layers: int) -> Method:
    """The row of one stage-9 experiment directory."""
    path = sp_dir / STRUCTURE
    if not path.is_file():
        raise UsageError(f"{path}: not found (stage 9 has not finished in {sp_dir})")
    structure = json.loads(path.read_text())
    cfg = load_experiment_config(sp_dir).model
    kept = cfg.kept_layers or list(range(1, cfg.num_layers + 1))
    epochs = len(json.loads((sp_dir / HISTORY).read_text()))
    return Method(
        f"structured_l0_sparsity{structure['target_sparsity']:g}",
        round(structure["sparsity"] * num_layers),
        [],
        str(sp_dir),
        note=f"L0 structured pruning, sparsity {structure['sparsity']:.3f}, {epochs} epochs",
        original_pruned=[k for k in range(1, num_layers + 1) if k not in kept],
    )


def main(args: argparse.Namespace) -> None:
    exp = ExpDir(args.exp_dir)
    num_layers = load_experiment_config(exp.root).model.num_layers
    methods = MethodList([structured_method(d, num_layers) for d in args.structured_dirs])
    methods.save(exp.compare / METHODS_STRUCTURED)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exp_dir", type=Path, required=True, help="the baseline experiment")
    parser.add_argument("--structured_dirs", type=Path, nargs="+", required=True)
    add_common_args(parser)
    run(main, parser)

#!/usr/bin/env python3
"""Stage 8: list the fine-tuned pruned models as methods (compare/methods_finetuned.json), so
that stage 7's table gets their rows."""

import argparse
import json
from pathlib import Path

from comflp.asr.checkpoint import load_experiment_config
from comflp.cli import add_common_args, run
from comflp.expdir import HISTORY, METHODS_FINETUNED, ExpDir
from comflp.prune.methods import Method, MethodList, comflp_methods


def main(args: argparse.Namespace) -> None:
    exp = ExpDir(args.exp_dir)
    methods = MethodList()
    num_layers = load_experiment_config(exp.root).model.num_layers
    for ft_dir in args.finetuned_dirs:
        cfg = load_experiment_config(ft_dir)
        kept = cfg.model.kept_layers or list(range(1, cfg.model.num_layers + 1))
        num_prune = num_layers - len(kept)
        fine = comflp_methods(exp, args.measure, num_prune, ("comflp", str(exp.root)))[1]
        epochs = len(json.loads((ft_dir / HISTORY).read_text()))
        methods.add(
            Method(
                f"comflp_{args.measure}_fine+finetune",
                num_prune,
                [],
                str(ft_dir),
                fine.search_seconds,
                fine.evaluations,
                note=f"fine-tuned {epochs} epochs",
                original_pruned=fine.pruned,
            )
        )
    methods.save(exp.compare / METHODS_FINETUNED)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exp_dir", type=Path, required=True, help="the baseline experiment")
    parser.add_argument("--measure", required=True)
    parser.add_argument("--finetuned_dirs", type=Path, nargs="+", required=True)
    add_common_args(parser)
    run(main, parser)

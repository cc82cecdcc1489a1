#!/usr/bin/env python3
"""Stage 8: list the fine-tuned pruned models as methods (compare/methods_finetuned.json), so
that stage 7's table gets their rows."""

import argparse
import json
from pathlib import Path

from comflp.adapters import MODEL_TYPES, load_prunable
from comflp.cli import add_common_args, run
from comflp.expdir import HISTORY, METHODS_FINETUNED, ExpDir
from comflp.prune.methods import Method, MethodList, comflp_methods


def main(args: argparse.Namespace) -> None:
    exp = ExpDir(args.exp_dir)
    methods = MethodList()
    source = (args.model_type, str(args.model_dir or exp.root))
    num_layers = load_prunable(*source).num_layers
    for ft_dir in args.finetuned_dirs:
        num_prune = num_layers - load_prunable(args.model_type, ft_dir).num_layers
        fine = comflp_methods(exp, args.measure, num_prune, source)[1]
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
                model_type=args.model_type,
            )
        )
    methods.save(exp.compare / METHODS_FINETUNED)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exp_dir", type=Path, required=True, help="the baseline experiment")
    parser.add_argument("--model_type", choices=MODEL_TYPES.names(), default="native")
    parser.add_argument(
        "--model_dir", type=Path, help="the pruned model's source (default: --exp_dir)"
    )
    parser.add_argument("--measure", required=True)
    parser.add_argument("--finetuned_dirs", type=Path, nargs="+", required=True)
    add_common_args(parser)
    run(main, parser)

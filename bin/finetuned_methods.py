#!/usr/bin/env python3
"""Stage 8: list the fine-tuned pruned models as methods, so that stage 7's table gets their rows."""

import argparse
import json
from pathlib import Path

from comflp.asr.checkpoint import load_experiment_config
from comflp.cli import add_common_args, run
from comflp.prune.methods import Method, MethodList, comflp_methods


def main(args: argparse.Namespace) -> None:
    methods = MethodList()
    num_layers = load_experiment_config(args.exp_dir).model.num_layers
    for ft_dir in args.finetuned_dirs:
        cfg = load_experiment_config(ft_dir)
        kept = cfg.model.kept_layers or list(range(1, cfg.model.num_layers + 1))
        num_prune = num_layers - len(kept)
        fine = comflp_methods(args.exp_dir, args.measure, num_prune)[1]
        epochs = len(json.loads((ft_dir / "history.json").read_text()))
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
    methods.save(args.output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exp_dir", type=Path, required=True, help="the baseline experiment")
    parser.add_argument("--measure", required=True)
    parser.add_argument("--finetuned_dirs", type=Path, nargs="+", required=True)
    parser.add_argument("--output", type=Path, required=True)
    add_common_args(parser)
    run(main, parser)

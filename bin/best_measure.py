#!/usr/bin/env python3
"""Stage 8, step 0: print the CoMFLP measure whose fine search (stage 6) reached the lowest dev
metric, averaged over --num_prune, so that stage 8 fine-tunes the best of the searched models
(the fine search over the union of every measure's top K costs nothing more)."""

import argparse
import logging
from pathlib import Path

from comflp.cli import UsageError, add_common_args, run
from comflp.expdir import ExpDir
from comflp.prune.methods import best_fine_measure


def main(args: argparse.Namespace) -> None:
    try:
        best, means = best_fine_measure(
            ExpDir(args.exp_dir), args.measures.split(), [int(p) for p in args.num_prune.split()]
        )
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    table = ", ".join(f"{m} {v:.3f}" for m, v in means.items())
    logging.info(f"fine-search dev metric per measure: {table}; best: {best}")
    print(best)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exp_dir", type=Path, required=True)
    parser.add_argument("--measures", required=True, help="CoMFLP measures searched in stage 6")
    parser.add_argument("--num_prune", required=True, help="the P values, e.g. '6' or '2 4 6'")
    add_common_args(parser)
    run(main, parser)

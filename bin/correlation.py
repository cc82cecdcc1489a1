#!/usr/bin/env python3
"""Stage 5: what stage 6 ranks pruning proposals by, from the dump of --exp_dir, into
correlation/<measure>/: the (L+1) x (L+1) correlation matrix between the layer outputs with a
heatmap, or for --measure residual_sum the statistics of the residual-sum score
(comflp/prune/residual_sum.py) with a heatmap of its scores for pruning each pair of layers."""

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from comflp.cli import UsageError, add_common_args, run
from comflp.expdir import CORRELATION_SETTINGS, DUMP_INFO, HEATMAP, ExpDir
from comflp.prune.correlation import correlation_matrix
from comflp.prune.dump import load_layer_feats
from comflp.prune.residual_sum import ResidualSumScorer
from comflp.prune.search import COARSE_MEASURES, RESIDUAL_SUM
from comflp.report.plots import plot_matrix
from comflp.utils import atomic_path, atomic_write_json


def measure_options(args: argparse.Namespace) -> dict:
    if args.measure == "dc":
        return {"batch_size": args.batch_size or None}
    if args.measure in ("svcca", "pwcca"):
        return {"threshold": args.threshold}
    return {}


def residual_sum_stats(feats, exp: ExpDir) -> np.ndarray:
    """Write the residual-sum statistics; return the pair-score matrix for the heatmap."""
    try:
        scorer = ResidualSumScorer.from_layer_feats(feats)
    except ValueError as e:
        raise UsageError(f"--measure {RESIDUAL_SUM} on {exp.dump}: {e}") from None
    with atomic_path(exp.coarse_scores(RESIDUAL_SUM)) as tmp:
        scorer.save(tmp)
    return scorer.pair_matrix()


def main(args: argparse.Namespace) -> None:
    if args.measure not in COARSE_MEASURES:
        raise UsageError(
            f"--measure {args.measure}: unknown measure; choose one of {', '.join(COARSE_MEASURES)}"
        )
    exp = ExpDir(args.exp_dir)
    out_dir = exp.correlation(args.measure)
    info_path = exp.dump / DUMP_INFO
    if not info_path.is_file():
        raise UsageError(f"{info_path}: not found (run stage 4, the layer dump)")
    info = json.loads(info_path.read_text())
    if args.measure == RESIDUAL_SUM and info["pooling"] != "frames":
        raise UsageError(
            f"--measure {RESIDUAL_SUM}: {exp.dump} is {info['pooling']}-pooled; the score needs "
            "frames (stage 4 with --pooling frames): on utterance means it ranks proposals "
            "poorly (docs/SEARCH_QUALITY.md)"
        )
    feats = load_layer_feats(exp.dump)
    options = measure_options(args)
    t0 = time.time()
    if args.measure == RESIDUAL_SUM:
        matrix = residual_sum_stats(feats, exp)
        what = "scores of pruning each pair of layers"
    else:
        try:
            matrix = correlation_matrix(feats, args.measure, **options)
        except ValueError as e:
            raise UsageError(f"--measure {args.measure} on {exp.dump}: {e}") from None
        with atomic_path(exp.coarse_scores(args.measure)) as tmp:
            np.save(tmp, matrix)
        what = "correlation matrix"
    seconds = time.time() - t0
    title = (
        f"{args.measure}{f' {options}' if options else ''} {what}\n"
        f"({info['pooling']} pooling, {info['num_utts']} utterances)"
    )
    plot_matrix(matrix, out_dir / HEATMAP, title, pairs=args.measure == RESIDUAL_SUM)
    atomic_write_json(
        out_dir / CORRELATION_SETTINGS,
        {
            "measure": args.measure,
            "options": options,
            "dump_dir": str(exp.dump),
            "pooling": info["pooling"],
            "num_utts": info["num_utts"],
            "num_rows": info["num_rows"],
            "num_layers": info["num_layers"],
            "seconds": seconds,
        },
    )
    logging.info(
        f"{exp.coarse_scores(args.measure)}: {args.measure} over {info['num_rows']} rows in "
        f"{seconds:.2f} s"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exp_dir", type=Path, required=True, help="holds the dump of stage 4")
    parser.add_argument("--measure", default="dc", help=f"one of {', '.join(COARSE_MEASURES)}")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=0,
        help="dc: mean of DC over batches of this many utterances (0: one batch)",
    )
    parser.add_argument(
        "--threshold", type=float, default=0.99, help="svcca/pwcca: singular-value mass kept"
    )
    add_common_args(parser)
    run(main, parser)

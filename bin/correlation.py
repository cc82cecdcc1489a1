#!/usr/bin/env python3
"""Stage 5: the (L+1) x (L+1) correlation matrix between the layer outputs of the dump of
--exp_dir, with a heatmap, into correlation/<measure>/."""

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from comflp.cli import UsageError, add_common_args, run
from comflp.expdir import CORRELATION_SETTINGS, DUMP_INFO, HEATMAP, MATRIX, ExpDir
from comflp.prune.correlation import MEASURES, correlation_matrix
from comflp.prune.dump import load_layer_feats
from comflp.report.plots import plot_matrix
from comflp.utils import atomic_path, atomic_write_json


def measure_options(args: argparse.Namespace) -> dict:
    if args.measure == "dc":
        return {"batch_size": args.batch_size or None}
    if args.measure in ("svcca", "pwcca"):
        return {"threshold": args.threshold}
    return {}


def main(args: argparse.Namespace) -> None:
    if args.measure not in MEASURES:
        raise UsageError(
            f"--measure {args.measure}: unknown measure; choose one of {', '.join(MEASURES)}"
        )
    exp = ExpDir(args.exp_dir)
    out_dir = exp.correlation(args.measure)
    feats = load_layer_feats(exp.dump)
    options = measure_options(args)
    t0 = time.time()
    try:
        matrix = correlation_matrix(feats, args.measure, **options)
    except ValueError as e:
        raise UsageError(f"--measure {args.measure} on {exp.dump}: {e}") from None
    seconds = time.time() - t0
    info = json.loads((exp.dump / DUMP_INFO).read_text())
    with atomic_path(out_dir / MATRIX) as tmp:
        np.save(tmp, matrix)
    title = (
        f"{args.measure} {options or ''} ({info['pooling']} pooling, {info['num_utts']} utterances)"
    )
    plot_matrix(matrix, out_dir / HEATMAP, title)
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
        f"{out_dir / MATRIX}: {args.measure} over {info['num_rows']} rows in {seconds:.2f} s"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exp_dir", type=Path, required=True, help="holds the dump of stage 4")
    parser.add_argument("--measure", default="dc", help=f"one of {', '.join(MEASURES)}")
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

#!/usr/bin/env python3
"""Stage 6: search which encoder layers to prune.

The coarse search ranks pruning proposals by a layer correlation matrix (CoMFLP: a block
[a..b] scores M[a-1][b], a proposal the mean of its blocks) and writes them, best first, as a
JSON list of {"layers", "blocks", "score"}; it also prints them as a table.
"""

import argparse
import logging
from pathlib import Path

import numpy as np

from comflp.cli import UsageError, add_common_args, run
from comflp.search import (
    DEFAULT_MAX_EXHAUSTIVE,
    MODES,
    Proposal,
    coarse_search,
    format_proposals,
    validate_matrix,
)
from comflp.utils import atomic_write_json


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def load_matrix(path: Path) -> np.ndarray:
    """Load and check a correlation matrix saved with ``numpy.save``."""
    if not path.is_file():
        raise UsageError(f"--matrix {path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise UsageError(f"--matrix {path}: not an array file written by numpy.save") from None
    if not isinstance(loaded, np.ndarray):
        loaded.close()
        raise UsageError(f"--matrix {path}: an .npz archive, expected one .npy array")
    try:
        return validate_matrix(loaded)
    except ValueError as e:
        raise UsageError(f"--matrix {path}: {e}") from None


def coarse(args: argparse.Namespace) -> list[Proposal]:
    """The coarse search the options ask for, best proposal first."""
    matrix = load_matrix(args.matrix)
    num_layers = matrix.shape[0] - 1
    if not 1 <= args.num_prune < num_layers:
        raise UsageError(
            f"--num_prune {args.num_prune}: must be between 1 and {num_layers - 1} "
            f"for the {num_layers}-layer matrix {args.matrix}"
        )
    try:
        proposals = coarse_search(
            matrix, args.num_prune, args.mode, args.beam_size, args.top_k, args.max_exhaustive
        )
    except ValueError as e:
        raise UsageError(f"--mode {args.mode}: {e}") from None
    logging.info(
        f"{args.mode} search, pruning {args.num_prune} of {num_layers} layers: "
        f"{len(proposals)} proposals, best score {proposals[0].score:.6f}"
    )
    return proposals


def main(args: argparse.Namespace) -> None:
    proposals = coarse(args)
    atomic_write_json(args.output, [p.to_dict() for p in proposals])
    logging.info(f"wrote {args.output}")
    print(format_proposals(proposals))


def build_parser() -> argparse.ArgumentParser:
    """The options; the coarse search's are grouped so that later steps can add their own."""
    parser = argparse.ArgumentParser(description=__doc__)
    group = parser.add_argument_group("coarse search")
    group.add_argument("--matrix", type=Path, required=True, help="(L+1) x (L+1) .npy matrix")
    group.add_argument("--num_prune", type=int, required=True, help="layers to prune")
    group.add_argument("--mode", choices=MODES, default="beam")
    group.add_argument("--beam_size", type=positive_int, default=10, help="beam mode only")
    group.add_argument("--top_k", type=positive_int, default=10, help="proposals to keep")
    group.add_argument(
        "--max_exhaustive",
        type=positive_int,
        default=DEFAULT_MAX_EXHAUSTIVE,
        help="refuse an exhaustive search over more proposals than this",
    )
    group.add_argument("--output", type=Path, required=True, help="proposals JSON to write")
    add_common_args(parser)
    return parser


if __name__ == "__main__":
    run(main, build_parser())

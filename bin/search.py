#!/usr/bin/env python3
"""Stage 6: search which encoder layers to prune.

The coarse search ranks pruning proposals by a layer correlation matrix (CoMFLP: a block
[a..b] scores M[a-1][b], a proposal the mean of its blocks) and writes them, best first, as a
JSON list of {"layers", "blocks", "score"}; it also prints them as a table.

Given a model (--exp_dir) and a dev set (--dev_cuts), it goes on to the fine search: each
proposal's pruned model is evaluated on a dev subset with --metric, the results are written to
fine_search.json beside --output, and the best pruned model to --pruned_dir.
"""

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from comflp.asr.checkpoint import (
    CMVN_NAME,
    copy_assets,
    load_experiment_config,
    load_model,
    save_model,
)
from comflp.asr.data import AsrDataset, eval_loader, load_cuts, random_subset
from comflp.asr.features import load_cmvn
from comflp.asr.model import prune_layers
from comflp.asr.tokenizer import MODEL_NAME as TOKENIZER_NAME
from comflp.asr.tokenizer import Tokenizer
from comflp.cli import UsageError, add_common_args, resolve_device, run, str2bool
from comflp.prune.evaluator import METRICS, load_batches
from comflp.prune.fine_search import fine_search
from comflp.prune.search import (
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


def coarse(args: argparse.Namespace, model_layers: int | None = None) -> list[Proposal]:
    """The coarse search the options ask for, best proposal first.

    With ``model_layers`` given, the matrix must belong to a model of that depth.
    """
    matrix = load_matrix(args.matrix)
    if model_layers is not None:
        try:
            validate_matrix(matrix, model_layers)
        except ValueError as e:
            raise UsageError(
                f"--matrix {args.matrix} does not fit --exp_dir {args.exp_dir}: {e}"
            ) from None
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


def fine_search_inputs(args: argparse.Namespace):
    """Model, tokenizer and dev batches for the fine search, or None when it was not asked for."""
    if (args.exp_dir is None) != (args.dev_cuts is None):
        raise UsageError(
            "the fine search needs both --exp_dir and --dev_cuts (or neither, for coarse only)"
        )
    if args.exp_dir is None:
        return None
    if args.num_utts < 2:
        raise UsageError(f"--num_utts must be >= 2, got {args.num_utts}")
    model = load_model(args.exp_dir, args.checkpoint)
    tokenizer = Tokenizer(args.exp_dir / TOKENIZER_NAME)
    cuts = random_subset(load_cuts(args.dev_cuts), args.num_utts, args.seed)
    dataset = AsrDataset(tokenizer, load_cmvn(args.exp_dir / CMVN_NAME))
    return model, tokenizer, load_batches(eval_loader(cuts, dataset, args.max_duration))


def main(args: argparse.Namespace) -> None:
    inputs = fine_search_inputs(args)
    start = time.perf_counter()
    proposals = coarse(args, inputs[0].cfg.num_layers if inputs else None)
    coarse_seconds = time.perf_counter() - start
    logging.info(f"coarse search: {coarse_seconds:.3f} s")
    print(format_proposals(proposals))
    if inputs is None:
        atomic_write_json(args.output, [p.to_dict() for p in proposals])
        logging.info(f"wrote {args.output}")
        return

    model, tokenizer, batches = inputs
    device = resolve_device(args.device)
    result = fine_search(
        model, batches, tokenizer, proposals, args.metric, args.prefix_cache, device
    )
    logging.info(
        f"fine search: {len(proposals)} candidates on {sum(len(b['ids']) for b in batches)} utterances "
        f"in {result.seconds:.2f} s ({result.layer_evaluations} layer passes per batch, "
        f"prefix cache {'on' if args.prefix_cache else 'off'})"
    )
    for row in result.rows:
        mark = "*" if row["coarse_rank"] == result.best + 1 else " "
        print(
            f"{mark} rank {row['coarse_rank']:>2}  layers {row['layers']}  "
            f"{args.metric} {row['metric']:.3f}  ({row['seconds']:.2f} s)"
        )
    pruned = prune_layers(model, result.best_layers)
    cfg = load_experiment_config(args.exp_dir)
    pruned_dir = args.pruned_dir or args.output.parent / "pruned"
    copy_assets(args.exp_dir, args.exp_dir / CMVN_NAME, pruned_dir)
    save_model(
        pruned,
        cfg,
        pruned_dir,
        extra={
            "pruned_layers": list(result.best_layers),
            "source": str(args.exp_dir / args.checkpoint),
        },
    )
    atomic_write_json(args.output, [p.to_dict() for p in proposals])
    atomic_write_json(
        args.output.parent / "fine_search.json",
        {
            **result.to_dict(),
            "coarse_seconds": coarse_seconds,
            "num_utts": args.num_utts,
            "matrix": str(args.matrix),
            "mode": args.mode,
            "pruned_dir": str(pruned_dir),
        },
    )
    logging.info(
        f"best: prune layers {list(result.best_layers)} ({args.metric} {result.rows[result.best]['metric']:.3f}); "
        f"pruned model in {pruned_dir}"
    )


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
    fine = parser.add_argument_group("fine search (needs --exp_dir and --dev_cuts)")
    fine.add_argument("--exp_dir", type=Path, help="experiment directory of the model to prune")
    fine.add_argument("--checkpoint", default="model.pt")
    fine.add_argument("--dev_cuts", type=Path, help="cuts of the dev set")
    fine.add_argument(
        "--num_utts", type=int, default=320, help="dev utterances evaluated (random subset)"
    )
    fine.add_argument("--seed", type=int, default=0)
    fine.add_argument("--metric", choices=METRICS, default="cer")
    fine.add_argument(
        "--prefix_cache",
        type=str2bool,
        default=True,
        help="compute layers shared by candidates' prefixes once",
    )
    fine.add_argument(
        "--max_duration", type=float, default=100.0, help="seconds of audio per batch"
    )
    fine.add_argument(
        "--pruned_dir",
        type=Path,
        help="where the best pruned model goes (default: beside --output)",
    )
    fine.add_argument("--device", default="auto")
    add_common_args(parser)
    return parser


if __name__ == "__main__":
    run(main, build_parser())

#!/usr/bin/env python3
"""Stage 6: search which encoder layers to prune, with one of the searches comflp compares.

--method comflp (CoMFLP): the coarse search ranks pruning proposals by a layer correlation
matrix (a block [a..b] scores M[a-1][b], a proposal the mean of its blocks), or by stage 5's
residual-sum statistics (--measure residual_sum, or --matrix stats.npz), and writes them,
best first, as a JSON list of {"layers", "blocks", "score"} (--output); it also prints them.
Given a model (--exp_dir) and a dev set (--dev_cuts), it goes on to the fine search: each
proposal's pruned model is evaluated on a dev subset with --metric.

--method glp (greedy metric search) and --method oracle (all C(L, P) subsets) evaluate pruned
models on the same dev subset without a matrix.

With a model, every search writes search.json (the choice, every evaluated candidate with its
metrics and time, the wall time) and the chosen pruned model (pruned/, in the model's format)
into search/<method>_prune<P>/ of --exp_dir, or beside --output.
"""

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np

from comflp.asr.data import load_eval_batches
from comflp.cli import (
    UsageError,
    add_common_args,
    add_model_args,
    load_model_args,
    parse_num_prune,
    positive_int,
    run,
    str2bool,
)
from comflp.expdir import PROPOSALS, PRUNED, SEARCH_RESULT, ExpDir
from comflp.prune.evaluator import METRICS
from comflp.prune.metric_search import (
    SearchResult,
    exhaustive_metric_search,
    fine_search,
    greedy_layer_pruning,
)
from comflp.prune.residual_sum import ResidualSumScorer
from comflp.prune.search import (
    AGGREGATIONS,
    DEFAULT_MAX_EXHAUSTIVE,
    MODES,
    BlockScorer,
    Proposal,
    ProposalScorer,
    coarse_search,
    format_proposals,
    validate_matrix,
)
from comflp.utils import atomic_write_json

SEARCHES = ("comflp", "glp", "oracle")


def load_scorer(path: Path, num_layers: int | None, aggregation: str) -> ProposalScorer:
    """Stage 5's output: a correlation matrix saved with ``numpy.save`` (checked, for a model of
    ``num_layers`` layers when given), or the ``.npz`` statistics of the residual-sum score."""
    if not path.is_file():
        raise UsageError(f"--matrix {path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise UsageError(
            f"--matrix {path}: not an array file written by numpy.save or numpy.savez"
        ) from None
    try:
        if isinstance(loaded, np.ndarray):
            return BlockScorer(validate_matrix(loaded, num_layers), aggregation)
        scorer = ResidualSumScorer.from_archive(loaded)
        if num_layers is not None and scorer.num_layers != num_layers:
            raise ValueError(
                f"residual-sum statistics of a {scorer.num_layers}-layer encoder, but the model "
                f"has {num_layers} layers"
            )
        return scorer
    except ValueError as e:
        raise UsageError(f"--matrix {path}: {e}") from None


def coarse(args: argparse.Namespace, matrix_path: Path, num_layers: int | None) -> list[Proposal]:
    """The coarse search the options ask for, best proposal first."""
    scorer = load_scorer(matrix_path, num_layers, args.aggregation)
    depth = scorer.num_layers
    parse_num_prune(args.num_prune, depth, f"the {depth}-layer scores {matrix_path}")
    try:
        proposals = coarse_search(
            scorer, args.num_prune, args.mode, args.beam_size, args.top_k, args.max_exhaustive
        )
    except ValueError as e:
        raise UsageError(f"--mode {args.mode}: {e}") from None
    logging.info(
        f"{args.mode} search, pruning {args.num_prune} of {depth} layers: "
        f"{len(proposals)} proposals, best score {proposals[0].score:.6f}"
    )
    print(format_proposals(proposals))
    return proposals


def run_comflp(args, model, batches, matrix_path: Path, out_dir: Path) -> SearchResult:
    start = time.perf_counter()
    proposals = coarse(args, matrix_path, model.num_layers)
    coarse_seconds = time.perf_counter() - start
    atomic_write_json(out_dir / PROPOSALS, [p.to_dict() for p in proposals])
    result = fine_search(
        model, batches, proposals, args.metric, args.prefix_cache, method_name(args)
    )
    result.seconds += coarse_seconds
    result.extra.update(
        coarse_seconds=coarse_seconds,
        matrix=str(matrix_path),
        mode=args.mode,
        aggregation=args.aggregation,
        beam_size=args.beam_size,
        top_k=args.top_k,
    )
    return result


def run_metric_search(args, model, batches) -> SearchResult:
    if args.method == "glp":
        return greedy_layer_pruning(model, batches, args.num_prune, args.metric, args.prefix_cache)
    return exhaustive_metric_search(
        model, batches, args.num_prune, args.metric, args.oracle_max_evaluations, args.prefix_cache
    )


def oracle_skip(args: argparse.Namespace, num_layers: int) -> str | None:
    """Why the oracle does not run (too many evaluations), or None."""
    count = math.comb(num_layers, args.num_prune)
    if args.method != "oracle" or count <= args.oracle_max_evaluations:
        return None
    return (
        f"C({num_layers}, {args.num_prune}) = {count} evaluations > "
        f"--oracle_max_evaluations {args.oracle_max_evaluations}"
    )


def method_name(args: argparse.Namespace) -> str:
    return f"comflp_{args.measure}" if args.method == "comflp" else args.method


def search_dir(args: argparse.Namespace) -> Path:
    if args.output is not None:
        return args.output.parent
    return ExpDir(args.exp_dir).search(method_name(args), args.num_prune)


def coarse_only(args: argparse.Namespace) -> None:
    if args.method != "comflp" or args.matrix is None or args.output is None:
        raise UsageError(
            "without --exp_dir and --dev_cuts only the coarse search runs: "
            "it needs --method comflp, --matrix and --output"
        )
    proposals = coarse(args, args.matrix, None)
    atomic_write_json(args.output, [p.to_dict() for p in proposals])
    logging.info(f"wrote {args.output}")


def main(args: argparse.Namespace) -> None:
    if (args.exp_dir is None) != (args.dev_cuts is None):
        raise UsageError("a search with a model needs both --exp_dir and --dev_cuts")
    if args.exp_dir is None:
        return coarse_only(args)
    if args.num_utts < 2:
        raise UsageError(f"--num_utts must be >= 2, got {args.num_utts}")
    model = load_model_args(args)
    parse_num_prune(args.num_prune, model.num_layers, f"the {model.num_layers}-layer model")
    out_dir = search_dir(args)
    if reason := oracle_skip(args, model.num_layers):
        atomic_write_json(
            out_dir / SEARCH_RESULT,
            {"method": "oracle", "num_prune": args.num_prune, "skipped": reason},
        )
        logging.info(f"oracle, P={args.num_prune}: skipped ({reason})")
        return
    batches = load_eval_batches(model, args.dev_cuts, args.max_duration, args.num_utts, args.seed)
    if args.method == "comflp":
        matrix_path = args.matrix or ExpDir(args.exp_dir).coarse_scores(args.measure)
        result = run_comflp(args, model, batches, matrix_path, out_dir)
    else:
        result = run_metric_search(args, model, batches)
    write_result(args, model, result, out_dir, len(batches))


def write_result(args, model, result: SearchResult, out_dir: Path, num_batches: int) -> None:
    if len(result.candidates) <= 50:  # the oracle's hundreds are in search.json
        for i, row in enumerate(result.candidates):
            mark = "*" if i == result.best else " "
            print(
                f"{mark} layers {row['layers']}  {args.metric} {row['metric']:.3f}  "
                f"({row['seconds']:.2f} s)"
            )
    pruned_dir = out_dir / PRUNED
    model.prune(result.best_layers).save(
        pruned_dir, {"pruned_layers": list(result.best_layers), "source": str(model.source)}
    )
    atomic_write_json(
        out_dir / SEARCH_RESULT,
        {
            **result.to_dict(),
            "num_utts": args.num_utts,
            "model_type": model.model_type,
            "model_dir": str(model.source),
            "pruned_dir": str(pruned_dir),
        },
    )
    logging.info(
        f"{result.method}, P={args.num_prune}: layers {list(result.best_layers)} "
        f"({args.metric} {result.best_metric:.3f}) after {len(result.candidates)} evaluations in "
        f"{result.seconds:.1f} s ({result.layer_evaluations} layer passes per batch, {num_batches} "
        f"batches, prefix cache {'on' if args.prefix_cache else 'off'}); pruned model in {pruned_dir}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=SEARCHES, default="comflp")
    parser.add_argument("--num_prune", type=int, required=True, help="layers to prune")
    group = parser.add_argument_group("coarse search (CoMFLP)")
    group.add_argument(
        "--matrix",
        type=Path,
        help="(L+1) x (L+1) .npy matrix or residual-sum stats.npz (default: stage 5's of --measure)",
    )
    group.add_argument(
        "--measure", default="dc", help="with --exp_dir: whose stage-5 output to use"
    )
    group.add_argument("--mode", choices=MODES, default="beam")
    group.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default="mean",
        help="proposal score on a matrix: mean of its blocks' correlations (CoMFLP) or minus "
        "the summed damage 1 - correlation of its blocks (residual_sum ignores it)",
    )
    group.add_argument("--beam_size", type=positive_int, default=10, help="beam mode only")
    group.add_argument("--top_k", type=positive_int, default=10, help="proposals to keep")
    group.add_argument(
        "--max_exhaustive",
        type=positive_int,
        default=DEFAULT_MAX_EXHAUSTIVE,
        help="refuse an exhaustive coarse search over more proposals than this",
    )
    group.add_argument("--output", type=Path, help="proposals JSON to write (results go beside it)")
    evaluation = parser.add_argument_group(
        "evaluation on a dev subset (needs --exp_dir and --dev_cuts)"
    )
    add_model_args(evaluation, required=False)
    evaluation.add_argument("--dev_cuts", type=Path, help="cuts of the dev set")
    evaluation.add_argument(
        "--num_utts", type=int, default=320, help="dev utterances evaluated (random subset)"
    )
    evaluation.add_argument("--seed", type=int, default=0)
    evaluation.add_argument("--metric", choices=METRICS, default="cer")
    evaluation.add_argument(
        "--prefix_cache",
        type=str2bool,
        default=True,
        help="compute layers shared by candidates' prefixes once",
    )
    evaluation.add_argument(
        "--max_duration", type=float, default=100.0, help="seconds of audio per batch"
    )
    evaluation.add_argument(
        "--oracle_max_evaluations",
        type=int,
        default=1000,
        help="oracle: skip (and say so) when C(L, P) is larger than this",
    )
    add_common_args(parser)
    return parser


if __name__ == "__main__":
    run(main, build_parser())

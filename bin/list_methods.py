#!/usr/bin/env python3
"""Stage 7, step 1: list the layers every method prunes, for each number of pruned layers P.

CoMFLP's choices come from stage 6; the fixed rules (drop top/bottom, every other, random
seeds, intermediate-CTC on demand) are computed; GLP and the exhaustive metric search run here
on the same dev subset as the fine search. Writes methods.json for decoding.
"""

import argparse
import logging
from pathlib import Path

from comflp.asr.checkpoint import CMVN_NAME, load_model
from comflp.asr.data import AsrDataset, eval_loader, load_cuts, random_subset
from comflp.asr.features import load_cmvn
from comflp.asr.tokenizer import MODEL_NAME as TOKENIZER_NAME
from comflp.asr.tokenizer import Tokenizer
from comflp.cli import UsageError, add_common_args, resolve_device, run, str2bool
from comflp.prune.evaluator import METRICS, load_batches
from comflp.prune.methods import Method, MethodList, comflp_methods
from comflp.prune.rules import (
    drop_bottom,
    drop_top,
    every_other,
    exhaustive_metric_search,
    greedy_layer_pruning,
    random_layers,
)


def main(args: argparse.Namespace) -> None:
    exp = args.exp_dir
    model = load_model(exp)
    num_layers = model.cfg.num_layers
    try:
        prunes = [int(p) for p in args.num_prune.split()]
    except ValueError:
        raise UsageError(
            f'--num_prune {args.num_prune!r}: expected integers, e.g. "2 4 6"'
        ) from None
    bad = [p for p in prunes if not 1 <= p < num_layers]
    if bad or not prunes:
        raise UsageError(
            f"--num_prune {args.num_prune!r}: each value must be between 1 and "
            f"{num_layers - 1} for the {num_layers}-layer model in {exp}"
        )
    tokenizer = Tokenizer(exp / TOKENIZER_NAME)
    need_dev = args.glp or args.oracle_max_evaluations > 0
    batches = []
    if need_dev:
        dev = random_subset(load_cuts(args.dev_cuts), args.num_utts, args.seed)
        dataset = AsrDataset(tokenizer, load_cmvn(exp / CMVN_NAME))
        batches = load_batches(eval_loader(dev, dataset, args.max_duration))
    device = resolve_device(args.device)
    methods = MethodList()
    methods.add(Method("unpruned", 0, [], str(exp), note=f"{num_layers} layers"))
    for p in prunes:
        for measure in args.measures.split():
            for m in comflp_methods(exp, measure, p):
                methods.add(m)
        methods.add(Method("drop_top", p, list(drop_top(num_layers, p)), str(exp), 0.0, 0))
        methods.add(
            Method(
                "interctc_on_demand",
                p,
                list(drop_top(num_layers, p)),
                str(exp),
                0.0,
                0,
                note="exit at layer L-P via the shared final norm and CTC head: same model as drop_top",
            )
        )
        methods.add(Method("drop_bottom", p, list(drop_bottom(num_layers, p)), str(exp), 0.0, 0))
        methods.add(Method("every_other", p, list(every_other(num_layers, p)), str(exp), 0.0, 0))
        for seed in range(args.random_seeds):
            methods.add(
                Method(
                    "random",
                    p,
                    list(random_layers(num_layers, p, seed)),
                    str(exp),
                    0.0,
                    0,
                    seed=seed,
                )
            )
        if args.glp:
            glp = greedy_layer_pruning(
                model, batches, tokenizer, p, args.metric, args.prefix_cache, device
            )
            logging.info(
                f"GLP, P={p}: layers {list(glp.pruned)} ({args.metric} {glp.metric_value:.2f}) "
                f"after {glp.evaluations} evaluations in {glp.seconds:.1f} s"
            )
            methods.add(
                Method(
                    "glp",
                    p,
                    list(glp.pruned),
                    str(exp),
                    glp.seconds,
                    glp.evaluations,
                    note="greedy by dev " + args.metric,
                )
            )
        if args.oracle_max_evaluations > 0:
            try:
                oracle = exhaustive_metric_search(
                    model,
                    batches,
                    tokenizer,
                    p,
                    args.metric,
                    args.oracle_max_evaluations,
                    args.prefix_cache,
                    device,
                )
            except ValueError as e:
                logging.info(f"oracle skipped for P={p}: {e}")
                continue
            logging.info(
                f"exhaustive metric search, P={p}: layers {list(oracle.pruned)} "
                f"({args.metric} {oracle.metric_value:.2f}) in {oracle.seconds:.1f} s"
            )
            methods.add(
                Method(
                    "oracle",
                    p,
                    list(oracle.pruned),
                    str(exp),
                    oracle.seconds,
                    oracle.evaluations,
                    note="exhaustive by dev " + args.metric,
                )
            )
    methods.save(args.output)
    logging.info(
        f"{args.output}: {len(methods.methods)} entries, {len(methods.unique())} distinct models to decode"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exp_dir", type=Path, required=True)
    parser.add_argument("--num_prune", required=True, help='space-separated, e.g. "2 4 6"')
    parser.add_argument("--measures", default="dc", help="CoMFLP measures searched in stage 6")
    parser.add_argument("--dev_cuts", type=Path, help="dev set of the metric-based searches")
    parser.add_argument("--num_utts", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metric", choices=METRICS, default="cer")
    parser.add_argument("--random_seeds", type=int, default=5, help="random selections per P")
    parser.add_argument(
        "--glp", type=str2bool, default=True, help="run the greedy metric search (GLP)"
    )
    parser.add_argument(
        "--oracle_max_evaluations",
        type=int,
        default=1000,
        help="run the exhaustive metric search when C(L, P) is at most this (0: never)",
    )
    parser.add_argument("--prefix_cache", type=str2bool, default=True)
    parser.add_argument("--max_duration", type=float, default=100.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path, required=True)
    add_common_args(parser)
    run(main, parser)

#!/usr/bin/env python3
"""Does intermediate CTC + stochastic depth make a model degrade gracefully when layers go?

Trains the same architecture twice on the built-in corpus (stages 0-2 must have run in
--workdir): once with intermediate CTC and stochastic depth, once with neither. Then evaluates
each with all layers and pruned to L - P layers (drop the top P = early exit through the shared
final norm and CTC head; and every other layer), greedy-CTC CER on the dev set. Prints a
Markdown table and writes it to --output.

    python bench/interctc_ablation.py --workdir . --epochs 6 --output exp/interctc_ablation.md
    python bench/interctc_ablation.py --workdir . --epochs 3 --num_train 2000  # shorter
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from comflp.adapters.native import NativeModel
from comflp.asr.checkpoint import copy_assets
from comflp.asr.config import load_config
from comflp.asr.data import ctc_feasible, load_cuts, load_eval_batches, random_subset
from comflp.asr.features import load_cmvn
from comflp.asr.tokenizer import Tokenizer
from comflp.cli import add_common_args, run
from comflp.expdir import CMVN, TOKENIZER
from comflp.prune.evaluator import evaluate_subsets
from comflp.prune.rules import drop_top, every_other
from comflp.subsets import kept_layers
from comflp.train.trainer import train
from comflp.utils import atomic_write_text

VARIANTS = {
    "interctc + stochastic depth": {},
    "plain (neither)": {
        "model.interctc_layers": [],
        "model.interctc_weight": 0.0,
        "model.stochastic_depth_rate": 0.0,
    },
}


def format_rows(rows: list[tuple[str, float, dict[str, float]]]) -> str:
    """The Markdown table: one row per variant, its dev CER per subset and training seconds."""
    columns = list(rows[0][2])
    lines = [
        "| model | " + " | ".join(f"dev CER, {c}" for c in columns) + " | training (s) |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for name, seconds, cers in rows:
        lines.append(
            f"| {name} | " + " | ".join(f"{cers[c]:.2f}" for c in columns) + f" | {seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    w = args.workdir
    lang = w / args.lang_dir
    train_cuts_path, dev_cuts_path = (
        w / f"data/fbank/cuts_{args.train_set}.jsonl.gz",
        w / f"data/fbank/cuts_{args.dev_set}.jsonl.gz",
    )
    train_cuts = load_cuts(train_cuts_path)
    if args.num_train:
        train_cuts = random_subset(train_cuts, args.num_train, seed=0)
    rows = []
    for name, overrides in VARIANTS.items():
        exp = args.exp_root / name.split()[0]
        cfg = load_config(args.config, {**overrides, "train.num_epochs": args.epochs})
        copy_assets(lang, w / "data/fbank/cmvn.json", exp)
        tokenizer = Tokenizer(exp / TOKENIZER)
        cfg.model.vocab_size = tokenizer.vocab_size
        cmvn = load_cmvn(exp / CMVN)
        start = time.time()
        train(
            cfg,
            exp,
            ctc_feasible(train_cuts, tokenizer, "train", cfg.model.ctc_upsample),
            load_cuts(dev_cuts_path),
            tokenizer,
            cmvn,
            resume=True,
        )
        seconds = time.time() - start
        model = NativeModel.load(exp)
        num_layers = model.num_layers
        batches = load_eval_batches(model, dev_cuts_path, max_duration=100.0)
        subsets = {
            f"all {num_layers} layers": tuple(range(1, num_layers + 1)),
            f"drop top {args.num_prune}": kept_layers(
                num_layers, drop_top(num_layers, args.num_prune)
            ),
            f"every other ({args.num_prune})": kept_layers(
                num_layers, every_other(num_layers, args.num_prune)
            ),
        }
        results = evaluate_subsets(model, batches, list(subsets.values()))
        rows.append((name, seconds, {k: r.cer for k, r in zip(subsets, results)}))
        logging.info(f"{name}: {rows[-1][2]}")
    table = format_rows(rows)
    print(table)
    if args.output:
        atomic_write_text(
            args.output,
            f"Config: {args.config}, {args.epochs} epochs, {len(train_cuts)} training "
            f"utterances.\n\n{table}",
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("."), help="where stages 0-2 ran")
    parser.add_argument("--config", type=Path, default=Path("conf/train.yaml"))
    parser.add_argument("--lang_dir", default="data/lang_char")
    parser.add_argument("--train_set", default="train-clean-100")
    parser.add_argument("--dev_set", default="dev-clean")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument(
        "--num_train", type=int, default=0, help="train on this many utterances (0: all)"
    )
    parser.add_argument("--num_prune", type=int, default=6)
    parser.add_argument("--exp_root", type=Path, default=Path("exp/interctc_ablation"))
    parser.add_argument("--output", type=Path)
    add_common_args(parser)
    run(main, parser)

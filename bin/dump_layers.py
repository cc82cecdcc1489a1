#!/usr/bin/env python3
"""Stage 4, step 1: dump the encoder input and every layer's output for part --part of
--num_parts of a calibration subset (kaldiio ark/scp) into dump/parts/<part>/ of --exp_dir;
bin/merge_dump.py joins the parts."""

import argparse
from pathlib import Path

from comflp.asr.data import eval_loader, load_cuts, part_of, random_subset
from comflp.cli import UsageError, add_common_args, add_model_args, load_model_args, run
from comflp.expdir import ExpDir
from comflp.prune.dump import POOLINGS, dump_layers


def main(args: argparse.Namespace) -> None:
    if not 1 <= args.part <= args.num_parts:
        raise UsageError(f"--part {args.part} must be between 1 and --num_parts {args.num_parts}")
    model = load_model_args(args)
    calibration = random_subset(load_cuts(args.cuts), args.num_utts, args.seed)
    cuts = part_of(calibration, args.part, args.num_parts)
    dump_layers(
        model,
        eval_loader(cuts, model.dataset(), args.max_duration),
        ExpDir(args.exp_dir).dump_part(args.part),
        pooling=args.pooling,
        frames_per_utt=args.frames_per_utt,
        seed=args.seed,
        extra_info={
            "model_type": model.model_type,
            "model_dir": str(model.source),
            "cuts": str(args.cuts),
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_args(parser)
    parser.add_argument(
        "--cuts", type=Path, required=True, help="cuts to draw the calibration subset from"
    )
    parser.add_argument(
        "--num_utts", type=int, default=320, help="calibration utterances (CoMFLP: 32 x 10)"
    )
    parser.add_argument("--pooling", choices=POOLINGS, default="mean")
    parser.add_argument(
        "--frames_per_utt",
        type=int,
        default=0,
        help="frames pooling: random frames kept per utterance (0: all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max_duration", type=float, default=100.0, help="seconds of audio per batch"
    )
    parser.add_argument("--part", type=int, default=1, help="which part (1-based) to dump")
    parser.add_argument("--num_parts", type=int, default=1)
    add_common_args(parser)
    run(main, parser)

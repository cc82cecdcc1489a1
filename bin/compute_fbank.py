#!/usr/bin/env python3
"""Stage 1, step 1: 80-dim fbank (lhotse, lilcom storage) for part --part of --num_parts of each subset.

Run as a job array (JOB=1:N), then bin/merge_fbank.py. Utterances too short for the x4
subsampling or longer than --max_utt_duration are dropped with a logged count. With
--speed_perturb true the training set gets 0.9x and 1.1x speed copies of every utterance first
(ids suffixed _sp0.9 and _sp1.1); the other subsets are left as they are.
"""

import argparse
import logging
from pathlib import Path

from comflp.asr.data import load_cuts, part_of
from comflp.asr.features import SPEED_FACTORS, add_speed_perturbation, compute_fbank
from comflp.cli import UsageError, add_common_args, run, str2bool


def main(args: argparse.Namespace) -> None:
    subsets = args.subsets.split()
    if args.train_set not in subsets:
        raise UsageError(f"--train_set {args.train_set} must be one of --subsets ({args.subsets})")
    if not 1 <= args.part <= args.num_parts:
        raise UsageError(f"--part {args.part} must be between 1 and --num_parts {args.num_parts}")
    for subset in subsets:
        cuts = load_cuts(args.manifest_dir / f"cuts_{subset}.jsonl.gz")
        if subset == args.train_set and args.speed_perturb:
            cuts = add_speed_perturbation(cuts)
            factors = ", ".join(map(str, SPEED_FACTORS))
            logging.info(f"{subset}: {len(cuts)} utterances with speed copies ({factors})")
        part = part_of(cuts, args.part, args.num_parts)
        name = f"{subset}.{args.part}"
        compute_fbank(part, args.output_dir / "parts", name, 1, args.max_utt_duration)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest_dir", type=Path, default=Path("data/manifests"))
    parser.add_argument("--output_dir", type=Path, default=Path("data/fbank"))
    parser.add_argument("--subsets", required=True, help="space-separated subset names")
    parser.add_argument(
        "--train_set", required=True, help="the subset speed perturbation applies to"
    )
    parser.add_argument("--part", type=int, default=1, help="which part (1-based) to compute")
    parser.add_argument("--num_parts", type=int, default=1)
    parser.add_argument(
        "--max_utt_duration", type=float, default=20.0, help="drop longer utterances (s)"
    )
    parser.add_argument(
        "--speed_perturb",
        type=str2bool,
        default=False,
        help="add 0.9x and 1.1x speed copies of the training set",
    )
    add_common_args(parser)
    run(main, parser)

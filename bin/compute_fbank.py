#!/usr/bin/env python3
"""Stage 1: 80-dim fbank for each subset (lhotse, parallel), length filtering, global CMVN of the training set."""

import argparse
import logging
from pathlib import Path

from comflp.cli import UsageError, add_common_args, run
from comflp.data import load_cuts
from comflp.features import compute_cmvn, compute_fbank, save_cmvn


def main(args: argparse.Namespace) -> None:
    subsets = args.subsets.split()
    if args.train_set not in subsets:
        raise UsageError(f"--train_set {args.train_set} must be one of --subsets ({args.subsets})")
    for subset in subsets:
        cuts = load_cuts(args.manifest_dir / f"cuts_{subset}.jsonl.gz")
        with_feats = compute_fbank(cuts, args.output_dir, subset, args.nj, args.max_utt_duration)
        if subset == args.train_set:
            stats = compute_cmvn(with_feats)
            save_cmvn(stats, args.output_dir / "cmvn.json")
            logging.info(
                f"{args.output_dir}/cmvn.json: global CMVN over {stats['frames']} frames of {subset}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest_dir", type=Path, default=Path("data/manifests"))
    parser.add_argument("--output_dir", type=Path, default=Path("data/fbank"))
    parser.add_argument("--subsets", required=True, help="space-separated subset names")
    parser.add_argument("--train_set", required=True, help="the subset CMVN statistics come from")
    parser.add_argument(
        "--max_utt_duration", type=float, default=20.0, help="drop longer utterances (s)"
    )
    parser.add_argument("--nj", type=int, default=2)
    add_common_args(parser)
    run(main, parser)

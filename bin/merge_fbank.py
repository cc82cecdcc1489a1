#!/usr/bin/env python3
"""Stage 1, step 2: merge the feature parts of each subset into data/fbank/cuts_<subset>.jsonl.gz
and compute the global CMVN statistics of the training set."""

import argparse
import logging
from pathlib import Path

from lhotse import CutSet

from comflp.asr.data import load_cuts
from comflp.asr.features import compute_cmvn, save_cmvn
from comflp.cli import UsageError, add_common_args, run
from comflp.utils import atomic_path


def main(args: argparse.Namespace) -> None:
    subsets = args.subsets.split()
    if args.train_set not in subsets:
        raise UsageError(f"--train_set {args.train_set} must be one of --subsets ({args.subsets})")
    merged = {}
    for subset in subsets:
        parts = []
        for part in range(1, args.num_parts + 1):
            path = args.output_dir / "parts" / f"cuts_{subset}.{part}.jsonl.gz"
            if not path.is_file():
                raise UsageError(
                    f"{path}: missing (run bin/compute_fbank.py for parts 1..{args.num_parts})"
                )
            parts.append(load_cuts(path))
        merged[subset] = CutSet.from_cuts(sorted((c for p in parts for c in p), key=lambda c: c.id))
    for subset, cuts in merged.items():
        with atomic_path(args.output_dir / f"cuts_{subset}.jsonl.gz") as tmp:
            cuts.to_file(tmp)
        logging.info(
            f"{args.output_dir}/cuts_{subset}.jsonl.gz: {len(cuts)} utterances from {args.num_parts} part(s)"
        )
    stats = compute_cmvn(merged[args.train_set])
    save_cmvn(stats, args.output_dir / "cmvn.json")
    logging.info(
        f"{args.output_dir}/cmvn.json: global CMVN over {stats['frames']} frames of {args.train_set}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", type=Path, default=Path("data/fbank"))
    parser.add_argument("--subsets", required=True, help="space-separated subset names")
    parser.add_argument("--train_set", required=True, help="the subset CMVN statistics come from")
    parser.add_argument("--num_parts", type=int, default=1)
    add_common_args(parser)
    run(main, parser)

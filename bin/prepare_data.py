#!/usr/bin/env python3
"""Stage 0: read a corpus directory with lhotse's preparation and write data/manifests/cuts_<subset>.jsonl.gz."""

import argparse
from pathlib import Path

from comflp.cli import UsageError, add_common_args, run
from comflp.corpus import prepare_librispeech_cuts, write_cuts

CORPORA = ("librispeech",)


def main(args: argparse.Namespace) -> None:
    subsets = args.subsets.split()
    if not subsets:
        raise UsageError("--subsets is empty")
    if args.corpus == "librispeech":
        cuts = prepare_librispeech_cuts(args.corpus_dir, subsets, args.nj)
    else:
        raise UsageError(f"--corpus {args.corpus}: expected one of {', '.join(CORPORA)}")
    write_cuts(cuts, args.output_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", default="librispeech", help=f"one of {', '.join(CORPORA)}")
    parser.add_argument("--corpus_dir", type=Path, required=True)
    parser.add_argument("--subsets", required=True, help="space-separated subset names")
    parser.add_argument("--output_dir", type=Path, default=Path("data/manifests"))
    parser.add_argument("--nj", type=int, default=2)
    add_common_args(parser)
    run(main, parser)

#!/usr/bin/env python3
"""Stage 0, built-in corpus: synthesise English speech with espeak-ng in LibriSpeech's layout.

Writes <corpus_dir>/{train-clean-100,dev-clean,test-clean}/<speaker>/<chapter>/*.flac and
*.trans.txt. Same seed, same corpus; a subset already complete is left as it is.
"""

import argparse
import logging

from comflp.cli import UsageError, add_common_args, run
from comflp.corpus.synth import SUBSET_ROLES, check_tools, synthesize_corpus


def main(args: argparse.Namespace) -> None:
    sizes = {}
    for subset, role in SUBSET_ROLES.items():
        size = getattr(args, f"num_{role}")
        if size < 1:
            raise UsageError(f"--num_{role} must be >= 1, got {size}")
        sizes[subset] = size
    try:
        check_tools()
    except RuntimeError as e:
        raise UsageError(str(e)) from None
    synthesize_corpus(args.corpus_dir, sizes, args.corpus_seed, args.nj)
    logging.info(f"{args.corpus_dir}: built-in corpus ready ({sizes})")


if __name__ == "__main__":
    from pathlib import Path

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus_dir", type=Path, required=True)
    parser.add_argument("--num_train", type=int, default=8000)
    parser.add_argument("--num_dev", type=int, default=200)
    parser.add_argument("--num_test", type=int, default=200)
    parser.add_argument("--corpus_seed", type=int, default=0, help="same seed, same corpus")
    parser.add_argument("--nj", type=int, default=2, help="parallel espeak-ng processes")
    add_common_args(parser)
    run(main, parser)

#!/usr/bin/env python3
"""Stage 0: read a corpus (LibriSpeech layout, AISHELL-1 layout or Kaldi data directories) with
lhotse's preparation and write data/manifests/cuts_<subset>.jsonl.gz, one cut per utterance.

LibriSpeech's train-960 is written as one cut set of train-clean-100, train-clean-360 and
train-other-500. With --download true, lhotse first downloads and extracts the corpus
(LibriSpeech: the parts the subsets need; AISHELL-1) into --corpus_dir, which must then end with
/LibriSpeech or /aishell; parts lhotse completed before are not fetched again.
"""

import argparse
from pathlib import Path

from comflp.cli import UsageError, add_common_args, run, str2bool
from comflp.corpus.prepare import (
    DEFAULT_DOWNLOAD_URL,
    download_corpus,
    prepare_aishell_cuts,
    prepare_kaldi_cuts,
    prepare_librispeech_cuts,
    write_cuts,
)

PREPARE = {
    "librispeech": prepare_librispeech_cuts,
    "aishell": prepare_aishell_cuts,
    "kaldi": prepare_kaldi_cuts,
}


def main(args: argparse.Namespace) -> None:
    subsets = args.subsets.split()
    if not subsets:
        raise UsageError("--subsets is empty")
    if args.corpus not in PREPARE:
        raise UsageError(f"--corpus {args.corpus}: expected one of {', '.join(PREPARE)}")
    if args.download:
        download_corpus(args.corpus, args.corpus_dir, subsets, args.download_url.rstrip("/"))
    write_cuts(PREPARE[args.corpus](args.corpus_dir, subsets, args.nj), args.output_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", default="librispeech", help=f"one of {', '.join(PREPARE)}")
    parser.add_argument(
        "--corpus_dir",
        type=Path,
        required=True,
        help="LibriSpeech: the directory holding the subsets; AISHELL-1: the one holding "
        "data_aishell/; kaldi: the one holding one data directory per subset",
    )
    parser.add_argument("--subsets", required=True, help="space-separated subset names")
    parser.add_argument("--output_dir", type=Path, default=Path("data/manifests"))
    parser.add_argument(
        "--download", type=str2bool, default=False, help="download the corpus first (lhotse)"
    )
    parser.add_argument(
        "--download_url", default=DEFAULT_DOWNLOAD_URL, help="OpenSLR resources URL or a mirror"
    )
    parser.add_argument("--nj", type=int, default=2)
    add_common_args(parser)
    run(main, parser)

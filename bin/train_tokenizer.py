#!/usr/bin/env python3
"""Stage 2: train the sentencepiece tokenizer (BPE or characters) on the training transcripts."""

import argparse
import logging
from pathlib import Path

from comflp.asr.data import cut_text, load_cuts
from comflp.asr.tokenizer import train_tokenizer
from comflp.cli import add_common_args, run


def main(args: argparse.Namespace) -> None:
    texts = [cut_text(c) for c in load_cuts(args.cuts)]
    tokenizer = train_tokenizer(texts, args.output_dir, args.token_type, args.vocab_size)
    logging.info(
        f"{args.output_dir}: {args.token_type} tokenizer, {tokenizer.vocab_size} tokens "
        "(with <blk> and <sos/eos>)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cuts", type=Path, required=True, help="training cuts with transcripts")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--token_type", choices=["bpe", "char"], default="bpe")
    parser.add_argument("--vocab_size", type=int, default=256, help="BPE pieces (ignored for char)")
    add_common_args(parser)
    run(main, parser)

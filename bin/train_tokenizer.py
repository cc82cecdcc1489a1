#!/usr/bin/env python3
"""Stage 2: train the sentencepiece tokenizer (BPE or characters) on the training transcripts."""

from comflp.cli import main
from comflp.stages.data import TokenizerSettings, tokenizer

if __name__ == "__main__":
    main(TokenizerSettings, tokenizer, __doc__)

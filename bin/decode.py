#!/usr/bin/env python3
"""Stage 7, step 2 (and 8, 9): decode a set with every distinct pruned model of a method list,
each once, in parts of a job array (compare/decode/<set>/<model>/part<J>.json); with
--model_dir instead, one model."""

from comflp.cli import main
from comflp.stages.compare import DecodeSettings, decode

if __name__ == "__main__":
    main(DecodeSettings, decode, __doc__)

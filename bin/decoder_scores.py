#!/usr/bin/env python3
"""Decoder scores that look at decoding (KL to the full decoder under teacher forcing, a short
free-running decode) ranked against the dev CER of every proposal of a decoder stack
(comflp/quality/decoder.py; docs/SEARCH_QUALITY.md)."""

from comflp.cli import main
from comflp.quality.decoder import DecoderStudySettings, decoder_study

if __name__ == "__main__":
    main(DecoderStudySettings, decoder_study, __doc__)

#!/usr/bin/env python3
"""The decoder measures across models (bin/decoder_scores.py's studies), each at P = half its
decoder's layers: each measure's Spearman and the median over the models, and, where a
search-quality study of the same model sits beside it, the default scores' and pipeline's
(docs/SEARCH_QUALITY.md, "Decoder stacks")."""

from comflp.cli import main
from comflp.quality.decoder import DecoderSummarySettings, summarize_decoders

if __name__ == "__main__":
    main(DecoderSummarySettings, summarize_decoders, __doc__)

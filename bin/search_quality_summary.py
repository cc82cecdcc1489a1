#!/usr/bin/env python3
"""The search-quality study across models: per score the median and worst Spearman and top-10
regret over several models' studies (bin/search_quality.py), the default pipeline's choice on
each, and how rankings move with another calibration subset (docs/SEARCH_QUALITY.md)."""

from comflp.cli import main
from comflp.quality.stage import SummarySettings, summarize

if __name__ == "__main__":
    main(SummarySettings, summarize, __doc__)

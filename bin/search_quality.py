#!/usr/bin/env python3
"""The search-quality study: how well each coarse scoring variant ranks pruning proposals by the
dev CER of their pruned models (comflp/quality/stage.py; docs/SEARCH_QUALITY.md)."""

from comflp.cli import main
from comflp.quality.stage import QualitySettings, study

if __name__ == "__main__":
    main(QualitySettings, study, __doc__)

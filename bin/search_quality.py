#!/usr/bin/env python3
"""The search-quality study: how well each coarse scoring variant ranks pruning proposals by the
dev CER of their pruned models (comflp/stages/quality.py; docs/SEARCH_QUALITY.md)."""

from comflp.cli import main
from comflp.stages.quality import QualitySettings, study

if __name__ == "__main__":
    main(QualitySettings, study, __doc__)

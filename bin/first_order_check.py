#!/usr/bin/env python3
"""How far the residual-sum score's first-order view holds on a model's encoder: for each layer
removed alone, the top state's real change against the one the score predicts
(comflp/quality/linearity.py; docs/SEARCH_QUALITY.md)."""

from comflp.cli import main
from comflp.quality.linearity import LinearitySettings, linearity

if __name__ == "__main__":
    main(LinearitySettings, linearity, __doc__)

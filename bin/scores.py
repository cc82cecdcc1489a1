#!/usr/bin/env python3
"""Stage 5: build every score of --scores once from the stage-4 dump into scores/<name>/: the
score's file (a correlation matrix, residual-sum statistics, ...), its heatmap and settings.json."""

from comflp.cli import main
from comflp.stages.scores import ScoreSettings, build_scores

if __name__ == "__main__":
    main(ScoreSettings, build_scores, __doc__)

"""Proposal scores (stage 5): every way of ranking pruning proposals, one registry
(:data:`SCORES`); each module of this package registers its scores."""

from comflp.prune.scores.base import (
    SCORES,
    ProposalScore,
    ScoreOptions,
    build_score,
    read_score_file,
)

__all__ = ["SCORES", "ProposalScore", "ScoreOptions", "build_score", "read_score_file"]

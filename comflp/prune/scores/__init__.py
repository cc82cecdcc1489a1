"""Proposal scores (stage 5): every way of ranking pruning proposals, one registry
(:data:`SCORES`); each module of this package registers its scores."""

from comflp.prune.scores.base import SCORES, ProposalScore, read_score_file, score_options

__all__ = ["SCORES", "ProposalScore", "read_score_file", "score_options"]

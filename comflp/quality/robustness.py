"""The search-quality study across models: how each score ranks proposals on every model, and
how the default pipeline (the consensus's top K and each score's first few, one fine search)
does.

Input: the ``quality.json`` of :mod:`comflp.quality.stage` for several models (all proposals
of one P evaluated on each). Per model and score: Spearman against the dev CER and the relative
regret of the best of its top 10 against the oracle; then per score the median and the worst
over the models. ``consensus`` is the mean of the default scores' standardised values, a rank
aggregation computed on the study's proposals (all of them: the same standardisation stage 6
uses up to 2,000 proposals). The pipeline's choice is the lowest CER among the proposals stage
6 merges: the consensus's top K (here from the whole ranking, where stage 6 beam-searches it)
and each score's first ``score_top_k`` of its beam; without a consensus, each score's beam top K;
the proposals of the ``fine_rules``; then ``refine``'s one-swap local search where it applies
(:mod:`comflp.prune.searches.refine`, on the stored CERs). A second study of a model with another random calibration subset shows how
the ranking moves with it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from comflp.prune.ranks import spearman
from comflp.prune.rules import DEFAULT_FINE_RULES, rule_proposals
from comflp.prune.scores.consensus import ConsensusScore
from comflp.prune.search import COARSE_TOP_K, Proposal
from comflp.prune.searches.comflp import merge
from comflp.prune.searches.refine import (
    DEFAULT_REFINE,
    climb,
    ranking_disagrees,
    should_refine,
)
from comflp.quality.study import best_of_top_k_regret


def result_for(study: dict, num_prune: int) -> dict:
    """The study's result of one P (ValueError when it has none)."""
    for result in study["results"]:
        if result["num_prune"] == num_prune:
            return result
    have = [r["num_prune"] for r in study["results"]]
    raise ValueError(f"the study of {study['model_dir']} has no P = {num_prune} (has {have})")


def variant_name(score: str, reference: int) -> str:
    """The study's name of a score as stage 5 builds it by default (frames, N = reference)."""
    label = "dc_b32" if score == "dc" else score
    return f"{label}/frames/N{reference}"


def _variants(result: dict, names: Sequence[str]) -> dict[str, dict]:
    by_name = {v["name"]: v for v in result["variants"]}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"variants {', '.join(missing)} are not in the study")
    return {n: by_name[n] for n in names}


def _label(variant: dict) -> str:
    """A variant's name; a consensus's names its members, which differ between studies."""
    if variant.get("score") != "consensus":
        return variant["name"]
    members = "+".join(name.split("/")[0] for name in variant["options"]["of"])
    return variant["name"].replace("consensus", f"consensus of {members}", 1)


def study_consensus_label(members: Sequence[str]) -> str:
    """The summaries' name of the members' consensus standardised over a study's proposals."""
    return f"consensus of {'+'.join(members)} (over the study's proposals)"


def consensus(scores: Sequence[np.ndarray]) -> np.ndarray:
    """The mean of the scores standardised over the proposals (a scale-free rank aggregation)."""
    z = [(s - s.mean()) / (s.std() or 1.0) for s in map(np.asarray, scores)]
    return np.mean(z, axis=0)


def quality(scores: np.ndarray, cer: np.ndarray) -> dict[str, float]:
    regret = best_of_top_k_regret(scores, cer, 10)
    return {"spearman": spearman(scores, cer), "relative@10": regret["relative"]}


def model_summary(
    study: dict,
    num_prune: int,
    defaults: Sequence[str],
    top_k: int = COARSE_TOP_K,
    score_top_k: int = 1,
    use_consensus: bool = True,
    refine: str = DEFAULT_REFINE,
    fine_rules: Sequence[str] = tuple(DEFAULT_FINE_RULES),
) -> dict[str, Any]:
    """One model: every variant's Spearman and top-10 regret, the consensus, the pipeline."""
    result = result_for(study, num_prune)
    if not result["exhaustive"]:
        raise ValueError(f"{study['model_dir']}: P = {num_prune} was sampled, not exhaustive")
    cer = np.array([p["cer"] for p in result["proposals"]])
    layers = [tuple(p["layers"]) for p in result["proposals"]]
    names = [variant_name(s, study["reference"]) for s in defaults]
    chosen = _variants(result, names)
    scores = {_label(v): quality(np.array(v["scores"]), cer) for v in result["variants"]}
    agreed = consensus([np.array(chosen[n]["scores"]) for n in names])
    scores[study_consensus_label(defaults)] = quality(agreed, cer)
    rankings = {
        n: [Proposal(tuple(x), 0.0) for x in chosen[n]["beam_layers"][:top_k]] for n in names
    }
    if use_consensus and len(names) > 1:
        order = np.argsort(-agreed, kind="stable")[:top_k]
        rankings[ConsensusScore.name] = [Proposal(layers[i], float(agreed[i])) for i in order]
    fixed = rule_proposals(fine_rules, study["stack"], study["num_layers"], num_prune)
    merged = merge(rankings, score_top_k, {ConsensusScore.name}, fixed.values())  # stage 6's
    cer_of = dict(zip(layers, cer.tolist(), strict=True))
    judged = ConsensusScore.name if ConsensusScore.name in rankings else names[0]
    values = agreed if judged == ConsensusScore.name else np.array(chosen[judged]["scores"])
    index = {x: i for i, x in enumerate(layers)}
    own = [p.layers for p in rankings[judged]]
    agreement = ranking_disagrees([values[index[x]] for x in own], [cer_of[x] for x in own])
    start = min(merged, key=lambda m: cer_of[m])
    best, seen = cer_of[start], set(merged)
    if should_refine(refine, agreement):
        stored = lambda candidates: {x: cer_of[x] for x in candidates}  # noqa: E731
        best = climb(start, best, study["num_layers"], stored, seen)[1]
    oracle = result["oracle_cer"]
    return {
        "model": study["model_dir"],
        "oracle_cer": oracle,
        "scores": scores,
        "pipeline": {
            "cer": best,
            "relative": (best - oracle) / oracle if oracle else 0.0,
            "evaluations": len(seen),
            "refine_spearman": agreement,
        },
        "glp": result.get("glp"),
    }


def across_models(summaries: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per score present on every model: median and worst Spearman and relative regret."""
    common = set.intersection(*(set(s["scores"]) for s in summaries.values()))
    out = {}
    for name in sorted(common):
        rho = [s["scores"][name]["spearman"] for s in summaries.values()]
        rel = [s["scores"][name]["relative@10"] for s in summaries.values()]
        out[name] = {
            "median_spearman": statistics.median(rho),
            "worst_spearman": max(rho),
            "median_relative@10": statistics.median(rel),
            "worst_relative@10": max(rel),
        }
    return out


def calibration_shift(study: dict, again: dict, num_prune: int, defaults: Sequence[str]) -> dict:
    """Per default score: how alike its rankings of the proposals are with two calibration
    subsets (Spearman between the two score vectors), and its Spearman against the CER with
    each."""
    first, second = result_for(study, num_prune), result_for(again, num_prune)
    if [p["layers"] for p in first["proposals"]] != [p["layers"] for p in second["proposals"]]:
        raise ValueError("the two studies evaluated different proposals")
    cer = np.array([p["cer"] for p in first["proposals"]])
    out = {}
    for score in defaults:
        name = variant_name(score, study["reference"])
        a = np.array(_variants(first, [name])[name]["scores"])
        b = np.array(_variants(second, [name])[name]["scores"])
        out[score] = {
            "rank_agreement": spearman(a, b),
            "spearman": spearman(a, cer),
            "spearman_again": spearman(b, cer),
        }
    return out

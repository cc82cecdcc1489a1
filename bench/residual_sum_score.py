#!/usr/bin/env python3
"""The residual-sum score and two readout variants of it, on the output of
``bin/search_quality.py`` (the experiment that led to ``--measures residual_sum``).

A pre-LN encoder adds each layer's update to a residual stream: h_l = h_{l-1} + d_l. Pruning the
layers S removes their updates; to first order (ignoring how the kept layers react to their
changed input) the pruned model's top state is h_L - sum_{l in S} d_l. This script scores every
proposal of the study's CER cache by how far that approximation moves the model's output, using
only the study's frame dump (no extra forward pass):

- ``cos``: mean over frames of cos(approx, h_L), the residual_sum measure of stages 5-6
  (:mod:`comflp.prune.residual_sum`);
- ``kl``: mean KL(p(h_L) || p(approx)) of the CTC readouts (final norm + CTC head);
- ``agree``: share of frames whose greedy CTC label is unchanged.

It prints Spearman and Kendall between each score and the proposals' dev CER, beside the best
correlation variants, and writes the figures to ``--out`` (JSON).

    python bench/residual_sum_score.py --exp_dir exp/plain --study_dir exp/plain/search_quality \\
        --num_prune 4 6 --out exp/plain/search_quality/residual_sum.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from comflp.adapters.base import Hidden
from comflp.cli import add_common_args, add_model_args, load_model_args, positive_int, run
from comflp.prune.quality import (
    StudyFeatures,
    best_of_top_k_regret,
    kendall_tau,
    ranking,
    spearman,
)
from comflp.prune.residual_sum import ResidualSumScorer
from comflp.utils import atomic_write_json


def readout_probs(model, x: torch.Tensor) -> torch.Tensor:
    """Per-frame CTC log-probabilities (rows, V') of a (rows, D) state through ``model``."""
    h = Hidden(x=x[None], lengths=torch.tensor([x.shape[0]]))
    with torch.no_grad():
        logp, _ = model.readout(h)
    return logp[0]


def readout_scores(model, feats: list[np.ndarray], layers: tuple[int, ...]) -> dict[str, float]:
    """``kl`` (negated) and ``agree`` of the residual approximation of pruning ``layers``."""
    top = torch.from_numpy(feats[-1]).float()
    approx = top.clone()
    for layer in layers:
        approx -= torch.from_numpy(feats[layer] - feats[layer - 1]).float()
    ref, new = readout_probs(model, top), readout_probs(model, approx)
    kl = (ref.exp() * (ref - new)).sum(-1).mean().item()
    agree = (ref.argmax(-1) == new.argmax(-1)).float().mean().item()
    return {"kl": -kl, "agree": agree}  # higher = predicted better, as for cos


def study_one(model, feats: list[np.ndarray], cers: dict[str, dict]) -> dict[str, dict]:
    """Rank correlations of each score with the CERs of one P's proposals."""
    proposals = [tuple(int(x) for x in key.split(",")) for key in cers]
    cer = np.array([cers[key]["cer"] for key in cers])
    readout = [readout_scores(model, feats, p) for p in proposals]
    scores = {
        "cos": ResidualSumScorer.from_layer_feats(feats).scores(np.array(proposals)),
        **{name: np.array([row[name] for row in readout]) for name in readout[0]},
    }
    out = {}
    for name, s in scores.items():
        top10 = best_of_top_k_regret(s, cer, 10)
        out[name] = {
            "spearman": spearman(s, cer),
            "kendall": kendall_tau(s, cer),
            "top1_cer": float(cer[ranking(s)[0]]),
            "best_top10_cer": top10["cer"],
            "oracle_cer": top10["oracle"],
            "proposals": len(cer),
        }
    return out


def main(args: argparse.Namespace) -> None:
    model = load_model_args(args)
    model.module.eval()
    features = StudyFeatures(args.study_dir / "dump", args.frame_rows, args.seed)
    feats = features.layer_feats("frames", min(args.calib_num_utts, features.num_utts))
    results = {}
    for p in args.num_prune:
        path = args.study_dir / f"cers_prune{p}.json"
        cers = json.loads(path.read_text())["cers"]
        results[str(p)] = study_one(model, feats, cers)
        for name, r in results[str(p)].items():
            logging.info(
                f"P={p} {name:5s}: Spearman {r['spearman']:+.3f} Kendall {r['kendall']:+.3f} "
                f"top-1 {r['top1_cer']:.2f} best-of-top-10 {r['best_top10_cer']:.2f} "
                f"(oracle {r['oracle_cer']:.2f}, {r['proposals']} proposals)"
            )
    atomic_write_json(args.out, {"frame_rows": feats[0].shape[0], "results": results})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_args(parser)
    parser.add_argument("--study_dir", type=Path, required=True)
    parser.add_argument("--num_prune", type=positive_int, nargs="+", default=[6])
    parser.add_argument("--calib_num_utts", type=positive_int, default=320)
    parser.add_argument("--frame_rows", type=positive_int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    add_common_args(parser)
    return parser


if __name__ == "__main__":
    run(main, build_parser())

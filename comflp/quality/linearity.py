"""How far the residual-sum score's first-order view holds on a model (docs/SEARCH_QUALITY.md,
"Why residual-sum fails on the wav2vec2-family models").

The residual-sum score (:mod:`comflp.prune.scores.residual_sum`) predicts the top state of a
stack without the layers S as ``h_L - sum_{k in S} d_k``, with ``d_k = h_k - h_{k-1}`` the update
layer k makes on the full model's path: the layers after a removed one are assumed not to react
to its absence. For each layer k removed alone, on calibration frames, this measures what the
top state really does:

- ``update``: ||d_k|| / ||h_L||, how large the update the score removes is;
- ``reaction``: ||h_L^(-k) - (h_L - d_k)|| / ||d_k||, the part of the real change the score
  does not predict, relative to the update (0: first order exact; above 1: the later layers'
  reaction outweighs the update itself);
- ``gain``: ||h_L^(-k) - h_L|| / ||d_k||, how far the top state really moves in units of the
  update (1 for the first-order view; above 1: the later layers amplify the removal);
- ``cosine``: the mean over frames of cos(h_L^(-k) - h_L, -d_k) (1: the top state moves the way
  the score assumes).

Norms are root-mean-squares over the valid frames of all batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from comflp.adapters.base import ModelSettings, PrunableModel
from comflp.asr.data import EVAL_MAX_DURATION, load_eval_batches
from comflp.errors import InputError
from comflp.prune.stacks import stack_of
from comflp.report.provenance import written, written_lines
from comflp.settings import REQUIRED, option
from comflp.utils import atomic_write_json, atomic_write_text


@dataclass(kw_only=True)
class LinearitySettings(ModelSettings):
    """The check: the model's encoder, the calibration utterances, where the report goes."""

    output: Path = option(REQUIRED, "the Markdown report (its JSON beside it)")
    calib_cuts: Path = option(
        Path("data/fbank/cuts_train-clean-100.jsonl.gz"), "cuts the calibration set is drawn from"
    )
    calib_num_utts: int = option(64, "calibration utterances", low=1)
    calib_seed: int = option(0, "seed of the calibration subset")
    max_duration: float = option(EVAL_MAX_DURATION, "seconds of audio per batch")


@torch.no_grad()
def first_order_errors(model: PrunableModel, batches: list[dict]) -> list[dict]:
    """Per layer k (1..L) removed alone: ``update``, ``reaction``, ``gain`` and ``cosine``
    (module docstring) over the valid frames of ``batches``."""
    stack = stack_of(model, "encoder")
    depth = stack.num_layers
    sums = [
        dict.fromkeys(("update", "reaction", "change", "top", "cosine", "frames"), 0.0)
        for _ in range(depth)
    ]
    for batch in batches:
        states, lengths = stack.states(batch)
        valid = torch.arange(states[0].size(1), device=lengths.device)[None, :] < lengths[:, None]
        top = states[-1][valid].double()
        for k in range(1, depth + 1):
            kept = [j for j in range(1, depth + 1) if j != k]
            pruned = model.forward_layers(model.embed(batch), kept).x[valid].double()
            update = (states[k] - states[k - 1])[valid].double()
            change = pruned - top
            s = sums[k - 1]
            s["update"] += float((update**2).sum())
            s["top"] += float((top**2).sum())
            s["reaction"] += float(((change + update) ** 2).sum())
            s["change"] += float((change**2).sum())
            s["cosine"] += float(
                torch.nn.functional.cosine_similarity(change, -update, dim=-1).sum()
            )
            s["frames"] += len(top)
    return [
        {
            "layer": k + 1,
            "update": (s["update"] / s["top"]) ** 0.5 if s["top"] else 0.0,
            "reaction": (s["reaction"] / s["update"]) ** 0.5 if s["update"] else 0.0,
            "gain": (s["change"] / s["update"]) ** 0.5 if s["update"] else 0.0,
            "cosine": s["cosine"] / s["frames"] if s["frames"] else 0.0,
        }
        for k, s in enumerate(sums)
    ]


def linearity(s: LinearitySettings) -> None:
    if s.stack != "encoder":
        raise InputError(f"--stack {s.stack}: the first-order check reads an encoder stack")
    model = s.load_model()
    batches = load_eval_batches(model, s.calib_cuts, s.max_duration, s.calib_num_utts, s.calib_seed)
    rows = first_order_errors(model, batches)
    summary = {
        "written": written(),
        "model_dir": str(model.source),
        "model_type": s.model_type,
        "calib_cuts": str(s.calib_cuts),
        "calib_num_utts": sum(len(b["ids"]) for b in batches),
        "layers": rows,
    }
    lines = [
        "# The residual-sum score's first-order view, layer by layer",
        *written_lines(summary["written"]),
        "",
        f"Model: {summary['model_dir']} ({s.model_type}); {summary['calib_num_utts']} calibration "
        f"utterances of {summary['calib_cuts']}. Each layer removed alone: update = "
        "||d_k|| / ||h_L||; reaction = ||h_L(-k) - (h_L - d_k)|| / ||d_k|| (what the first-order "
        "view misses); gain = ||h_L(-k) - h_L|| / ||d_k||; cosine = cos(h_L(-k) - h_L, -d_k) "
        "(comflp/quality/linearity.py).",
        "",
        "| layer | update | reaction | gain | cosine |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {r['layer']} | {r['update']:.3f} | {r['reaction']:.3f} | {r['gain']:.3f} | "
            f"{r['cosine']:.3f} |"
            for r in rows
        ),
    ]
    atomic_write_json(s.output.with_suffix(".json"), summary)
    atomic_write_text(s.output, "\n".join(lines) + "\n")
    logging.info(f"wrote {s.output} and its JSON")

#!/usr/bin/env python3
"""Diagnosis: do a CTC model's errors come from too many labels per output frame?

Decodes a set with greedy CTC and reports the substitutions, deletions and insertions, the
share of output frames whose best label is the blank, and the CER per quartile of label
density (labels per CTC output frame, a repeated label counted twice since CTC needs a blank
between the two). When deletions dominate and the CER grows with density, the frame rate is
too low for the units: a CTC head with more outputs per encoder frame (``model.ctc_upsample``)
or larger units help. This is how docs/TUNING.md found the built-in corpus's bottleneck.

    python bench/ctc_density.py --exp_dir exp/baseline --cuts data/fbank/cuts_dev-clean.jsonl.gz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import emit

from comflp.adapters.native import NativeModel
from comflp.asr.ctc import ctc_greedy_search
from comflp.asr.data import eval_loader, load_cuts
from comflp.asr.scoring import error_stats
from comflp.cli import add_common_args, run
from comflp.expdir import MODEL


def label_density(token_ids: list[int], num_frames: int) -> float:
    """Labels CTC must place per output frame: one per token, plus a blank per repeat."""
    repeats = sum(a == b for a, b in zip(token_ids, token_ids[1:]))
    return (len(token_ids) + repeats) / max(num_frames, 1)


@torch.no_grad()
def main(args: argparse.Namespace) -> None:
    model = NativeModel.load(args.exp_dir, args.checkpoint)
    refs, hyps, density, blank_frames, frames = [], [], [], 0, 0
    for batch in eval_loader(load_cuts(args.cuts), model.dataset(), max_duration=60):
        log_probs, lens = model.log_probs(batch)
        refs += batch["texts"]
        hyps += [model.decode_ids(h) for h in ctc_greedy_search(log_probs, lens, model.blank_id)]
        best = log_probs.argmax(-1)
        for text, n, row in zip(batch["texts"], lens.tolist(), best, strict=True):
            density.append(label_density(model.tokenizer.encode(text), n))
            blank_frames += int((row[:n] == model.blank_id).sum())
            frames += n
    total = error_stats(refs, hyps, "char")
    density = np.array(density)
    lines = [
        f"{args.exp_dir / args.checkpoint} on {args.cuts} ({len(refs)} utterances, greedy CTC, "
        f"ctc_upsample {model.asr.cfg.ctc_upsample}): CER {total.err:.2f}%, {total.sub} substitutions, "
        f"{total.dele} deletions, {total.ins} insertions of {total.wrd} characters; "
        f"{100 * blank_frames / max(frames, 1):.1f}% of the output frames are blank.",
        "",
        "| labels per CTC frame | utterances | CER | sub | del | ins |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    edges = np.quantile(density, [0, 0.25, 0.5, 0.75, 1])
    for q, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        chosen = [i for i, d in enumerate(density) if lo <= d <= hi and (q == 0 or d > lo)]
        s = error_stats([refs[i] for i in chosen], [hyps[i] for i in chosen], "char")
        lines.append(
            f"| {lo:.2f}-{hi:.2f} | {len(chosen)} | {s.err:.2f} | {s.sub} | {s.dele} | {s.ins} |"
        )
    emit("\n".join(lines) + "\n", args.output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exp_dir", type=Path, required=True, help="an experiment directory")
    parser.add_argument("--checkpoint", default=MODEL, help="e.g. epoch-3.pt")
    parser.add_argument("--cuts", type=Path, required=True, help="a feature manifest to decode")
    parser.add_argument("--output", type=Path, help="also write the table here")
    add_common_args(parser)
    run(main, parser)

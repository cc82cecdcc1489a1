#!/usr/bin/env python3
"""Benchmark: decoding time of every Whisper model of the experiments' tables in CTranslate2
(float32 and int8, beam 1 and beam 5), next to transformers' ``generate`` on the same model.

Each distinct model of the experiments' method lists (compare/methods.json,
methods_finetuned.json, methods_structured.json) is written as a CTranslate2 directory by
comflp's own write-back (``CT2Whisper.save``, CTranslate2's converter) once per quantization,
then every utterance of --cuts is decoded one at a time (batch 1, as a transcription service
takes requests) with 1 thread: ``ctranslate2.models.Whisper.generate`` and transformers'
``generate`` with ``num_beams`` 1 and 5, both with comflp's length bound (:func:`limit`). RTF
is decoding seconds over the utterances' own audio seconds (Whisper pads each to its 30 s
window: the encoder's cost does not shrink with the audio). WER is
measured on the same outputs, after Whisper's English normaliser. Prints a Markdown table,
also written to --output.

    python bench/ct2_rtf.py --exp_dirs "egs/whisper/exp/decoder egs/whisper/exp/encoder" \\
        --cuts egs/whisper/data/fbank/cuts_test-clean.jsonl.gz --num_utts 30 --output table.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import emit, gpu_note
from decoder_rtf import models_of

from comflp.adapters.base import Hidden
from comflp.adapters.ct2 import generate_max_length
from comflp.asr.data import load_cuts, random_subset
from comflp.asr.scoring import error_stats
from comflp.cli import add_common_args, run
from comflp.expdir import ExpDir

BEAMS = (1, 5)
QUANTIZATIONS = ("float32", "int8")


def limit(model, batch: dict) -> int:
    """comflp's length bound for the utterance (the audio's share of 224 tokens per 30 s):
    both runtimes get it, so that a decoder that repeats itself is timed as comflp decodes it,
    not to the 448-token context."""
    frames = (batch["frames"] - 1) // 2 + 1
    return int(model.max_new_tokens(Hidden(torch.empty(0), frames))[0])


def ct2_runs(model, batches: list[dict], workdir: Path) -> dict[str, tuple[float, list]]:
    """(seconds, token ids per utterance) of CTranslate2 for each quantization and beam."""
    import ctranslate2

    out = {}
    for quantization in QUANTIZATIONS:
        model.quantization = quantization
        target = workdir / quantization
        model.save(target)
        ct2 = ctranslate2.models.Whisper(str(target), device="cpu", intra_threads=1)
        for beam in BEAMS:
            seconds, hyps = 0.0, []
            for batch in batches:
                feats = ctranslate2.StorageView.from_array(
                    np.ascontiguousarray(batch["input_features"].numpy())
                )
                start = time.perf_counter()
                steps = generate_max_length(limit(model, batch))
                result = ct2.generate(feats, [model.prompt], beam_size=beam, max_length=steps)
                seconds += time.perf_counter() - start
                hyps.append(result[0].sequences_ids[0])
            out[f"ct2 {quantization} beam {beam}"] = (seconds, hyps)
    return out


@torch.no_grad()
def transformers_runs(model, batches: list[dict]) -> dict[str, tuple[float, list]]:
    out = {}
    for beam in BEAMS:
        seconds, hyps = 0.0, []
        for batch in batches:
            start = time.perf_counter()
            ids = model.hf.generate(
                batch["input_features"], num_beams=beam, max_new_tokens=limit(model, batch)
            )
            seconds += time.perf_counter() - start
            hyps.append([t for t in ids[0].tolist() if t < model.eos_id])  # text tokens
        out[f"transformers beam {beam}"] = (seconds, hyps)
    return out


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    models = {}
    for exp_dir in args.exp_dirs.split():
        models.update(models_of(ExpDir(Path(exp_dir))))
    if args.num_prune is not None:  # the unpruned model and the rows of one P
        models = {k: v for k, v in models.items() if v[0].num_prune in (0, args.num_prune)}
    first = next(iter(models.values()))[1]
    cuts = random_subset(load_cuts(args.cuts), args.num_utts, seed=0)
    dataset = first.dataset()
    batches = [dataset[cuts.subset(cut_ids=[cut.id])] for cut in cuts]
    audio = sum(b["seconds"] for b in batches)
    refs = [t for b in batches for t in b["texts"]]
    rows = {}
    for key, (method, model) in models.items():
        with tempfile.TemporaryDirectory() as tmp:
            runs = {**ct2_runs(model, batches, Path(tmp)), **transformers_runs(model, batches)}
        rows[key] = (
            method,
            model.num_parameters(),
            {
                name: (
                    s / audio,
                    error_stats(refs, [model.decode_ids(h) for h in hyps], "word").err,
                )
                for name, (s, hyps) in runs.items()
            },
        )
        print(f"{method.name} {method.stack} {method.pruned}: done", flush=True)
    names = list(next(iter(rows.values()))[2])
    lines = [
        f"{len(batches)} utterances of {args.cuts} ({audio:.1f} s of audio), one at a time, "
        "1 thread; each cell RTF / WER. " + gpu_note(),
        "",
        "| method | stack | pruned | params | " + " | ".join(names) + " |",
        "| --- | --- | --- | ---: | " + " | ".join("---:" for _ in names) + " |",
    ]
    for method, params, cells in rows.values():
        shown = method.original_pruned if method.original_pruned is not None else method.pruned
        lines.append(
            f"| {method.name} | {method.stack} | {' '.join(map(str, shown)) or '-'} | "
            f"{params / 1e6:.2f}M | "
            + " | ".join(f"{rtf:.4f} / {wer:.2f}" for rtf, wer in cells.values())
            + " |"
        )
    emit("\n".join(lines) + "\n", args.output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exp_dirs", required=True, help="experiments (stage 7), space-separated")
    parser.add_argument("--cuts", type=Path, required=True, help="the set to decode")
    parser.add_argument("--num_utts", type=int, default=30, help="a seeded random subset")
    parser.add_argument("--num_prune", type=int, help="only the rows of this P (and unpruned)")
    parser.add_argument("--output", type=Path, help="also write the table here")
    add_common_args(parser)
    run(main, parser)

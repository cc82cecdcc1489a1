#!/usr/bin/env python3
"""Benchmark: decoding time of every model of an experiment's stage-7 (and stage-8) table,
measured in one process against the unpruned model, for autoregressive decoding, where the
decoder runs once per output token.

Reads the experiment's method lists (compare/methods.json, methods_finetuned.json), builds each
distinct model once (a pruned one in memory, as stage 7 decodes it), loads the test batches
once, and for each model: a warm-up on the first --warmup_batches batches, then --repeats
decodings of the whole set (comflp.decoding.decode_set, which times the model and the search,
not data loading); the rounds go over the models in turn, so that a slow phase of the machine
spreads over all of them. Reports the median RTF, its ratio to the unpruned model, the tokens
emitted per utterance as characters (a pruned decoder that never ends its hypotheses runs to
the length limit) and the test CER. Prints a Markdown table, also written to --output.

    python bench/decoder_rtf.py --exp_dir exp/whisper_dec --cuts data/fbank/cuts_test-clean.jsonl.gz \\
        --decoding_method attention_greedy_search --output exp/whisper_dec/decoder_rtf.md
"""

from __future__ import annotations

import argparse
import gc
import statistics
from pathlib import Path

import torch
from common import emit

from comflp.adapters.base import PrunableModel, load_prunable
from comflp.asr.data import load_eval_batches
from comflp.asr.scoring import error_stats
from comflp.cli import UsageError, add_common_args, run
from comflp.decoding import decode_set
from comflp.expdir import METHOD_LISTS, ExpDir
from comflp.prune.method_list import Method, MethodList
from comflp.prune.stacks import stack_of


def models_of(exp: ExpDir) -> dict[str, tuple[Method, PrunableModel]]:
    """Each distinct model of the method lists: a representative row and the model."""
    lists = [exp.compare / METHOD_LISTS[n] for n in ("compare", "finetune", "structured")]
    methods = MethodList.load(*(p for p in lists if p.is_file()))
    sources: dict[tuple[str, str], PrunableModel] = {}
    out = {}
    for key, m in methods.unique().items():
        if (m.model_type, m.model_dir) not in sources:
            sources[(m.model_type, m.model_dir)] = load_prunable(m.model_type, Path(m.model_dir))
        base = sources[(m.model_type, m.model_dir)]
        out[key] = (m, stack_of(base, m.stack).prune(m.pruned) if m.pruned else base)
    return out


def measure_all(models: dict, batches: list[dict], args: argparse.Namespace) -> dict[str, dict]:
    """Median RTF, hypothesis characters per utterance and CER of each model, the rounds
    interleaved."""
    runs: dict[str, list] = {key: [] for key in models}
    with torch.no_grad():
        for _, model in models.values():
            decode_set(model, batches[: args.warmup_batches], args.decoding_method)
        for _ in range(args.repeats):
            for key, (_, model) in models.items():
                gc.collect()
                runs[key].append(decode_set(model, batches, args.decoding_method))
    out = {}
    for key, results in runs.items():
        utts = results[0].utts
        out[key] = {
            "rtf": statistics.median(r.rtf for r in results),
            "chars": statistics.mean(len(u["hyp"]) for u in utts),
            "cer": error_stats([u["ref"] for u in utts], [u["hyp"] for u in utts], "char").err,
            "params": models[key][1].num_parameters(),
        }
    return out


def markdown(models: dict, measured: dict[str, dict], notes: list[str]) -> str:
    base = next(k for k, (m, _) in models.items() if m.name == "unpruned")
    lines = [
        *notes,
        "",
        "| method | stack | P | pruned layers | params | RTF | RTF vs unpruned | chars/utt | test CER |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, (m, _) in models.items():
        r = measured[key]
        shown = m.original_pruned if m.original_pruned is not None else m.pruned
        lines.append(
            f"| {m.name}{'' if m.seed is None else f' (seed {m.seed})'} | {m.stack} | "
            f"{m.num_prune} | {' '.join(map(str, shown)) or '-'} | {r['params'] / 1e6:.2f}M | "
            f"{r['rtf']:.4f} | {r['rtf'] / measured[base]['rtf']:.2f}x | {r['chars']:.1f} | "
            f"{r['cer']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    if args.repeats < 1 or args.warmup_batches < 1:
        raise UsageError("--repeats and --warmup_batches must be >= 1")
    exp = ExpDir(args.exp_dir)
    models = models_of(exp)
    first = next(iter(models.values()))[1]
    batches = load_eval_batches(first, args.cuts, args.max_duration)
    measured = measure_all(models, batches, args)
    audio = sum(b["seconds"] for b in batches)
    notes = [
        f"{sum(len(b['ids']) for b in batches)} utterances of {args.cuts} ({audio:.1f} s of "
        f"audio) in {len(batches)} batches of at most {args.max_duration:g} s, decoded with "
        f"{args.decoding_method}; warm-up on {args.warmup_batches} batches, then the median of "
        f"{args.repeats} decodings of the whole set, the models taken in turn in each round; "
        f"{torch.get_num_threads()} torch threads. chars/utt: the hypothesis's characters "
        "(references: the CER's denominator).",
    ]
    emit(markdown(models, measured, notes), args.output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exp_dir", type=Path, required=True, help="the experiment (stage 7)")
    parser.add_argument("--cuts", type=Path, required=True, help="the set to decode")
    parser.add_argument("--decoding_method", default="attention_greedy_search")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup_batches", type=int, default=1)
    parser.add_argument("--max_duration", type=float, default=100.0, help="seconds per batch")
    parser.add_argument("--output", type=Path, help="also write the table here")
    add_common_args(parser)
    run(main, parser)

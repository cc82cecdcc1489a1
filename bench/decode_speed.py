#!/usr/bin/env python3
"""Benchmark: decoding speed (real-time factor) and size of a model and of its pruned model.

Decodes the same test set with the unpruned model (--exp_dir) and its pruned model (a pruned
experiment directory, --pruned_dir, e.g. exp/baseline/search/comflp_dc_prune6/pruned, or
--prune_layers on the base model) with greedy CTC and, unless --beam_search false, CTC prefix
beam search. The test batches are loaded into memory once; for each device, thread count,
method and model: a warm-up on the first --warmup_batches batches, then --repeats decodings of
the whole set, reporting the median RTF (decoding time / audio seconds, the cuts' durations;
comflp.decoding.decode_set times the model and the search, not data loading) and the ratio
pruned / unpruned. GPU rows are added when CUDA is available. Prints a Markdown table, also
written to --output.

    python bench/decode_speed.py --exp_dir exp/baseline \\
        --pruned_dir exp/baseline/search/comflp_dc_prune6/pruned --output exp/bench/decode_speed.md
    python bench/decode_speed.py --exp_dir exp/baseline --prune_layers "1 3 5 7 9 11"
"""

from __future__ import annotations

import argparse
import gc
import statistics
from pathlib import Path

import torch
from common import emit, gpu_note

from comflp.adapters.base import PrunableModel
from comflp.adapters.native import NativeModel
from comflp.asr.data import load_eval_batches
from comflp.asr.scoring import error_stats
from comflp.cli import UsageError, add_common_args, run, str2bool
from comflp.decoding import DecodeResult, decode_set
from comflp.expdir import CMVN, TOKENIZER


def pruned_model(args: argparse.Namespace, base: NativeModel) -> tuple[NativeModel, list[int]]:
    """The pruned model and the base model's layers it removed."""
    if (args.pruned_dir is None) == (not args.prune_layers):
        raise UsageError("give either --pruned_dir or --prune_layers")
    if args.prune_layers:
        removed = sorted(int(x) for x in args.prune_layers.split())
        try:
            return base.prune(removed), removed
        except ValueError as e:
            raise UsageError(f"--prune_layers {args.prune_layers!r}: {e}") from None
    for name in (TOKENIZER, CMVN):
        if (args.pruned_dir / name).read_bytes() != (args.exp_dir / name).read_bytes():
            raise UsageError(f"{args.pruned_dir}: its {name} is not {args.exp_dir}'s")
    model = NativeModel.load(args.pruned_dir)
    kept = model.asr.cfg.kept_layers
    if kept is None:
        raise UsageError(f"{args.pruned_dir}: not a pruned model (its config has no kept_layers)")
    return model, [k for k in range(1, base.num_layers + 1) if k not in kept]


def measure(
    model: PrunableModel, batches: list[dict], method: str, args: argparse.Namespace, device: str
) -> dict:
    """Warm up, then decode the set ``--repeats`` times: median seconds and RTF, and the CER."""
    model.to(device)

    def decode(subset: list[dict]) -> DecodeResult:
        gc.collect()
        return decode_set(model, subset, method, beam_size=args.beam_size)

    decode(batches[: args.warmup_batches])
    runs = [decode(batches) for _ in range(args.repeats)]
    utts = runs[0].utts
    return {
        "seconds": statistics.median(r.decode_seconds for r in runs),
        "rtf": statistics.median(r.rtf for r in runs),
        "audio": runs[0].audio_seconds,
        "cer": error_stats([u["ref"] for u in utts], [u["hyp"] for u in utts], "char").err,
    }


def settings(args: argparse.Namespace) -> list[tuple[str, int | None]]:
    """(device, CPU threads) pairs to measure; GPU rows keep torch's default threads."""
    pairs: list[tuple[str, int | None]] = [("cpu", int(n)) for n in args.threads.split()]
    if torch.cuda.is_available():
        pairs.append(("cuda", None))
    return pairs


def rows_for(
    models: dict[str, PrunableModel], batches: list[dict], args: argparse.Namespace
) -> list[dict]:
    """One row per device setting, method and model; the ratio is to the first model."""
    methods = ["ctc_greedy_search"] + (["ctc_prefix_beam_search"] if args.beam_search else [])
    rows = []
    for device, threads in settings(args):
        if threads is not None:
            torch.set_num_threads(threads)
        for method in methods:
            measured = [measure(m, batches, method, args, device) for m in models.values()]
            for (name, model), row in zip(models.items(), measured):
                row.update(device=device, threads=threads, method=method, model=name)
                row.update(layers=model.num_layers, params=model.num_parameters())
                row["ratio"] = row["rtf"] / measured[0]["rtf"]
                rows.append(row)
    return rows


def markdown(rows: list[dict], notes: list[str]) -> str:
    lines = [
        *notes,
        "",
        "| device | threads | decoding | model | layers | params | decode s | RTF "
        "| RTF vs unpruned | test CER % |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        threads = "" if r["threads"] is None else r["threads"]
        lines.append(
            f"| {r['device']} | {threads} | {r['method']} | {r['model']} | {r['layers']} | "
            f"{r['params']:,} | {r['seconds']:.3f} | {r['rtf']:.4f} | {r['ratio']:.2f}x | "
            f"{r['cer']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    if args.repeats < 1 or args.warmup_batches < 1:
        raise UsageError("--repeats and --warmup_batches must be >= 1")
    base = NativeModel.load(args.exp_dir)
    pruned, removed = pruned_model(args, base)
    cuts = args.cuts or args.workdir / f"data/fbank/cuts_{args.test_set}.jsonl.gz"
    batches = load_eval_batches(base, cuts, args.max_duration)
    models = {
        "unpruned": base,
        f"pruned (removed {' '.join(map(str, removed))})": pruned,
    }
    rows = rows_for(models, batches, args)
    num_utts = sum(len(b["ids"]) for b in batches)
    notes = [
        f"{num_utts} utterances ({rows[0]['audio']:.1f} s of audio) in {len(batches)} batches "
        f"of at most {args.max_duration:g} s; warm-up on {args.warmup_batches} batches, then "
        f"the median of {args.repeats} decodings of the whole set. Prefix beam search: beam "
        f"{args.beam_size}. Models: {args.exp_dir}, {args.pruned_dir or 'pruned in memory'}.",
        gpu_note(),
    ]
    emit(markdown(rows, notes), args.output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exp_dir", type=Path, required=True, help="the unpruned model")
    parser.add_argument("--pruned_dir", type=Path, help="experiment directory of its pruned model")
    parser.add_argument("--prune_layers", default="", help="or: layers to remove from --exp_dir")
    parser.add_argument("--workdir", type=Path, default=Path("."), help="where stages 0-2 ran")
    parser.add_argument("--test_set", default="test-clean")
    parser.add_argument("--cuts", type=Path, help="cuts to decode (default: the test set's)")
    parser.add_argument("--threads", default="1 2", help="CPU thread counts to measure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup_batches", type=int, default=3)
    parser.add_argument(
        "--beam_search", type=str2bool, default=True, help="add ctc_prefix_beam_search rows"
    )
    parser.add_argument("--beam_size", type=int, default=10)
    parser.add_argument("--max_duration", type=float, default=100.0, help="seconds per batch")
    parser.add_argument("--output", type=Path, help="also write the table here")
    add_common_args(parser)
    run(main, parser)

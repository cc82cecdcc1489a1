#!/usr/bin/env python3
"""Study: which decoder-pruned Whisper recovers best, and how recoveries compare at one budget.

For every proposal of P pruned decoder layers (C(L, P) of them) it measures the dev error
before recovery and after Distil-Whisper's recovery (comflp/train/distil.py, the stage-8
config given), all from the same cached encoder outputs and pseudo-labels: the oracle that
matters for a model whose pruned decoders all fail before recovery. For --compare layers (the
search's choice) it adds, at the same budget (same utterances, same steps): plain fine-tuning on
the references, the unpruned model fine-tuned on them (the fair teacher), and the recovery
again with that fine-tuned model as the teacher (its own pseudo-labels). Each row also
carries the teacher-forced losses a fine search can rank by before any recovery: the mean
negative log-likelihood of the references and of the teacher's pseudo-labels, and the KL from
the teacher. Writes JSON and a Markdown table.

    python local/recovery.py --workdir . --model_dir tiny.en \\
        --config conf/distil.yaml --num_prune 2 --compare "2 3" \\
        --output ../../docs/results/whisper_tiny_en/recovery   # in egs/whisper
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import os
import subprocess
import time
from pathlib import Path
from statistics import fmean

import torch

from comflp.adapters.base import load_prunable
from comflp.asr.data import load_cuts, random_subset
from comflp.train.distil import (
    DistilConfig,
    cached_error_rates,
    distil_loss,
    encode_batches,
    load_distil_config,
    pseudo_labelled,
    recover,
)
from comflp.utils import atomic_write_json, atomic_write_text

LOSSES = ("ref_nll", "pseudo_nll", "kl")  # teacher-forced criteria of an unrecovered student


@torch.no_grad()
def ranking_losses(student, teacher, refs: list[dict], pseudo: list[dict]) -> dict[str, float]:
    """Teacher-forced criteria of an unrecovered student, means over the batches."""
    ce_only = DistilConfig(kl_weight=0.0, ce_weight=1.0)
    kl_only = DistilConfig(kl_weight=1.0, ce_weight=0.0)
    student.module.eval()
    return {
        "ref_nll": fmean([distil_loss(student, None, b, ce_only)[1]["ce"] for b in refs]),
        "pseudo_nll": fmean([distil_loss(student, None, b, ce_only)[1]["ce"] for b in pseudo]),
        "kl": fmean([distil_loss(student, teacher, b, kl_only)[1]["kl"] for b in pseudo]),
    }


def compare_recoveries(teacher, chosen, batches, refs, cfg, train, sets: dict) -> dict:
    """At the same budget: plain fine-tuning of ``chosen``'s student on the references, the
    unpruned model fine-tuned the same way (the fair teacher), and Distil-Whisper's recovery
    again from the fair teacher (its own pseudo-labels)."""
    plain_cfg = dataclasses.replace(cfg, kl_weight=0.0, pseudo_labels=False)
    plain = teacher.prune_decoder(chosen)
    recover(plain, None, refs, plain_cfg, train)
    fair = copy.deepcopy(teacher)
    recover(fair, None, refs, plain_cfg, train)
    student = teacher.prune_decoder(chosen)
    fair_pseudo, fair_filter = pseudo_labelled(fair, batches, cfg)
    recover(student, fair, fair_pseudo, cfg, train)

    def rates(model) -> dict:
        return {name: cached_error_rates(model, data) for name, data in sets.items()}

    return {
        "distil_from_fair_teacher": {
            "filter": fair_filter,
            "steps": train.num_epochs * len(fair_pseudo),
            **rates(student),
        },
        "pruned": chosen,
        "plain_finetune": rates(plain),
        "fair_teacher": rates(fair),
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    teacher = load_prunable("ctranslate2", args.model_dir)
    cfg, train = load_distil_config(Path(args.config), {})
    cuts = random_subset(load_cuts(work / args.train_cuts), cfg.num_utts, train.seed)
    start = time.perf_counter()
    batches = encode_batches(teacher, cuts, cfg.batch_size)
    dev = encode_batches(teacher, load_cuts(work / args.dev_cuts), cfg.batch_size)
    test = encode_batches(teacher, load_cuts(work / args.test_cuts), cfg.batch_size)
    pseudo, filtered = pseudo_labelled(teacher, batches, cfg)
    plain_cfg = dataclasses.replace(cfg, kl_weight=0.0, pseudo_labels=False)
    refs, _ = pseudo_labelled(teacher, batches, plain_cfg)  # same utterances, references
    dev_refs, _ = pseudo_labelled(
        teacher, dev, dataclasses.replace(plain_cfg, max_pseudo_label_wer=1e9)
    )
    encode_seconds = time.perf_counter() - start
    result = {
        "model_dir": str(args.model_dir),
        "config": {"distil": dataclasses.asdict(cfg), "train": dataclasses.asdict(train)},
        "filter": filtered,
        "steps": train.num_epochs * len(pseudo),
        "encode_seconds": encode_seconds,
        "unpruned": {
            "dev": cached_error_rates(teacher, dev),
            "test": cached_error_rates(teacher, test),
        },
        "proposals": [],
    }
    layers = range(1, teacher.num_decoder_layers + 1)
    for pruned in itertools.combinations(layers, args.num_prune) if args.num_prune else ():
        student = teacher.prune_decoder(pruned)
        row = {"pruned": list(pruned), "before": cached_error_rates(student, dev)}
        row["losses"] = ranking_losses(student, teacher, dev_refs, pseudo)
        t = time.perf_counter()
        recover(student, teacher, pseudo, cfg, train)
        row["seconds"] = time.perf_counter() - t
        row["after"] = {
            "dev": cached_error_rates(student, dev),
            "test": cached_error_rates(student, test),
        }
        result["proposals"].append(row)
        print(json.dumps(row), flush=True)
    if args.compare:
        chosen = [int(x) for x in args.compare.split()]
        result["compare"] = compare_recoveries(
            teacher, chosen, batches, refs, cfg, train, {"dev": dev, "test": test}
        )
    return result


def table(result: dict) -> str:
    lines = [
        "| pruned decoder layers | dev WER before | ref NLL | pseudo NLL | KL | dev WER after | test WER after | test CER after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(result["proposals"], key=lambda r: r["after"]["dev"]["wer"]):
        losses, after = row["losses"], row["after"]
        lines.append(
            f"| {' '.join(map(str, row['pruned']))} | {row['before']['wer']:.2f} | "
            f"{losses['ref_nll']:.3f} | {losses['pseudo_nll']:.3f} | {losses['kl']:.3f} | "
            f"{after['dev']['wer']:.2f} | {after['test']['wer']:.2f} | {after['test']['cer']:.2f} |"
        )
    if len(result["proposals"]) > 2:
        from scipy.stats import spearmanr

        after = [row["after"]["dev"]["wer"] for row in result["proposals"]]
        lines.append("")
        lines.append("Spearman against the dev WER after recovery:")
        for name, values in [
            ("dev WER before", [row["before"]["wer"] for row in result["proposals"]]),
            *[(k, [row["losses"][k] for row in result["proposals"]]) for k in LOSSES],
        ]:
            lines.append(f"- {name}: {spearmanr(values, after).statistic:+.3f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="egs/whisper")
    parser.add_argument("--model_dir", default="tiny.en")
    parser.add_argument("--config", default="egs/whisper/conf/distil.yaml")
    parser.add_argument("--train_cuts", default="data/fbank/cuts_train-clean-100.jsonl.gz")
    parser.add_argument("--dev_cuts", default="data/fbank/cuts_dev-clean.jsonl.gz")
    parser.add_argument("--test_cuts", default="data/fbank/cuts_test-clean.jsonl.gz")
    parser.add_argument(
        "--num_prune", type=int, default=2, help="P of the proposals (0: the comparison alone)"
    )
    parser.add_argument("--compare", default="", help="pruned layers of the three-way comparison")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", required=True, help="output path without suffix")
    parser.add_argument("--table_only", action="store_true", help="rewrite the .md from the .json")
    args = parser.parse_args()
    if args.table_only:
        result = json.loads(Path(args.output).with_suffix(".json").read_text())
        atomic_write_text(Path(args.output).with_suffix(".md"), table(result))
        return
    result = run(args)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result["provenance"] = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
        "threads": args.threads,
        "cpu_cores": os.cpu_count(),
    }
    out = Path(args.output)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), table(result))
    print(table(result))


if __name__ == "__main__":
    main()

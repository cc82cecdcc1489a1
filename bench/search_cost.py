#!/usr/bin/env python3
"""Benchmark: the cost of choosing which layers to prune, against depth (CoMFLP, GLP, oracle).

For each depth L (default 12, 24, 48), pruning P = L/2 layers, on CPU, as stages 4-6 run them
with run.sh's defaults:

- CoMFLP with the default scores (--scores, run.sh's: residual_sum dc) and with residual_sum
  alone: the stage-4 dump of a calibration subset (frame pooling), reading it back and building
  each score once (stage 5; the seconds it records, as stage 6 counts them: its heatmap is
  not), the coarse beam searches (each score's and their consensus's), and one fine search
  with the dev CER of what stage 6 merges (the consensus's top K and each score's first
  --score_top_k; residual_sum alone: its top K), each part counted once;
- GLP: the greedy metric search (comflp.prune.metric_search.greedy_layer_pruning);
- the oracle: the exhaustive metric search, where C(L, P) <= --oracle_max.

Every metric search runs through the same evaluator (prefix cache on) on the same dev batches,
loaded once before any timing. Each model is warmed up on those batches (the unpruned dev CER)
first. Every phase runs once. Models: an experiment directory per depth (--exp12,
--exp24, --exp48, or --exp L=DIR); a depth without one gets the shallowest given model's
architecture with num_layers = L and its intermediate-CTC layers scaled, trained here for
--train_epochs epochs (0: random weights). Prints Markdown tables, also written to --output.

    python bench/search_cost.py --workdir . --exp12 exp/baseline --output exp/bench/search_cost.md
    python bench/search_cost.py --workdir /tmp/tiny --layers "4 8" --exp 4=/tmp/tiny/exp/baseline \\
        --train_epochs 0 --calib_num_utts 16 --score_conf dc.batch_size=8 --dev_num_utts 8
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from common import emit
from lhotse import CutSet

from comflp.adapters.native import NativeModel
from comflp.asr.checkpoint import copy_assets
from comflp.asr.config import ExperimentConfig
from comflp.asr.data import (
    ctc_feasible,
    length_sorted_loader,
    load_cuts,
    load_eval_batches,
    random_subset,
)
from comflp.asr.model import ASRModel
from comflp.cli import UsageError, add_common_args, run
from comflp.expdir import CMVN, MODEL, SCORE_SETTINGS, TOKENIZER, ExpDir
from comflp.prune.dump import dump_layers, load_layer_feats, read_dump_info
from comflp.prune.evaluator import evaluate_model, layer_evaluations
from comflp.prune.metric_search import (
    SearchResult,
    exhaustive_metric_search,
    greedy_layer_pruning,
)
from comflp.prune.scores.base import ScoreChoice, describe_options, score_options
from comflp.prune.search import blocks_of
from comflp.prune.searches import SEARCHES, SearchContext, SearchSettings
from comflp.prune.searches.base import MergeChoice
from comflp.prune.searches.refine import DEFAULT_REFINE
from comflp.prune.stacks import EncoderStack
from comflp.stages.scores import build_all
from comflp.subsets import kept_layers
from comflp.train.trainer import train

METRIC = "cer"


# ----------------------------------------------------------------------------- models


def experiment_dirs(args: argparse.Namespace) -> dict[int, Path]:
    """Depth -> experiment directory, from --exp12/--exp24/--exp48 and --exp L=DIR."""
    dirs = {
        depth: path
        for depth, path in ((12, args.exp12), (24, args.exp24), (48, args.exp48))
        if path is not None
    }
    for item in args.exp:
        depth, sep, path = item.partition("=")
        if not sep or not depth.isdigit():
            raise UsageError(f"--exp {item}: expected L=DIR, e.g. --exp 12=exp/baseline")
        dirs[int(depth)] = Path(path)
    if not dirs:
        raise UsageError("give at least one experiment directory, e.g. --exp12 exp/baseline")
    return dirs


def scaled_layers(layers: list[int], old_depth: int, new_depth: int) -> list[int]:
    """Intermediate-CTC layers at the same relative depths: [3, 6, 9] of 12 -> [6, 12, 18] of 24."""
    scaled = {round(k * new_depth / old_depth) for k in layers}
    return sorted(k for k in scaled if 1 <= k < new_depth)


def scaled_config(template: ExperimentConfig, depth: int, epochs: int) -> ExperimentConfig:
    """The template's architecture with ``depth`` layers, trained for ``epochs`` epochs."""
    cfg = copy.deepcopy(template)
    m = cfg.model
    m.interctc_layers = scaled_layers(m.interctc_layers, m.num_layers, depth)
    if not m.interctc_layers:
        m.interctc_weight = 0.0
    if isinstance(m.stochastic_depth_rate, list):  # a linear ramp up to the top layer's rate
        m.stochastic_depth_rate = max(m.stochastic_depth_rate)
    m.num_layers, m.kept_layers = depth, None
    cfg.train.num_epochs = max(epochs, 1)
    cfg.validate(f"{depth}-layer config")
    return cfg


def same_assets(exp_dir: Path, template_dir: Path) -> bool:
    """Whether two experiment directories share the tokenizer and the CMVN statistics."""
    names = (TOKENIZER, CMVN)
    return all((exp_dir / n).read_bytes() == (template_dir / n).read_bytes() for n in names)


def given_model(exp_dir: Path, depth: int, template_dir: Path) -> tuple[NativeModel, str, str]:
    """A model, how it was trained, and where it comes from."""
    model = NativeModel.load(exp_dir)
    if model.num_layers != depth:
        raise UsageError(f"{exp_dir}: a {model.num_layers}-layer model, not {depth} layers")
    if not same_assets(exp_dir, template_dir):
        raise UsageError(
            f"{exp_dir}: another tokenizer or CMVN than {template_dir}; every depth must be "
            "evaluated on the same data"
        )
    return model, f"trained {model.config.train.num_epochs} epochs", str(exp_dir)


def built_model(
    depth: int, template: NativeModel, args: argparse.Namespace
) -> tuple[NativeModel, str, str]:
    """The template architecture at ``depth`` layers, trained here or with random weights;
    it shares the template's tokenizer and CMVN statistics."""
    template_dir = template.source
    cfg = scaled_config(template.config, depth, args.train_epochs)
    if args.train_epochs == 0:
        torch.manual_seed(args.seed)
        model = NativeModel(
            ASRModel(cfg.model).eval(), template.tokenizer, template.cmvn, template_dir, cfg
        )
        return model, "untrained", f"random weights, {template_dir}'s config"
    exp_dir = args.build_dir / f"L{depth}_epochs{args.train_epochs}"
    if not (exp_dir / MODEL).is_file():
        copy_assets(template_dir, template_dir / CMVN, exp_dir)
        train_cuts = ctc_feasible(
            load_cuts(data_path(args, args.train_set)),
            template.tokenizer,
            "train",
            cfg.model.ctc_upsample,
        )
        train_cuts = train_cuts.filter(
            lambda c: c.duration <= cfg.train.max_utterance_duration
        ).to_eager()
        logging.info(f"training the {depth}-layer model in {exp_dir}")
        train(
            cfg,
            exp_dir,
            train_cuts,
            load_cuts(data_path(args, args.dev_set)),
            template.tokenizer,
            template.cmvn,
            device="cpu",
        )
    model = NativeModel.load(exp_dir)
    return model, f"trained {args.train_epochs} epochs", f"trained here, {exp_dir}"


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """The result of ``fn`` and its wall time; earlier phases' garbage is collected first."""
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


# ----------------------------------------------------------------------------- the searches


def layers_text(layers: tuple[int, ...]) -> str:
    """Pruned layers as blocks: (1, 2, 3, 5) -> "1-3 5"."""
    return " ".join(str(a) if a == b else f"{a}-{b}" for a, b in blocks_of(layers))


def layer_passes(result: SearchResult, num_layers: int) -> int:
    """Encoder-layer passes per batch the search's evaluations took (GLP: each step's trie)."""
    steps: dict[int, list[tuple[int, ...]]] = {}
    for row in result.candidates:
        steps.setdefault(row.get("step", 0), []).append(kept_layers(num_layers, row["layers"]))
    return sum(layer_evaluations(subsets) for subsets in steps.values())


def search_row(method: str, phases: list[float | None], result: SearchResult, depth: int) -> dict:
    """A table row of a metric-scored search: its cost and its choice."""
    return {
        "method": method,
        "phases": phases,
        "evaluations": len(result.candidates),
        "passes": layer_passes(result, depth),
        "pruned": result.best_layers,
        "cer": result.candidates[result.best]["cer"],
    }


def comflp_rows(
    stack: EncoderStack, calib: Iterable[dict], batches: list[dict], num_prune: int, args
) -> list[dict]:
    """Stages 4-6 of CoMFLP in a scratch experiment: the dump and the scores once, then a
    search with the default scores and one with residual_sum alone."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="search_cost_") as tmp:
        exp = ExpDir(Path(tmp))
        _, dump_s = timed(
            lambda: dump_layers(stack, calib, exp.dump, "frames", args.frames_per_utt, args.seed)
        )
        feats, load_s = timed(lambda: load_layer_feats(exp.dump))
        info = read_dump_info(exp.dump)
        names = list(dict.fromkeys([*args.scores, "residual_sum"]))
        options = score_options(names, args.score_conf)
        build_all(exp, names, feats, info, options)  # the heatmaps are not the search's cost
        seconds = {
            n: json.loads((exp.score(n) / SCORE_SETTINGS).read_text())["seconds"] for n in names
        }
        for label, scores in (
            (" ".join(args.scores), args.scores),
            ("residual_sum", ["residual_sum"]),
        ):
            settings = SearchSettings(
                exp_dir=exp.root,
                scores=scores,
                beam_size=args.beam_size,
                top_k=args.top_k,
                score_top_k=args.score_top_k,
            )
            context = SearchContext(settings, stack, batches, exp)
            result = SEARCHES["comflp"]().run(context, [num_prune])[num_prune]
            extra = result.extra
            phases = [
                dump_s,
                load_s + sum(seconds[n] for n in scores),
                sum(extra["coarse_seconds"].values()),
                extra["fine_seconds"] + extra["refine"]["seconds"],  # the fallback's, if run
            ]
            rows.append(search_row(f"CoMFLP ({label})", phases, result, stack.num_layers))
    return rows


def glp_row(stack: EncoderStack, batches: list[dict], num_prune: int) -> dict:
    """Time GLP; its layer passes add up each step's trie."""
    results, seconds = timed(lambda: greedy_layer_pruning(stack, batches, [num_prune], METRIC))
    row = search_row(
        "GLP (greedy metric search)", [None] * 3 + [seconds], results[num_prune], stack.num_layers
    )
    return row


def oracle_row(stack: EncoderStack, batches: list[dict], num_prune: int, limit: int) -> dict:
    """Time the exhaustive search over all C(L, P) pruned models."""
    result, seconds = timed(
        lambda: exhaustive_metric_search(stack, batches, num_prune, METRIC, max_evaluations=limit)
    )
    method = "oracle (exhaustive metric search)"
    return search_row(method, [None] * 3 + [seconds], result, stack.num_layers)


def benchmark_depth(
    model: NativeModel,
    calib: Iterable[dict],
    batches: list[dict],
    args: argparse.Namespace,
) -> tuple[float, list[dict]]:
    """The unpruned dev CER (which also warms the model up) and one row per method."""
    stack = EncoderStack(model)
    num_layers = model.num_layers
    num_prune = num_layers // 2
    full = evaluate_model(model, batches)
    rows = [
        *comflp_rows(stack, calib, batches, num_prune, args),
        glp_row(stack, batches, num_prune),
    ]
    count = math.comb(num_layers, num_prune)
    if count <= args.oracle_max:
        rows.append(oracle_row(stack, batches, num_prune, args.oracle_max))
    else:
        logging.info(f"L={num_layers}: oracle skipped, C({num_layers}, {num_prune}) = {count}")
    for row in rows:
        row.update(L=num_layers, P=num_prune, total=sum(s for s in row["phases"] if s))
    return full.cer, rows


# ----------------------------------------------------------------------------- report


def seconds_text(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def results_table(rows: list[dict]) -> list[str]:
    lines = [
        "| L | P | method | dump s | scores s | coarse s | fine / search s | total s "
        "| models evaluated | layer passes / batch | pruned layers | dev CER % |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in rows:
        phases = " | ".join(seconds_text(s) for s in r["phases"])
        lines.append(
            f"| {r['L']} | {r['P']} | {r['method']} | {phases} | {r['total']:.3f} | "
            f"{r['evaluations']} | {r['passes']} | {layers_text(r['pruned'])} | {r['cer']:.2f} |"
        )
    return lines


def ratio_table(rows: list[dict], status: dict[int, str]) -> list[str]:
    """Per depth and CoMFLP variant: its total against GLP's and the oracle's, and its growth
    with L."""
    lines = [
        "| L | P | model | CoMFLP variant | CoMFLP s | GLP s | GLP / CoMFLP | oracle s "
        "| oracle / CoMFLP | CoMFLP vs first L |",
        "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_depth: dict[int, dict[str, float]] = {}
    for r in rows:
        by_depth.setdefault(r["L"], {})[r["method"]] = r["total"]
    first = by_depth[min(by_depth)]
    for depth, t in sorted(by_depth.items()):
        glp = t["GLP (greedy metric search)"]
        oracle = t.get("oracle (exhaustive metric search)")
        for variant in [m for m in t if m.startswith("CoMFLP")]:
            comflp = t[variant]
            oracle_cells = (
                "| | |" if oracle is None else f"| {oracle:.3f} | {oracle / comflp:.1f}x |"
            )
            lines.append(
                f"| {depth} | {depth // 2} | {status[depth]} | {variant[8:-1]} | {comflp:.3f} "
                f"| {glp:.3f} | {glp / comflp:.1f}x {oracle_cells} {comflp / first[variant]:.2f}x |"
            )
    return lines


def report(rows: list[dict], models: dict[int, tuple[str, str, float]], notes: list[str]) -> str:
    lines = [*notes, "", "Models:", ""]
    lines += [
        f"- L = {depth}: {status} ({source}); unpruned dev CER {cer:.2f}%"
        for depth, (status, source, cer) in sorted(models.items())
    ]
    status = {depth: m[0] for depth, m in models.items()}
    lines += ["", *results_table(rows), "", *ratio_table(rows, status)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def data_path(args: argparse.Namespace, subset: str) -> Path:
    return args.workdir / "data" / "fbank" / f"cuts_{subset}.jsonl.gz"


def main(args: argparse.Namespace) -> None:
    depths = [int(x) for x in args.layers.split()]
    if any(d < 2 or d % 2 for d in depths):
        raise UsageError(f"--layers {args.layers!r}: each depth must be even and >= 2 (P = L/2)")
    exp_dirs = experiment_dirs(args)
    template_dir = exp_dirs[min(exp_dirs)]
    template = NativeModel.load(template_dir)  # the tokenizer, CMVN and config of every depth
    calib: CutSet = random_subset(
        load_cuts(data_path(args, args.calib_set or args.train_set)),
        args.calib_num_utts,
        args.seed,
    )
    dev = random_subset(load_cuts(data_path(args, args.dev_set)), args.dev_num_utts, args.seed)
    batches, load_s = timed(lambda: load_eval_batches(template, dev, args.max_duration))
    rows: list[dict] = []
    models: dict[int, tuple[str, str, float]] = {}
    for depth in depths:
        if depth in exp_dirs:
            model, status, source = given_model(exp_dirs[depth], depth, template_dir)
        else:
            model, status, source = built_model(depth, template, args)
        # Not held in memory: the dump's time includes reading the features, as in stage 4.
        calib_batches = length_sorted_loader(calib, model.dataset(), args.max_duration)
        cer, depth_rows = benchmark_depth(model, calib_batches, batches, args)
        models[depth] = (status, source, cer)
        rows += depth_rows
        logging.info(
            f"L={depth}: " + ", ".join(f"{r['method']} {r['total']:.2f} s" for r in depth_rows)
        )
    notes = [
        f"CPU, {torch.get_num_threads()} torch threads. Calibration: {len(calib)} utterances of "
        f"{args.calib_set or args.train_set} (frame pooling, {args.frames_per_utt} frames each); "
        f"scores {' '.join(args.scores)} ({describe_options(score_options(args.scores, args.score_conf))}); beam "
        f"{args.beam_size}; fine search of the consensus's top {args.top_k} and each score's "
        f"first {args.score_top_k} (one score: its top {args.top_k}) and the proposal of "
        f"{', '.join(MergeChoice().fine_rules) or 'no rule'}, then --refine "
        f"{DEFAULT_REFINE}'s local search where its check fires (counted in the fine search; "
        "see its evaluations). The dump's batches are length-sorted (stage 4's). Metric searches: "
        f"{METRIC.upper()} (greedy CTC) on {len(dev)} utterances of {args.dev_set} in "
        f"{len(batches)} length-sorted batches, prefix cache on, loaded once in {load_s:.2f} s (not counted).",
        f"Every phase: one run. Oracle only where C(L, P) <= {args.oracle_max}.",
    ]
    emit(report(rows, models, notes), args.output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("."), help="where stages 0-2 ran")
    parser.add_argument("--layers", default="12 24 48", help="depths L; P = L/2 each")
    parser.add_argument("--exp12", type=Path, help="experiment directory of the 12-layer model")
    parser.add_argument("--exp24", type=Path, help="experiment directory of a 24-layer model")
    parser.add_argument("--exp48", type=Path, help="experiment directory of a 48-layer model")
    parser.add_argument(
        "--exp", action="append", default=[], metavar="L=DIR", help="the model of another depth"
    )
    parser.add_argument(
        "--train_epochs",
        type=int,
        default=2,
        help="epochs to train a depth with no experiment directory (0: random weights)",
    )
    parser.add_argument(
        "--build_dir",
        type=Path,
        default=Path("exp/bench_search_cost"),
        help="where models of other depths are trained (reused when already there)",
    )
    parser.add_argument("--train_set", default="train-clean-100")
    parser.add_argument("--dev_set", default="dev-clean")
    parser.add_argument("--calib_set", help="calibration set (default: the training set)")
    parser.add_argument("--calib_num_utts", type=int, default=320)
    parser.add_argument("--frames_per_utt", type=int, default=25)
    parser.add_argument("--scores", nargs="+", default=ScoreChoice().scores)
    parser.add_argument("--score_conf", nargs="*", default=[], help="as stage 5's")
    parser.add_argument("--beam_size", type=int, default=10)
    merge = MergeChoice()
    parser.add_argument("--top_k", type=int, default=merge.top_k)
    parser.add_argument("--score_top_k", type=int, default=merge.score_top_k)
    parser.add_argument("--dev_num_utts", type=int, default=200)
    parser.add_argument(
        "--oracle_max", type=int, default=1000, help="exhaustive search where C(L, P) <= this"
    )
    parser.add_argument("--max_duration", type=float, default=100.0, help="seconds per batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="also write the tables here")
    add_common_args(parser)
    run(main, parser)

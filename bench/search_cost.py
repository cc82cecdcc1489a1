#!/usr/bin/env python3
"""Benchmark: the cost of choosing which layers to prune, against depth (CoMFLP, GLP, oracle).

For each depth L (default 12, 24, 48), pruning P = L/2 layers, on CPU:

- CoMFLP: dump of a calibration subset (stage 4, mean pooling; the time includes reading the
  dump back, as stage 5 does), the dc correlation matrix over batches of --dc_batch_size
  utterances, the coarse beam search, and the fine search of its top K with the dev CER;
- GLP: the greedy metric search (comflp.prune.rules.greedy_layer_pruning);
- the oracle: the exhaustive metric search, where C(L, P) <= --oracle_max.

Every metric search runs through the same evaluator (comflp.prune.evaluator, prefix cache on) on the
same dev batches, loaded once before any timing. Each model is warmed up on those batches (the
unpruned dev CER) first. The correlation and coarse search, being cheap, are timed --repeats
times (median); the other phases once. Models: an experiment directory per depth (--exp12,
--exp24, --exp48, or --exp L=DIR); a depth without one gets the shallowest given model's
architecture with num_layers = L and its intermediate-CTC layers scaled, trained here for
--train_epochs epochs (0: random weights). Prints Markdown tables, also written to --output.

    python bench/search_cost.py --workdir . --exp12 exp/baseline --output exp/bench/search_cost.md
    python bench/search_cost.py --workdir /tmp/tiny --layers "4 8" --exp 4=/tmp/tiny/exp/baseline \\
        --train_epochs 0 --calib_num_utts 16 --dc_batch_size 8 --dev_num_utts 8
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import emit
from lhotse import CutSet

from comflp.asr.checkpoint import (
    CMVN_NAME,
    MODEL_NAME,
    copy_assets,
    load_experiment_config,
    load_model,
)
from comflp.asr.config import ExperimentConfig
from comflp.asr.data import AsrDataset, ctc_feasible, eval_loader, load_cuts, random_subset
from comflp.asr.features import load_cmvn
from comflp.asr.model import ASRModel
from comflp.asr.tokenizer import MODEL_NAME as TOKENIZER_NAME
from comflp.asr.tokenizer import Tokenizer
from comflp.asr.trainer import train
from comflp.cli import UsageError, add_common_args, run
from comflp.prune.correlation import correlation_matrix
from comflp.prune.dump import dump_layers, load_layer_feats
from comflp.prune.evaluator import evaluate_subsets, kept_layers, layer_evaluations, load_batches
from comflp.prune.fine_search import fine_search
from comflp.prune.rules import exhaustive_metric_search, greedy_layer_pruning
from comflp.prune.search import blocks_of, coarse_search

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
    names = (TOKENIZER_NAME, CMVN_NAME)
    return all((exp_dir / n).read_bytes() == (template_dir / n).read_bytes() for n in names)


def given_model(exp_dir: Path, depth: int, template_dir: Path) -> tuple[ASRModel, str, str]:
    """A model, how it was trained, and where it comes from."""
    model = load_model(exp_dir)
    if model.cfg.num_layers != depth:
        raise UsageError(f"{exp_dir}: a {model.cfg.num_layers}-layer model, not {depth} layers")
    if not same_assets(exp_dir, template_dir):
        raise UsageError(
            f"{exp_dir}: another tokenizer or CMVN than {template_dir}; every depth must be "
            "evaluated on the same data"
        )
    epochs = load_experiment_config(exp_dir).train.num_epochs
    return model, f"trained {epochs} epochs", str(exp_dir)


def built_model(
    depth: int, template_dir: Path, args: argparse.Namespace
) -> tuple[ASRModel, str, str]:
    """The template architecture at ``depth`` layers, trained here or with random weights."""
    cfg = scaled_config(load_experiment_config(template_dir), depth, args.train_epochs)
    if args.train_epochs == 0:
        torch.manual_seed(args.seed)
        return ASRModel(cfg.model).eval(), "untrained", f"random weights, {template_dir}'s config"
    exp_dir = args.build_dir / f"L{depth}_epochs{args.train_epochs}"
    if not (exp_dir / MODEL_NAME).is_file():
        copy_assets(template_dir, template_dir / CMVN_NAME, exp_dir)
        tokenizer = Tokenizer(exp_dir / TOKENIZER_NAME)
        train_cuts = ctc_feasible(
            load_cuts(data_path(args, args.train_set)), tokenizer, "train", cfg.model.ctc_upsample
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
            tokenizer,
            load_cmvn(exp_dir / CMVN_NAME),
            device="cpu",
        )
    return load_model(exp_dir), f"trained {args.train_epochs} epochs", f"trained here, {exp_dir}"


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """The result of ``fn`` and its wall time; earlier phases' garbage is collected first."""
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def median_timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """The result of ``fn`` and the median of ``repeats`` timed calls."""
    runs = [timed(fn) for _ in range(repeats)]
    return runs[0][0], statistics.median(s for _, s in runs)


# ----------------------------------------------------------------------------- the searches


def layers_text(layers: tuple[int, ...]) -> str:
    """Pruned layers as blocks: (1, 2, 3, 5) -> "1-3 5"."""
    return " ".join(str(a) if a == b else f"{a}-{b}" for a, b in blocks_of(layers))


def dump_and_reload(model: ASRModel, calib_loader) -> list[np.ndarray]:
    """Stage 4 (mean pooling) into a scratch directory, then read back as stage 5 does."""
    with tempfile.TemporaryDirectory(prefix="search_cost_dump_") as tmp:
        dump_layers(model, calib_loader, Path(tmp) / "dump")
        return load_layer_feats(Path(tmp) / "dump")


def comflp_row(
    model: ASRModel,
    calib_loader,
    batches: list[dict],
    tokenizer: Tokenizer,
    num_prune: int,
    args: argparse.Namespace,
) -> dict:
    """Time CoMFLP's four phases, as stages 4-6 run them."""
    feats, dump_s = timed(lambda: dump_and_reload(model, calib_loader))
    matrix, corr_s = median_timed(
        lambda: correlation_matrix(feats, "dc", batch_size=args.dc_batch_size), args.repeats
    )
    proposals, coarse_s = median_timed(
        lambda: coarse_search(matrix, num_prune, "beam", args.beam_size, args.top_k), args.repeats
    )
    result, fine_s = timed(
        lambda: fine_search(model, batches, tokenizer, proposals, METRIC, prefix_cache=True)
    )
    return {
        "method": f"CoMFLP (dc, beam {args.beam_size}, top {args.top_k})",
        "phases": [dump_s, corr_s, coarse_s, fine_s],
        "evaluations": len(proposals),
        "passes": result.layer_evaluations,
        "pruned": result.best_layers,
        "cer": result.rows[result.best]["cer"],
    }


def glp_layer_passes(num_layers: int, path: list[dict]) -> int:
    """Encoder-layer passes per batch of GLP: each step's candidates share one trie."""
    pruned: list[int] = []
    total = 0
    for step in path:
        remaining = [k for k in range(1, num_layers + 1) if k not in pruned]
        total += layer_evaluations([kept_layers(num_layers, (*pruned, k)) for k in remaining])
        pruned.append(step["removed"])
    return total


def glp_row(model: ASRModel, batches: list[dict], tokenizer: Tokenizer, num_prune: int) -> dict:
    result, seconds = timed(
        lambda: greedy_layer_pruning(model, batches, tokenizer, num_prune, METRIC)
    )
    return {
        "method": "GLP (greedy metric search)",
        "phases": [None, None, None, seconds],
        "evaluations": result.evaluations,
        "passes": glp_layer_passes(model.cfg.num_layers, result.path),
        "pruned": result.pruned,
        "cer": result.metric_value,
    }


def oracle_row(
    model: ASRModel, batches: list[dict], tokenizer: Tokenizer, num_prune: int, limit: int
) -> dict:
    num_layers = model.cfg.num_layers
    result, seconds = timed(
        lambda: exhaustive_metric_search(
            model, batches, tokenizer, num_prune, METRIC, max_evaluations=limit
        )
    )
    subsets = [
        kept_layers(num_layers, c) for c in combinations(range(1, num_layers + 1), num_prune)
    ]
    return {
        "method": "oracle (exhaustive metric search)",
        "phases": [None, None, None, seconds],
        "evaluations": result.evaluations,
        "passes": layer_evaluations(subsets),
        "pruned": result.pruned,
        "cer": result.metric_value,
    }


def benchmark_depth(
    model: ASRModel,
    calib_loader,
    batches: list[dict],
    tokenizer: Tokenizer,
    args: argparse.Namespace,
) -> tuple[float, list[dict]]:
    """The unpruned dev CER (which also warms the model up) and one row per method."""
    num_layers = model.cfg.num_layers
    num_prune = num_layers // 2
    full = evaluate_subsets(model, batches, tokenizer, [tuple(range(1, num_layers + 1))])[0]
    rows = [
        comflp_row(model, calib_loader, batches, tokenizer, num_prune, args),
        glp_row(model, batches, tokenizer, num_prune),
    ]
    count = math.comb(num_layers, num_prune)
    if count <= args.oracle_max:
        rows.append(oracle_row(model, batches, tokenizer, num_prune, args.oracle_max))
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
        "| L | P | method | dump s | correlation s | coarse s | fine / search s | total s "
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
    """Per depth: CoMFLP's total against GLP's and the oracle's, and its growth with L."""
    lines = [
        "| L | P | model | CoMFLP s | GLP s | GLP / CoMFLP | oracle s | oracle / CoMFLP "
        "| CoMFLP vs first L |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_depth: dict[int, dict[str, float]] = {}
    for r in rows:
        by_depth.setdefault(r["L"], {})[r["method"].split()[0]] = r["total"]
    first = by_depth[min(by_depth)]["CoMFLP"]
    for depth, t in sorted(by_depth.items()):
        comflp, glp, oracle = t["CoMFLP"], t["GLP"], t.get("oracle")
        oracle_cells = "| | |" if oracle is None else f"| {oracle:.3f} | {oracle / comflp:.1f}x |"
        lines.append(
            f"| {depth} | {depth // 2} | {status[depth]} | {comflp:.3f} | {glp:.3f} | {glp / comflp:.1f}x "
            f"{oracle_cells} {comflp / first:.2f}x |"
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
    tokenizer = Tokenizer(template_dir / TOKENIZER_NAME)
    dataset = AsrDataset(tokenizer, load_cmvn(template_dir / CMVN_NAME))
    calib: CutSet = random_subset(
        load_cuts(data_path(args, args.calib_set or args.train_set)),
        args.calib_num_utts,
        args.seed,
    )
    dev = random_subset(load_cuts(data_path(args, args.dev_set)), args.dev_num_utts, args.seed)
    batches, load_s = timed(lambda: load_batches(eval_loader(dev, dataset, args.max_duration)))
    rows: list[dict] = []
    models: dict[int, tuple[str, str, float]] = {}
    for depth in depths:
        if depth in exp_dirs:
            model, status, source = given_model(exp_dirs[depth], depth, template_dir)
        else:
            model, status, source = built_model(depth, template_dir, args)
        calib_loader = eval_loader(calib, dataset, args.max_duration)
        cer, depth_rows = benchmark_depth(model, calib_loader, batches, tokenizer, args)
        models[depth] = (status, source, cer)
        rows += depth_rows
        logging.info(
            f"L={depth}: " + ", ".join(f"{r['method']} {r['total']:.2f} s" for r in depth_rows)
        )
    notes = [
        f"CPU, {torch.get_num_threads()} torch threads. Calibration: {len(calib)} utterances of "
        f"{args.calib_set or args.train_set} (mean pooling); dc over batches of "
        f"{args.dc_batch_size}; beam {args.beam_size}, top {args.top_k}. Metric searches: "
        f"{METRIC.upper()} (greedy CTC) on {len(dev)} utterances of {args.dev_set} in "
        f"{len(batches)} batches, prefix cache on, loaded once in {load_s:.2f} s (not counted).",
        f"Correlation and coarse times: median of {args.repeats}; other phases: one run. "
        f"Oracle only where C(L, P) <= {args.oracle_max}.",
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
    parser.add_argument("--dc_batch_size", type=int, default=32)
    parser.add_argument("--beam_size", type=int, default=10)
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--dev_num_utts", type=int, default=200)
    parser.add_argument(
        "--oracle_max", type=int, default=1000, help="exhaustive search where C(L, P) <= this"
    )
    parser.add_argument("--max_duration", type=float, default=100.0, help="seconds per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timings of the cheap phases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="also write the tables here")
    add_common_args(parser)
    run(main, parser)

#!/usr/bin/env python3
"""Search-quality study: how well each coarse scoring variant ranks pruning proposals by the
dev CER of their pruned models (see comflp/prune/quality.py for the method).

One forward pass dumps --calib_num_utts calibration utterances (frames pooling, at most
--frames_per_utt frames each) into DIR/dump; every variant (measure, dc batch size, pooling,
calibration size N, block aggregation) is derived from it. The dev CER of every proposal is
cached in DIR/cers_prune<P>.json, so a rerun evaluates nothing. Writes DIR/quality.json,
DIR/SEARCH_QUALITY.md and one scatter plot per P (DIR/scatter_prune<P>.png).
"""

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np

from comflp.asr.data import eval_loader, load_cuts, load_eval_batches, random_subset
from comflp.cli import (
    UsageError,
    add_common_args,
    add_model_args,
    load_model_args,
    parse_num_prune,
    positive_int,
    run,
)
from comflp.expdir import DUMP_INFO, ExpDir
from comflp.prune.dump import POOLINGS, dump_layers
from comflp.prune.quality import (
    CALIB_SIZES,
    REFERENCE_NUM_UTTS,
    TOP_KS,
    CerCache,
    StudyFeatures,
    format_table,
    ranking,
    smallest_matching_size,
    study_num_prune,
    study_variants,
    variant_matrices,
)
from comflp.prune.search import COARSE_MEASURES
from comflp.utils import atomic_path, atomic_write_json, atomic_write_text

QUALITY_JSON = "quality.json"
REPORT_MD = "SEARCH_QUALITY.md"
DUMP_DIR = "dump"


def calibration_dump(args: argparse.Namespace, model) -> Path:
    """The study's frame-pooled dump of the calibration subset (reused when it matches)."""
    dump_dir = args.output_dir / DUMP_DIR
    study = {
        "cuts": str(args.calib_cuts),
        "requested_utts": args.calib_num_utts,
        "frames_per_utt": args.frames_per_utt,
        "seed": args.seed,
        "model_dir": str(model.source),
    }
    info_path = dump_dir / DUMP_INFO
    if info_path.is_file() and json.loads(info_path.read_text()).get("study") == study:
        logging.info(f"{dump_dir}: reusing the study's dump")
        return dump_dir
    cuts = random_subset(load_cuts(args.calib_cuts), args.calib_num_utts, args.seed)
    dump_layers(
        model,
        eval_loader(cuts, model.dataset(), args.max_duration),
        dump_dir,
        pooling="frames",
        frames_per_utt=args.frames_per_utt,
        seed=args.seed,
        extra_info={"study": study},
    )
    return dump_dir


def plot_scatter(result: dict, path: Path) -> None:
    """Score against dev CER, one panel per variant; the coarse top 10 in red."""
    from comflp.report.plots import plt  # sets the Agg backend

    cer = np.array([p["cer"] for p in result["proposals"]])
    variants = result["variants"]
    ncols = min(8, len(variants))
    nrows = math.ceil(len(variants) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(2.6 * ncols, 2.5 * nrows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(variants) :]:
        ax.axis("off")
    for ax, v in zip(axes.flat, variants):
        scores = np.array(v["scores"])
        top = ranking(scores)[: max(TOP_KS)]
        ax.scatter(scores, cer, s=4, alpha=0.4, color="C0")
        ax.scatter(scores[top], cer[top], s=8, color="C3")
        ax.set_title(f"{v['name']}\nrho {v['spearman']:.2f}", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.locator_params(axis="x", nbins=3)
        ax.grid(alpha=0.3)
    fig.supxlabel("coarse score (higher: prune first)")
    fig.supylabel("dev CER of the pruned model (%)")
    fig.suptitle(f"Coarse score vs dev CER, P = {result['num_prune']} (red: coarse top 10)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def glp_reference(exp_dir: Path, num_prune: int) -> dict | None:
    """Stage 6's GLP search of the experiment, when there is one: its seconds and CER."""
    path = ExpDir(exp_dir).search_result("glp", num_prune)
    if not path.is_file():
        return None
    glp = json.loads(path.read_text())
    if "skipped" in glp:
        return None
    return {"seconds": glp["seconds"], "cer": glp["best_metric"], "layers": glp["best_layers"]}


def size_lines(result: dict, reference: int) -> list[str]:
    """The smallest N whose best-of-top-10 CER equals N=reference's, per measure family."""
    families: dict[tuple[str, str], list[dict]] = {}
    for v in result["variants"]:
        if v["aggregation"] == "mean":
            label = v["name"].split("/")[0]
            families.setdefault((label, v["pooling"]), []).append(v)
    glp = result.get("glp")
    lines = [f"Smallest N whose best-of-top-10 CER equals N={reference}'s:", ""]
    for (label, pooling), rows in families.items():
        n = smallest_matching_size(rows, reference)
        if n is None:
            continue
        by_n = {r["num_utts"]: r for r in rows}
        small, ref = by_n[n]["total_seconds"], by_n[reference]["total_seconds"]
        line = (
            f"- {label}/{pooling}: N={n} (CER {by_n[n]['regret']['10']['cer']:.2f}); "
            f"CoMFLP search {small:.1f} s against {ref:.1f} s at N={reference}"
        )
        if glp:
            line += f"; GLP {glp['seconds']:.1f} s ({glp['seconds'] / small:.1f}x CoMFLP's)"
        lines.append(line)
    return lines


def report(summary: dict) -> str:
    calib = summary["calibration"]
    lines = [
        "# Search quality: coarse score against dev CER",
        "",
        f"Model: {summary['model_dir']} ({summary['num_layers']} layers). Dev: "
        f"{summary['dev_num_utts']} utterances of {summary['dev_cuts']}. Calibration: "
        f"{calib['num_utts']} utterances of {calib['cuts']} (asked for {calib['requested']}), "
        f"sizes N = {', '.join(map(str, calib['sizes']))}.",
    ]
    if calib["capped"]:
        lines.append(
            f"Sizes above the {calib['num_utts']} available calibration utterances were capped "
            f"to {calib['num_utts']} (asked for {', '.join(map(str, calib['asked_sizes']))})."
        )
    lines += [
        "",
        "All variants come from one frame-pooled dump (at most "
        f"{summary['frames_per_utt']} frames per utterance): N takes the first N utterances "
        "of a seeded permutation; mean pooling averages the dumped frames; frame pooling "
        f"keeps at most {summary['frame_rows']} rows. Spearman/Kendall: between score and "
        "CER over the uniform proposals (negative is good). Top-1 pct: % of proposals with a "
        "strictly higher CER than the coarse top-1. Regret@K: best CER of the top K minus "
        "the oracle's (absolute CER points; rel@10 relative). CoMFLP CER: the fine search of "
        "the beam search's top 10. Search s: dump share + matrix + beam + fine search.",
    ]
    for result in summary["results"]:
        p = result["num_prune"]
        kind = "all" if result["exhaustive"] else f"{result['num_uniform']} uniform + top-K"
        lines += [
            "",
            f"## P = {p}",
            "",
            f"{result['num_proposals']} proposals ({kind}); oracle CER "
            f"{result['oracle_cer']:.2f} (pruning {result['oracle_layers']}).",
        ]
        if result.get("glp"):
            glp = result["glp"]
            lines.append(f"GLP (stage 6): CER {glp['cer']:.2f} in {glp['seconds']:.1f} s.")
        lines += ["", format_table(result), "", *size_lines(result, summary["reference"])]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    bad = sorted(set(args.measures) - set(COARSE_MEASURES))
    if bad:
        raise UsageError(
            f"--measures {' '.join(bad)}: unknown; choose from {', '.join(COARSE_MEASURES)}"
        )
    model = load_model_args(args)
    nums = parse_num_prune(
        " ".join(map(str, args.num_prune)), model.num_layers, f"the {model.num_layers}-layer model"
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    features = StudyFeatures(calibration_dump(args, model), args.frame_rows, args.seed)
    available = features.num_utts
    sizes = sorted({min(n, available) for n in args.calib_sizes})
    reference = min(args.reference_num_utts, available)
    if reference not in sizes:
        raise UsageError(
            f"--reference_num_utts {args.reference_num_utts}: not among --calib_sizes {sizes}"
        )
    if max(args.calib_sizes) > available:
        logging.warning(f"only {available} calibration utterances: sizes capped to {sizes}")
    variants = study_variants(args.measures, args.poolings, sizes, features.rows, reference)
    logging.info(f"{len(variants)} scoring variants")
    try:
        matrices = variant_matrices(features, variants)
    except ValueError as e:
        raise UsageError(f"correlation matrices of {args.output_dir / DUMP_DIR}: {e}") from None
    batches = load_eval_batches(
        model, args.dev_cuts, args.max_duration, args.dev_num_utts, args.seed
    )
    settings = {
        "model_dir": str(model.source),
        "dev_cuts": str(args.dev_cuts),
        "dev_num_utts": args.dev_num_utts,
        "seed": args.seed,
        "max_duration": args.max_duration,
    }
    seconds_per_utt = features.info["seconds"] / available
    results = []
    for p in nums:
        try:
            cache = CerCache(args.output_dir / f"cers_prune{p}.json", settings)
        except ValueError as e:
            raise UsageError(str(e)) from None
        result = study_num_prune(
            model,
            batches,
            variants,
            matrices,
            p,
            cache,
            seconds_per_utt,
            args.max_proposals,
            args.sample_size,
            args.seed,
        )
        result["glp"] = glp_reference(args.exp_dir, p)
        plot_scatter(result, args.output_dir / f"scatter_prune{p}.png")
        results.append(result)
        best = min(result["variants"], key=lambda v: v["spearman"])
        logging.info(
            f"P={p}: {result['num_proposals']} proposals, oracle CER {result['oracle_cer']:.2f}; "
            f"best Spearman {best['spearman']:.3f} ({best['name']})"
        )
    summary = {
        **settings,
        "num_layers": model.num_layers,
        "frames_per_utt": args.frames_per_utt,
        "frame_rows": args.frame_rows,
        "reference": reference,
        "calibration": {
            "cuts": str(args.calib_cuts),
            "requested": args.calib_num_utts,
            "num_utts": available,
            "asked_sizes": list(args.calib_sizes),
            "sizes": sizes,
            "capped": max(args.calib_sizes) > available,
        },
        "results": results,
    }
    atomic_write_json(args.output_dir / QUALITY_JSON, summary)
    atomic_write_text(args.output_dir / REPORT_MD, report(summary))
    logging.info(f"wrote {args.output_dir / QUALITY_JSON} and {args.output_dir / REPORT_MD}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_args(parser)
    parser.add_argument("--num_prune", type=positive_int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument(
        "--calib_cuts", type=Path, default=Path("data/fbank/cuts_train-clean-100.jsonl.gz")
    )
    parser.add_argument("--calib_num_utts", type=positive_int, default=max(CALIB_SIZES))
    parser.add_argument(
        "--calib_sizes",
        type=positive_int,
        nargs="+",
        default=list(CALIB_SIZES),
        help="calibration sizes N compared (capped at the calibration utterances)",
    )
    parser.add_argument(
        "--reference_num_utts",
        type=positive_int,
        default=REFERENCE_NUM_UTTS,
        help="the N the other sizes are compared with",
    )
    parser.add_argument("--dev_cuts", type=Path, default=Path("data/fbank/cuts_dev-clean.jsonl.gz"))
    parser.add_argument("--dev_num_utts", type=positive_int, default=320)
    parser.add_argument("--measures", nargs="+", default=list(COARSE_MEASURES))
    parser.add_argument("--poolings", nargs="+", choices=POOLINGS, default=list(POOLINGS))
    parser.add_argument(
        "--frames_per_utt", type=int, default=50, help="frames dumped per utterance (0: all)"
    )
    parser.add_argument(
        "--frame_rows", type=positive_int, default=8192, help="frame pooling: rows kept at most"
    )
    parser.add_argument(
        "--max_proposals",
        type=positive_int,
        default=1000,
        help="evaluate all C(L, P) proposals up to this many, else a sample",
    )
    parser.add_argument(
        "--sample_size", type=positive_int, default=300, help="uniform proposals of a sample"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max_duration", type=float, default=100.0, help="seconds of audio per batch"
    )
    add_common_args(parser)
    return parser


if __name__ == "__main__":
    run(main, build_parser())

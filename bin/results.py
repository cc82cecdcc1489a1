#!/usr/bin/env python3
"""Stage 7, step 3 (and 8): merge decoding parts, score every method, write RESULTS.md and a plot.

Reads the method lists of compare/ (stage 7's, and stage 8's when there is one) and
compare/decode/<set>/<model>/part*.json; writes per model and set the scores (result.md,
scores.json, alignments), then RESULTS.md with one row per method and P, compare/results.json
and compare/error_vs_prune.png.
"""

import argparse
import json
import logging
from pathlib import Path

from comflp.asr.scoring import write_scores
from comflp.cli import UsageError, add_common_args, run
from comflp.expdir import CONFIG, DECODE_PART, ERROR_PLOT, RESULTS_JSON, ExpDir
from comflp.prune.methods import METHOD_LISTS, MethodList
from comflp.report.plots import plot_error_vs_prune
from comflp.report.results import build_rows, methods_table, results_markdown
from comflp.utils import atomic_write_json, atomic_write_text


def merge_parts(key_dir: Path) -> dict:
    """All parts of one decoding, checked for completeness, utterances in part order."""
    parts = sorted(key_dir.glob(DECODE_PART.format(part="*")), key=lambda p: int(p.stem[4:]))
    if not parts:
        raise UsageError(f"{key_dir}: no decoding results (run stage 7's decoding step)")
    loaded = [json.loads(p.read_text()) for p in parts]
    expected = loaded[0]["num_parts"]
    have = sorted(d["part"] for d in loaded)
    if have != list(range(1, expected + 1)) or any(d["num_parts"] != expected for d in loaded):
        raise UsageError(
            f"{key_dir}: parts {have} found, expected 1..{expected} of one decoding run"
        )
    merged = {k: loaded[0][k] for k in ("key", "params", "decoding_method")}
    merged["utts"] = [u for d in loaded for u in d["utts"]]
    merged["audio_seconds"] = sum(d["audio_seconds"] for d in loaded)
    merged["decode_seconds"] = sum(d["decode_seconds"] for d in loaded)
    return merged


def score_all(exp: ExpDir, methods: MethodList, sets: list[str], rtf_set: str):
    """Scores per model key and set, parameters and RTF per key, and the decoding method."""
    scores, params, rtf = {}, {}, {}
    decoding_method = None
    for key in methods.unique():
        scores[key] = {}
        for s in sets:
            merged = merge_parts(exp.decoded(s, key))
            decoding_method = merged["decoding_method"]
            timing = {
                "audio_seconds": merged["audio_seconds"],
                "decode_seconds": merged["decode_seconds"],
                "rtf": merged["decode_seconds"] / max(merged["audio_seconds"], 1e-9),
            }
            stats = write_scores(exp.decoded(s, key), f"{s} {key}", merged["utts"], timing)
            scores[key][s] = {"wer": stats["wer"].err, "cer": stats["cer"].err}
            params[key] = merged["params"]
            if s == rtf_set:
                rtf[key] = timing["rtf"]
    return scores, params, rtf, decoding_method


def main(args: argparse.Namespace) -> None:
    exp = ExpDir(args.exp_dir)
    metrics = tuple(args.metrics.split())
    if not metrics or set(metrics) - {"wer", "cer"}:
        raise UsageError(f"--metrics {args.metrics!r}: expected wer, cer or both")
    lists = [exp.compare / name for name in METHOD_LISTS.values()]
    methods = MethodList.load(*(p for p in lists if p.is_file() or p == lists[0]))
    sets = args.sets.split()
    rtf_set = args.rtf_set or sets[-1]
    scores, params, rtf, decoding_method = score_all(exp, methods, sets, rtf_set)
    rows = build_rows(methods, scores, params, rtf)
    table = methods_table(rows, sets, metrics)
    plot = exp.compare / ERROR_PLOT
    plot_error_vs_prune(rows, sets[-1], plot, metrics)
    atomic_write_json(
        exp.compare / RESULTS_JSON,
        {"rows": [r.__dict__ for r in rows], "sets": sets, "rtf_set": rtf_set},
    )
    config_path = exp.root / CONFIG
    config = config_path.read_text() if config_path.is_file() else "(model trained elsewhere)\n"
    doc = results_markdown(exp.root, table, plot, config, args.command, decoding_method, rtf_set)
    atomic_write_text(exp.results_md, doc)
    print(table)
    logging.info(f"wrote {exp.results_md}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exp_dir", type=Path, required=True)
    parser.add_argument("--sets", required=True, help="space-separated set names, as decoded")
    parser.add_argument(
        "--rtf_set", default="", help="set whose decoding gives the RTF (default: the last)"
    )
    parser.add_argument(
        "--metrics", default="wer cer", help="error rates in the table: wer, cer or both"
    )
    parser.add_argument(
        "--command", default="", help="the command line that produced these results"
    )
    add_common_args(parser)
    run(main, parser)

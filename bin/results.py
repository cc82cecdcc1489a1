#!/usr/bin/env python3
"""Stage 7, step 3: merge decoding parts, score every method, write RESULTS.md and a plot.

Reads the method lists and <compare_dir>/decode/<set>/<key>/part*.json; writes per model and
set the scores (result.md, scores.json, alignments), then <exp_dir>/RESULTS.md with one row
per method and P, results.json, and error_vs_prune.png.
"""

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from comflp.asr.scoring import write_scores
from comflp.cli import UsageError, add_common_args, run
from comflp.prune.methods import MethodList, build_rows, results_table
from comflp.report.plots import plot_error_vs_prune
from comflp.utils import atomic_write_json, atomic_write_text


def merge_parts(key_dir: Path) -> dict:
    """All parts of one decoding, checked for completeness, utterances in part order."""
    parts = sorted(key_dir.glob("part*.json"), key=lambda p: int(p.stem[4:]))
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


def main(args: argparse.Namespace) -> None:
    methods = MethodList.load(*args.methods)
    sets = args.sets.split()
    rtf_set = args.rtf_set or sets[-1]
    scores, params, rtf = {}, {}, {}
    decoding_method = None
    for key in methods.unique():
        scores[key] = {}
        for s in sets:
            merged = merge_parts(args.compare_dir / "decode" / s / key)
            decoding_method = merged["decoding_method"]
            timing = {
                "audio_seconds": merged["audio_seconds"],
                "decode_seconds": merged["decode_seconds"],
                "rtf": merged["decode_seconds"] / max(merged["audio_seconds"], 1e-9),
            }
            stats = write_scores(
                args.compare_dir / "decode" / s / key, f"{s} {key}", merged["utts"], timing
            )
            scores[key][s] = {"wer": stats["wer"].err, "cer": stats["cer"].err}
            params[key] = merged["params"]
            if s == rtf_set:
                rtf[key] = timing["rtf"]
    metrics = tuple(args.metrics.split())
    if not metrics or set(metrics) - {"wer", "cer"}:
        raise UsageError(f"--metrics {args.metrics!r}: expected wer, cer or both")
    rows = build_rows(methods, scores, params, rtf)
    table = results_table(rows, sets, metrics)
    plot_error_vs_prune(rows, sets[-1], args.compare_dir / "error_vs_prune.png", metrics)
    atomic_write_json(
        args.compare_dir / "results.json",
        {"rows": [r.__dict__ for r in rows], "sets": sets, "rtf_set": rtf_set},
    )
    config = (args.exp_dir / "config.yaml").read_text()
    doc = f"""# Results: {args.exp_dir}

Produced by `{args.command or "bin/results.py"}` on {time.strftime("%Y-%m-%d %H:%M")},
{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}.
Decoding: {decoding_method}. RTF measured on {rtf_set}. Error rates in percent; random
selection: mean ± std over its seeds. Search time: CoMFLP counts the layer dump, the
correlation matrix and the coarse search (+ the fine search); GLP and the exhaustive metric
search (oracle) count their evaluations on the dev subset; fixed rules cost nothing.
"evaluations": pruned models evaluated with the task metric.

{table}
![test error against the number of pruned layers]({(args.compare_dir / "error_vs_prune.png").relative_to(args.exp_dir)})

Per-model scores, hypotheses and alignments: `{args.compare_dir.relative_to(args.exp_dir)}/decode/<set>/<model>/`.

## Model config (`{args.exp_dir}/config.yaml`)

```yaml
{config}```
"""
    atomic_write_text(args.exp_dir / "RESULTS.md", doc)
    print(table)
    logging.info(f"wrote {args.exp_dir / 'RESULTS.md'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exp_dir", type=Path, required=True)
    parser.add_argument("--compare_dir", type=Path, required=True)
    parser.add_argument("--methods", type=Path, nargs="+", required=True)
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

"""The search-quality study's report: its Markdown (one table per P, the smallest calibration
sizes that match the reference) and its scatter plots (score against dev CER per variant)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from comflp.plots import plt, save_figure
from comflp.prune.searches.refine import AUTO_CONDITION
from comflp.quality.study import TOP_KS, format_table, ranking, smallest_matching_size
from comflp.report.provenance import written_lines


def plot_scatter(result: dict, path: Path) -> None:
    """Score against dev CER, one panel per variant; the coarse top 10 in red."""
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
        ax.scatter(scores, cer, s=4, alpha=0.4, color="C0", linewidths=0)
        ax.scatter(scores[top], cer[top], s=8, color="C3")
        ax.set_title(f"{v['name']}\nrho {v['spearman']:.2f}", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.locator_params(axis="x", nbins=3)
        ax.grid(alpha=0.3)
    fig.supxlabel("coarse score (higher: prune first)")
    fig.supylabel("dev CER of the pruned model (%)")
    fig.suptitle(f"Coarse score vs dev CER, P = {result['num_prune']} (red: coarse top 10)")
    save_figure(fig, path, dpi=80)  # dozens of panels of ~1,000 points: kept under 1 MB


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


def teacher_forced_lines(result: dict) -> list[str]:
    """A decoder stack's cheap metric: the teacher-forced NLL ranked against real decoding."""
    tf = result.get("teacher_forced")
    if not tf:
        return []
    regrets = ", ".join(f"@{k} {tf['regret'][k]['regret']:.2f}" for k in ("1", "3", "10"))
    return [
        f"Teacher-forced NLL as the metric (no decoding): Spearman {tf['spearman']:.3f}, "
        f"Kendall {tf['kendall']:.3f} against the CER of greedy decoding; its best proposal "
        f"{tf['best_layers']}, regret {regrets}; a loss-only pass over all "
        f"{result['num_proposals']} proposals took {tf['seconds']:.1f} s, decoding them "
        f"{tf['decode_seconds']:.1f} s.",
        "",
    ]


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
        lines += ["", format_table(result), "", *teacher_forced_lines(result)]
        lines += size_lines(result, summary["reference"])
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _pipeline(summary: dict) -> str:
    scores, k = ", ".join(summary["scores"]), summary["top_k"]
    if summary["consensus"] and len(summary["scores"]) > 1:
        merged = (
            f"the top {k} of the consensus of {scores} and the first {summary['score_top_k']} "
            "of each score's beam, merged"
        )
    else:
        merged = f"the beam top {k} of {scores}, merged"
    refine = {
        "never": "no local search",
        "always": "then the one-swap local search",
        "auto": f"then the one-swap local search where {AUTO_CONDITION}",
    }[summary["refine"]]
    rules = summary.get("fine_rules", [])  # a summary written before the option: none
    if rules:
        merged += f", with the proposal{'s' if len(rules) > 1 else ''} of {', '.join(rules)}"
    return f"{merged}, one fine search, {refine}"


def _check(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def robustness_report(summary: dict) -> str:
    """The study across models: per score median / worst; per model the pipeline."""
    p = summary["num_prune"]
    lines = [
        f"# Search quality across models (P = {p})",
        *written_lines(summary["written"]),
        "",
        "Per score: Spearman between its score and the dev CER over every proposal, and the "
        "relative regret of the best of its top 10 against the exhaustive oracle; median and "
        "worst over the models. `consensus of A+B (over the study's proposals)`: the mean of "
        "those scores standardised over all the study's proposals; `consensus of A+B/...`: the "
        "consensus a study built as stage 6 does (standardised over a reference set).",
        "",
        "| score | median Spearman | worst Spearman | median rel@10 | worst rel@10 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    across = summary["across"]
    for name, q in sorted(across.items(), key=lambda kv: kv[1]["worst_spearman"]):
        lines.append(
            f"| {name} | {q['median_spearman']:.3f} | {q['worst_spearman']:.3f} | "
            f"{_pct(q['median_relative@10'])} | {_pct(q['worst_relative@10'])} |"
        )
    lines += [
        "",
        f"The default pipeline ({_pipeline(summary)}) on each model; check: the Spearman "
        "between the judged ranking's scores and the CERs of its evaluated top K:",
        "",
        "| model | oracle CER | pipeline CER | relative to the oracle | proposals evaluated "
        "| check | GLP CER |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, m in summary["models"].items():
        glp, pipe = m["glp"], m["pipeline"]
        lines.append(
            f"| {label} | {m['oracle_cer']:.2f} | {pipe['cer']:.2f} | "
            f"{_pct(pipe['relative'])} | {pipe['evaluations']} | "
            f"{_check(pipe['refine_spearman'])} | {'-' if not glp else format(glp['cer'], '.2f')} |"
        )
    if summary["calibration"]:
        lines += [
            "",
            "Another random calibration subset of the same size:",
            "",
            "| model | score | ranking agreement | Spearman | Spearman, other subset |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for label, shifts in summary["calibration"].items():
            for score, q in shifts.items():
                lines.append(
                    f"| {label} | {score} | {q['rank_agreement']:.3f} | {q['spearman']:.3f} | "
                    f"{q['spearman_again']:.3f} |"
                )
    return "\n".join(lines) + "\n"

"""Stage 7's report: one row per method and P, the Markdown table, and RESULTS.md.

Rows come from the method registry (:mod:`comflp.prune.methods`) and the scores of each
decoded model; random selection is summarised over its seeds as mean and standard deviation.
A row belongs to one stack; a table with decoder rows has a "stack" column (P and the layer
numbers are that stack's).
RESULTS.md names the command, the comflp commit, the library versions and the machine, as
ESPnet's result tables do.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from comflp.prune.methods import Method, MethodList
from comflp.report.provenance import provenance_lines


@dataclass
class Row:
    method: str
    num_prune: int
    pruned: str
    errors: dict[str, dict[str, float]]  # set -> {"wer": , "cer": } (means)
    spread: dict[str, dict[str, float]]  # set -> std over seeds (random only)
    params: int
    rtf: float
    search_seconds: float | None
    evaluations: int | None
    stack: str = "encoder"

    @property
    def label(self) -> str:
        """The method, with its stack when that is not the encoder (plot legends)."""
        return self.method if self.stack == "encoder" else f"{self.method} ({self.stack})"


STACK_ORDER = ("encoder", "decoder")


def build_rows(
    methods: MethodList,
    scores: dict[str, dict[str, dict]],
    params: dict[str, int],
    rtf: dict[str, float],
) -> list[Row]:
    """One row per (stack, method name, P); ``scores[key][set]`` holds ``{"wer": , "cer": }``.
    The unpruned model first, then the encoder's rows, then the decoder's, each by P."""
    groups: dict[tuple[str, str, int], list[Method]] = {}
    for m in methods.methods:
        groups.setdefault((m.stack, m.name, m.num_prune), []).append(m)
    rows = []
    for (stack, name, p), group in groups.items():
        sets = list(scores[group[0].key])
        errors, spread = {}, {}
        for s in sets:
            errors[s] = {
                u: statistics.mean(scores[m.key][s][u] for m in group) for u in ("wer", "cer")
            }
            if len(group) > 1:
                spread[s] = {
                    u: statistics.stdev(scores[m.key][s][u] for m in group) for u in ("wer", "cer")
                }
        shown = (
            group[0].original_pruned if group[0].original_pruned is not None else group[0].pruned
        )
        pruned = (" ".join(map(str, shown)) or "-") if len(group) == 1 else f"{len(group)} seeds"
        costs = [m.search_seconds for m in group if m.search_seconds is not None]
        rows.append(
            Row(
                method=name,
                num_prune=p,
                pruned=pruned,
                errors=errors,
                spread=spread,
                params=params[group[0].key],
                rtf=statistics.mean(rtf[m.key] for m in group),
                search_seconds=statistics.mean(costs) if costs else None,
                evaluations=group[0].evaluations,
                stack=stack,
            )
        )
    return sorted(rows, key=lambda r: (r.num_prune > 0, STACK_ORDER.index(r.stack), r.num_prune))


def _fmt_error(row: Row, s: str, unit: str) -> str:
    value = f"{row.errors[s][unit]:.2f}"
    return value + (f" ± {row.spread[s][unit]:.2f}" if s in row.spread else "")


def methods_table(
    rows: list[Row], sets: list[str], metrics: tuple[str, ...] = ("wer", "cer")
) -> str:
    """Markdown: method, P, pruned layers, error rates per set, parameters, RTF, search cost.

    ``metrics``: the error rates shown (``wer``, ``cer``); Mandarin, written without spaces,
    shows CER only.
    """
    stacks = any(r.stack != "encoder" for r in rows)
    head = ["method", *(["stack"] if stacks else []), "P", "pruned layers"]
    for s in sets:
        head += [f"{s} {m.upper()}" for m in metrics]
    head += ["params", "RTF", "search (s)", "evaluations"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, *([r.stack] if stacks else []), str(r.num_prune), r.pruned]
        for s in sets:
            cells += [_fmt_error(r, s, m) for m in metrics]
        cells += [
            f"{r.params / 1e6:.2f}M",
            f"{r.rtf:.4f}",
            "-" if r.search_seconds is None else f"{r.search_seconds:.1f}",
            "-" if r.evaluations is None else str(r.evaluations),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(
    exp_dir: Path,
    table: str,
    plots: dict[str, Path],
    config: str,
    command: str,
    decoding_method: str,
    rtf_set: str,
) -> str:
    """The text of RESULTS.md: provenance, how to read the table, the table, the plot, the config."""
    provenance = "\n".join(provenance_lines(command))
    figures = "\n".join(
        f"![{caption}]({path.relative_to(exp_dir)})" for caption, path in plots.items()
    )
    return f"""# Results: {exp_dir}

Written on {time.strftime("%Y-%m-%d %H:%M")}.

{provenance}

Decoding: {decoding_method}. RTF measured on {rtf_set}. Error rates in percent; random
selection: mean ± std over its seeds. Search time: CoMFLP counts the layer dump, the
correlation matrix and the coarse search (+ the fine search); GLP and the exhaustive metric
search (oracle) count their evaluations on the dev subset; fixed rules cost nothing.
"evaluations": pruned models evaluated with the task metric.

{table}
{figures}

Per-model scores, hypotheses and alignments: `compare/decode/<set>/<model>/`.

## Model config

```yaml
{config}```
"""

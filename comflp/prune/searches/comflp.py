"""CoMFLP (Liu, Peng, Lee 2023): coarse search on each score, then one fine search.

For every P and every score of ``--scores`` (each built once by stage 5 from the one stage-4
dump, or composed of the others: the consensus, :mod:`comflp.prune.scores.consensus`, the mean
of the scores standardised over proposals of the same size), the coarse search ranks proposals
and keeps the top K (each ranking is kept in ``search.json``). A composite score's top K and each
other score's first ``--score_top_k`` join the merge (without a composite: each score's top K). The
merged proposals of all P are evaluated once each in one prefix-cached pass, and the lowest dev
metric wins (ties: the proposal that comes first when the rankings are interleaved rank by
rank). The search's cost is the dump, every score, every coarse search and the fine pass, each
counted once; the fine pass is shared out among the P values in proportion to the compute of
their candidates, and the consensus's reference sets (built once for all P) count in the coarse
search of the P that first needs them.

The proposals of ``--fine_rules`` (default: drop_top, the top P layers) join the merge, one
evaluation each: a model trained for pruning on demand (intermediate CTC, stochastic depth) is
trained to lose its top layers, and the scores need not rank that proposal first.

Why the consensus alone carries the fine search by default: across the models of
docs/SEARCH_QUALITY.md its top 10 held a proposal within 1% of the oracle wherever the four
scores' top 10s merged did, with a third of the evaluations.

Where the fine search shows the coarse ranking wrong (``--refine``, default ``auto``: the
Spearman between the composite score's top K and their dev metric 0 or above), a one-swap local
search continues from its best proposal (:mod:`comflp.prune.searches.refine`); its evaluations
join the search's rows and its seconds the search's cost.

Stage 7 gets the pipeline's choice (``comflp``) and, per score, its coarse top-1
(``comflp_<score>_coarse``) and the best of its own top K (``comflp_<score>_fine``, read from the
same evaluations: the same dev metric a separate fine search of that score would give), each
with the cost of what it used.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from pathlib import Path

from comflp.errors import InputError
from comflp.expdir import DUMP_INFO, SCORE_SETTINGS
from comflp.prune.method_list import Method
from comflp.prune.metric_search import SearchResult, best_row, fine_search
from comflp.prune.rules import rule_proposals
from comflp.prune.scores.base import SCORES, CompositeScore, ProposalScore, read_score_file
from comflp.prune.search import Proposal, ProposalScorer, coarse_search
from comflp.prune.searches.base import SEARCHES, ModelRef, Search, SearchContext
from comflp.prune.searches.refine import climb, ranking_disagrees, should_refine


def load_scores(ctx: SearchContext) -> dict[str, tuple[ProposalScore, float]]:
    """Each score and the seconds stage 5 took to build it (``--matrix``: that file alone),
    checked against the stack's depth."""
    s = ctx.settings
    if s.matrix is not None:
        loaded = {s.matrix.stem: (_read(read_score_file, s.matrix), 0.0)}
    else:
        loaded = {}
        for name in s.scores:
            directory = ctx.exp.score(name)
            path = directory / SCORES[name].file_name
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path}: not found (run stage 5 with {name} among --scores)"
                )
            seconds = json.loads((directory / SCORE_SETTINGS).read_text())["seconds"]
            loaded[name] = (_read(SCORES[name].read, path), seconds)
    depth = ctx.stack.num_layers
    for name, (score, _) in loaded.items():
        if score.num_layers != depth:
            raise InputError(
                f"{name}: scores of a {score.num_layers}-layer stack, but the model's "
                f"{ctx.stack.name} has {depth} layers (a matrix: expected {depth + 1} x {depth + 1})"
            )
    return loaded


def _read(reader, path: Path) -> ProposalScore:
    try:
        return reader(path)
    except ValueError as e:
        raise InputError(str(e)) from None


def merge(
    rankings: dict[str, list[Proposal]],
    score_top_k: int,
    composites: Collection[str] = (),
    fixed: Collection[tuple[int, ...]] = (),
) -> list[tuple[int, ...]]:
    """The distinct proposals the fine search evaluates, interleaved rank by rank: the
    composite scores' whole rankings and each other score's first ``score_top_k``, or, without
    a composite among ``rankings``, every ranking whole; then the ``fixed`` rules' proposals."""
    if any(n in composites for n in rankings):
        rankings = {n: r if n in composites else r[:score_top_k] for n, r in rankings.items()}
    depth = max(len(r) for r in rankings.values())
    ordered = [r[i].layers for i in range(depth) for r in rankings.values() if i < len(r)]
    return list(dict.fromkeys([*ordered, *fixed]))


def _annotate(
    row: dict,
    layers: tuple[int, ...],
    rankings: dict[str, list[Proposal]],
    rules: dict[str, tuple[int, ...]],
) -> dict:
    ranks = {
        name: {"rank": i + 1, "score": p.score}
        for name, ranking in rankings.items()
        for i, p in enumerate(ranking)
        if p.layers == layers
    }
    return {**row, "proposed_by": ranks, "rules": [n for n, x in rules.items() if x == layers]}


@SEARCHES.register("comflp")
class CoMFLP(Search):
    name = "comflp"

    def scorers(
        self, ctx: SearchContext, scores: dict[str, tuple[ProposalScore, float]], max_prune: int
    ) -> dict[str, ProposalScorer]:
        """What ranks proposals: each score, a composite one bound to its members' loaded scores."""
        loaded = {name: score for name, (score, _) in scores.items()}
        out = {}
        for name, score in loaded.items():
            if isinstance(score, CompositeScore):
                try:
                    score = score.bind(loaded, max_prune)
                except ValueError as e:
                    raise InputError(f"--scores {' '.join(loaded)}: {e}") from None
            out[name] = score.scorer(ctx.settings.coarse_aggregation)
        return out

    def coarse(
        self, ctx: SearchContext, scorers: dict[str, ProposalScorer], p: int
    ) -> tuple[dict[str, list[Proposal]], dict[str, float]]:
        """Every scorer's top K for P, and the seconds of each coarse search."""
        s = ctx.settings
        rankings, seconds = {}, {}
        for name, scorer in scorers.items():
            start = time.perf_counter()
            rankings[name] = coarse_search(
                scorer, p, s.search_mode, s.beam_size, s.top_k, s.max_exhaustive
            )
            seconds[name] = time.perf_counter() - start
        return rankings, seconds

    def run(self, ctx: SearchContext, prunes: list[int]) -> dict[int, SearchResult]:
        s = ctx.settings
        scores = load_scores(ctx)
        dump_seconds = json.loads((ctx.exp.dump / DUMP_INFO).read_text()).get("seconds", 0.0)
        scorers = self.scorers(ctx, scores, max(prunes))
        coarse = {p: self.coarse(ctx, scorers, p) for p in prunes}
        composites = _composites(scores)
        depth, stack = ctx.stack.num_layers, ctx.stack.name
        rules = {p: rule_proposals(s.fine_rules, stack, depth, p) for p in prunes}
        merged = {
            p: merge(coarse[p][0], s.score_top_k, composites, rules[p].values()) for p in prunes
        }
        rows, wall = fine_search(
            ctx.stack,
            ctx.batches,
            [c for p in prunes for c in merged[p]],
            s.fine_metric,
            s.prefix_cache,
        )
        by_layers = {tuple(r["layers"]): r for r in rows}
        compute = sum(r["seconds"] for r in rows) or 1.0
        judged = next(iter(composites), next(iter(scores)))
        results = {}
        for p in prunes:
            rankings, coarse_seconds = coarse[p]
            p_rows = [_annotate(by_layers[c], c, rankings, rules[p]) for c in merged[p]]
            fine_seconds = wall * sum(r["seconds"] for r in p_rows) / compute
            refined = self.refine(ctx, p_rows, judged)
            parts = {
                "dump_seconds": dump_seconds,
                "score_seconds": {n: t for n, (_, t) in scores.items()},
                "coarse_seconds": coarse_seconds,
                "fine_seconds": fine_seconds,
                "refine": refined,
            }
            total = dump_seconds + sum(t for _, t in scores.values())
            total += sum(coarse_seconds.values()) + fine_seconds + refined["seconds"]
            results[p] = SearchResult(
                self.name,
                p,
                s.fine_metric,
                p_rows,
                best_row(p_rows),
                total,
                {**parts, **_settings(ctx, scores), "rankings": _rankings(rankings)},
            )
        return results

    def refine(self, ctx: SearchContext, rows: list[dict], judged: str) -> dict:
        """The fallback of ``--refine`` (:mod:`comflp.prune.searches.refine`): judge the
        ranking of ``judged`` on its evaluated proposals and, where it fails, climb from the
        best row; the climb's rows are appended to ``rows``."""
        s = ctx.settings
        own = sorted(
            (r for r in rows if judged in r["proposed_by"]),
            key=lambda r: r["proposed_by"][judged]["rank"],
        )
        agreement = ranking_disagrees(
            [r["proposed_by"][judged]["score"] for r in own], [r["metric"] for r in own]
        )
        out = {"mode": s.refine, "judged": judged, "spearman": agreement, "seconds": 0.0}
        if not should_refine(s.refine, agreement):
            return {**out, "climbed": False}
        start = time.perf_counter()
        first = len(rows)

        def evaluate(candidates: list[tuple[int, ...]]) -> dict[tuple[int, ...], float]:
            new, _ = fine_search(ctx.stack, ctx.batches, candidates, s.fine_metric, s.prefix_cache)
            round_no = 1 + max((r.get("refine_round", 0) for r in rows), default=0)
            rows.extend({**r, "proposed_by": {}, "refine_round": round_no} for r in new)
            return {tuple(r["layers"]): r["metric"] for r in new}

        best = rows[best_row(rows)]
        seen = {tuple(r["layers"]) for r in rows}
        layers, metric, rounds = climb(
            tuple(best["layers"]), best["metric"], ctx.stack.num_layers, evaluate, seen
        )
        return {
            **out,
            "climbed": True,
            "rounds": rounds,
            "evaluations": len(rows) - first,
            "start_layers": best["layers"],
            "layers": list(layers),
            "seconds": time.perf_counter() - start,
        }

    def methods(self, search: dict, model: ModelRef) -> list[Method]:
        p, metric = search["num_prune"], search["metric"]
        rows = [
            model.method(
                self.name,
                p,
                search["best_layers"],
                search_seconds=search["seconds"],
                evaluations=search["evaluations"],
                note=f"best of {search['evaluations']} proposals of "
                f"{', '.join(search['scores'])} by dev {metric}{_climb_note(search)}",
            )
        ]
        for name in search["rankings"]:
            rows += _score_methods(search, name, model)
        return rows


def _climb_note(search: dict) -> str:
    """What the local search added (nothing for a search.json written before it existed)."""
    refined = search.get("refine", {})
    if not refined.get("climbed"):
        return ""
    return f" ({refined['evaluations']} of them by the local search, {refined['rounds']} rounds)"


def _composites(scores: dict[str, tuple[ProposalScore, float]]) -> dict[str, list[str]]:
    """Each composite score's members."""
    return {n: list(s.members) for n, (s, _) in scores.items() if isinstance(s, CompositeScore)}


def _settings(ctx: SearchContext, scores: dict) -> dict:
    s = ctx.settings
    composites = _composites(scores)
    return {
        "scores": list(scores),
        "composites": composites,
        "mode": s.search_mode,
        "aggregation": s.coarse_aggregation,
        "beam_size": s.beam_size,
        "top_k": s.top_k,
        "score_top_k": s.score_top_k if composites else s.top_k,
        "fine_rules": list(s.fine_rules),
    }


def _rankings(rankings: dict[str, list[Proposal]]) -> dict[str, list[dict]]:
    return {name: [p.to_dict() for p in ranking] for name, ranking in rankings.items()}


def _score_methods(search: dict, name: str, model: ModelRef) -> list[Method]:
    """One score's coarse top-1 and the best of its proposals the merged pass evaluated (a
    separate fine search of that score over the same proposals would give the same)."""
    p = search["num_prune"]
    ranking = search["rankings"][name]
    built = search["score_seconds"]
    members = search.get("composites", {}).get(name, [])
    score_seconds = built.get(name, 0.0) + sum(built[m] for m in members)
    base = search["dump_seconds"] + score_seconds + search["coarse_seconds"][name]
    rows = [
        model.method(
            f"comflp_{name}_coarse",
            p,
            ranking[0]["layers"],
            search_seconds=base,
            evaluations=0,
            note="top coarse proposal",
        )
    ]
    own = [r for r in search["candidates"] if name in r["proposed_by"]]
    if not own:
        return rows
    best = min(own, key=lambda r: (r["metric"], r["proposed_by"][name]["rank"]))
    share = sum(r["seconds"] for r in own) / max(
        sum(r["seconds"] for r in search["candidates"]), 1e-12
    )
    rows.append(
        model.method(
            f"comflp_{name}_fine",
            p,
            best["layers"],
            search_seconds=base + share * search["fine_seconds"],
            evaluations=len(own),
            note=f"best of its {len(own)} evaluated by dev {search['metric']}",
        )
    )
    return rows

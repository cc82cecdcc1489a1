"""Stage 6's searches on a stack whose pruned models have known CERs: each picks the lowest
metric (ties: the first evaluated), CoMFLP merges the scores' top Ks and counts every cost once."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from comflp.errors import InputError
from comflp.expdir import DUMP_INFO, SCORE_SETTINGS, ExpDir
from comflp.prune.evaluator import SubsetResult
from comflp.prune.metric_search import exhaustive_metric_search, greedy_layer_pruning
from comflp.prune.rules import rule_proposals
from comflp.prune.scores import consensus as consensus_module
from comflp.prune.scores.consensus import ConsensusScore, ConsensusScorer
from comflp.prune.scores.matrix import MatrixScore
from comflp.prune.search import BlockScorer, Proposal, coarse_search
from comflp.prune.searches import SEARCHES, ModelRef, SearchContext, SearchSettings
from comflp.prune.searches.comflp import merge
from comflp.prune.searches.refine import (
    climb,
    one_swap_neighbours,
    ranking_disagrees,
    should_refine,
)


class KnownStack:
    """A 6-layer stack whose pruned model's CER is a given function of the pruned layers; it
    records every subset it is asked to evaluate."""

    name = "encoder"
    num_layers = 6

    def __init__(self, cer):
        self.cer = cer
        self.evaluated: list[tuple[int, ...]] = []
        self.model = None

    def evaluate(self, batches, subsets, prefix_cache=True, progress=None, metric="cer"):
        self.evaluated += list(subsets)
        out = []
        for kept in subsets:
            pruned = tuple(k for k in range(1, 7) if k not in kept)
            out.append(SubsetResult(tuple(kept), self.cer(pruned), 0.0, 1.0, 0.01, 4))
        return out


def additive_cer(pruned: tuple[int, ...]) -> float:
    """Each pruned layer costs its own amount: the oracle for P is the P cheapest layers."""
    cost = {1: 9.0, 2: 1.0, 3: 4.0, 4: 2.0, 5: 7.0, 6: 3.0}
    return 10.0 + sum(cost[k] for k in pruned)


def interacting_cer(pruned: tuple[int, ...]) -> float:
    """Pruning 1 and 6 together is the best pair, but layer 3 is the best one to prune first,
    so greedy steps never meet the pair: the oracle finds it."""
    if set(pruned) == {1, 6}:
        return 5.0
    return 20.0 + sum(abs(k - 3) for k in pruned) / 10


def test_glp_removes_the_cheapest_layer_at_each_step():
    stack = KnownStack(additive_cer)
    results = greedy_layer_pruning(stack, [], [1, 2, 3])
    assert results[1].best_layers == (2,)
    assert results[2].best_layers == (2, 4)
    assert results[3].best_layers == (2, 4, 6)
    assert results[3].best_metric == pytest.approx(16.0)
    assert [len(r.candidates) for r in results.values()] == [6, 6 + 5, 6 + 5 + 4]
    assert [step["removed"] for step in results[3].extra["path"]] == [2, 4, 6]
    assert len(stack.evaluated) == 15  # the path to P = 3 serves P = 1 and 2


def test_oracle_finds_what_greedy_misses_and_keeps_the_first_on_a_tie():
    stack = KnownStack(interacting_cer)
    greedy = greedy_layer_pruning(stack, [], [2])[2]
    assert 3 in greedy.best_layers and (1, 6) not in [tuple(r["layers"]) for r in greedy.candidates]
    oracle = exhaustive_metric_search(stack, [], 2)
    assert oracle.best_layers == (1, 6) and oracle.best_metric == 5.0
    assert len(oracle.candidates) == 15
    tie = exhaustive_metric_search(KnownStack(lambda pruned: 7.0), [], 2)
    assert tie.best_layers == (1, 2)  # all equal: the first of C(6, 2) in lexicographic order
    with pytest.raises(ValueError, match=r"C\(6, 3\) = 20 evaluations, more than max"):
        exhaustive_metric_search(stack, [], 3, max_evaluations=19)


def test_merge_interleaves_the_rankings_and_drops_repeats():
    a = [Proposal((1, 2), 0.9), Proposal((3, 4), 0.8), Proposal((5, 6), 0.7)]
    b = [Proposal((3, 4), 0.5), Proposal((1, 6), 0.4)]
    assert merge({"a": a, "b": b}, score_top_k=1) == [(1, 2), (3, 4), (1, 6), (5, 6)]
    # with a composite score (the consensus): its whole ranking, each score's first score_top_k
    c = [Proposal((5, 6), 1.0), Proposal((2, 3), 0.9)]
    with_c = {"a": a, "b": b, "consensus": c}
    assert merge(with_c, 1, {"consensus"}) == [(1, 2), (3, 4), (5, 6), (2, 3)]
    assert merge(with_c, 0, {"consensus"}) == [(5, 6), (2, 3)]
    assert merge(with_c, 1) == [(1, 2), (3, 4), (5, 6), (1, 6), (2, 3)]  # a name is not enough
    # the fixed rules' proposals come last, once
    assert merge(with_c, 0, {"consensus"}, [(4, 5), (5, 6)]) == [(5, 6), (2, 3), (4, 5)]


def test_rule_proposals_fit_the_stack():
    assert rule_proposals(["drop_top"], "encoder", 12, 6) == {"drop_top": (7, 8, 9, 10, 11, 12)}
    assert rule_proposals([], "encoder", 12, 6) == {}
    assert rule_proposals(["drop_top", "distil_whisper"], "decoder", 8, 4) == {
        "drop_top": (5, 6, 7, 8),
        "distil_whisper": (2, 4, 6, 7),
    }
    with pytest.raises(InputError, match="--rules distil_whisper: a rule for the decoder stack"):
        rule_proposals(["distil_whisper"], "encoder", 12, 6)


def test_comflp_evaluates_the_top_p_proposal_beside_the_scores(tmp_path):
    # the scores rank by the additive cost; the model was trained to lose its top layers
    # (pruning 5 and 6 costs 0), which the scores' top 2 do not hold
    matrices = {"dc": _additive_matrix(), "cka": _additive_matrix() * 2}
    exp = _experiment(tmp_path, matrices, consensus=True)

    def on_demand(pruned):
        return 0.0 if pruned == (5, 6) else additive_cer(pruned)

    runs = {}
    for rules in ([], ["drop_top"]):
        settings = SearchSettings(
            exp_dir=exp.root, scores=["dc", "cka", "consensus"], top_k=2, fine_rules=rules
        )
        context = SearchContext(settings, KnownStack(on_demand), [], exp)
        (runs[len(rules)],) = SEARCHES["comflp"]().run(context, [2]).values()
    without, default = runs[0], runs[1]
    assert SearchSettings().fine_rules == ["drop_top"]
    assert (5, 6) not in [tuple(r["layers"]) for r in without.candidates]
    assert default.best_layers == (5, 6) and default.best_metric == 0.0
    assert len(default.candidates) == len(without.candidates) + 1
    assert default.candidates[-1]["rules"] == ["drop_top"]
    assert default.candidates[-1]["proposed_by"] == {}
    assert default.extra["fine_rules"] == ["drop_top"]
    # the check judges the consensus's own proposals only: the rule's row does not move it
    assert default.extra["refine"]["spearman"] == without.extra["refine"]["spearman"]


def _additive_matrix() -> np.ndarray:
    """Block scores of 6 layers that rank pruned pairs by additive_cer's cost (cheaper: higher)."""
    cost = {1: 9.0, 2: 1.0, 3: 4.0, 4: 2.0, 5: 7.0, 6: 3.0}
    m = np.zeros((7, 7))
    for k, c in cost.items():
        m[k - 1, k] = -c
    return m


def _experiment(tmp_path: Path, matrices: dict[str, np.ndarray], consensus: bool = False) -> ExpDir:
    """An experiment with a dump record and stage-5 scores written as stage 5 writes them
    (``consensus``: their consensus too, composed in 0.5 s)."""
    exp = ExpDir(tmp_path / "exp")
    exp.dump.mkdir(parents=True)
    (exp.dump / DUMP_INFO).write_text(json.dumps({"seconds": 4.0}))
    for i, (name, m) in enumerate(matrices.items()):
        exp.score(name).mkdir(parents=True)
        MatrixScore(m).write(exp.score(name) / "matrix.npy")
        (exp.score(name) / SCORE_SETTINGS).write_text(json.dumps({"seconds": 1.0 + i}))
    if consensus:
        depth = next(iter(matrices.values())).shape[0] - 1
        exp.score("consensus").mkdir(parents=True)
        ConsensusScore(list(matrices), depth).write(exp.score("consensus") / "members.json")
        (exp.score("consensus") / SCORE_SETTINGS).write_text(json.dumps({"seconds": 0.5}))
    return exp


def test_comflp_merges_the_scores_top_k_and_counts_each_cost_once(tmp_path):
    rng = np.random.default_rng(3)
    matrices = {"dc": rng.uniform(size=(7, 7)), "cka": rng.uniform(size=(7, 7))}
    exp = _experiment(tmp_path, matrices)
    stack = KnownStack(additive_cer)
    settings = SearchSettings(
        exp_dir=exp.root, scores=["dc", "cka"], top_k=4, refine="never", fine_rules=[]
    )
    search = SEARCHES["comflp"]()
    (result,) = search.run(SearchContext(settings, stack, [], exp), [2]).values()
    tops = {n: [p.layers for p in _coarse(m, 2, 4)] for n, m in matrices.items()}
    interleaved = [layers for i in range(4) for layers in (tops["dc"][i], tops["cka"][i])]
    distinct = list(dict.fromkeys(interleaved))
    assert [tuple(r["layers"]) for r in result.candidates] == distinct
    kept = [tuple(k for k in range(1, 7) if k not in d) for d in distinct]
    assert stack.evaluated == kept  # each distinct proposal once, in one pass
    cers = [additive_cer(d) for d in distinct]
    assert result.best_layers == distinct[int(np.argmin(cers))]
    extra = result.extra
    parts = extra["dump_seconds"] + sum(extra["score_seconds"].values())
    parts += sum(extra["coarse_seconds"].values()) + extra["fine_seconds"]
    assert extra["dump_seconds"] == 4.0 and extra["score_seconds"] == {"dc": 1.0, "cka": 2.0}
    assert result.seconds == pytest.approx(parts, rel=1e-12)
    # stage 7's rows: the pipeline, and per score its top-1 and the best of its own top K
    saved = {**result.to_dict(), "stack": "encoder"}
    rows = {m.name: m for m in search.methods(saved, ModelRef("native", "exp"))}
    assert rows["comflp"].pruned == list(result.best_layers)
    assert rows["comflp"].evaluations == len(distinct)
    for name in ("dc", "cka"):
        assert rows[f"comflp_{name}_coarse"].pruned == list(tops[name][0])
        own = min(tops[name], key=additive_cer)
        assert rows[f"comflp_{name}_fine"].pruned == list(own)
        assert rows[f"comflp_{name}_fine"].evaluations == 4
        base = 4.0 + extra["score_seconds"][name] + extra["coarse_seconds"][name]
        assert rows[f"comflp_{name}_coarse"].search_seconds == pytest.approx(base)
        assert base < rows[f"comflp_{name}_fine"].search_seconds < rows["comflp"].search_seconds


def test_comflp_adds_the_consensus_of_its_scores(tmp_path):
    rng = np.random.default_rng(4)
    matrices = {"dc": rng.uniform(size=(7, 7)), "cka": rng.uniform(size=(7, 7))}
    exp = _experiment(tmp_path, matrices, consensus=True)
    scores = ["dc", "cka", "consensus"]
    settings = SearchSettings(
        exp_dir=exp.root, scores=scores, top_k=3, score_top_k=1, refine="never", fine_rules=[]
    )
    context = SearchContext(settings, KnownStack(additive_cer), [], exp)
    search = SEARCHES["comflp"]()
    (result,) = search.run(context, [2]).values()
    consensus = ConsensusScorer([BlockScorer(m) for m in matrices.values()])
    want = [p.layers for p in coarse_search(consensus, 2, top_k=3)]
    assert [tuple(x["layers"]) for x in result.extra["rankings"]["consensus"]] == want
    # the fine search: the consensus's top 3 and each score's top 1, nothing else
    firsts = {_coarse(m, 2, 1)[0].layers for m in matrices.values()}
    assert {tuple(r["layers"]) for r in result.candidates} == set(want) | firsts
    assert result.extra["score_top_k"] == 1
    saved = {**result.to_dict(), "stack": "encoder"}
    rows = {m.name: m for m in search.methods(saved, ModelRef("native", "exp"))}
    assert rows["comflp"].evaluations == len(set(want) | firsts)
    for name, m in matrices.items():  # a score's fine row: the best of its evaluated proposals
        evaluated = [c for c in _coarse(m, 2, 3) if c.layers in set(want) | firsts]
        best = min(evaluated, key=lambda c: additive_cer(c.layers)).layers
        assert rows[f"comflp_{name}_fine"].pruned == list(best)
        assert rows[f"comflp_{name}_fine"].evaluations == len(evaluated)
    # the consensus's coarse row costs its members' scores, its own and its coarse search
    extra = result.extra
    assert extra["composites"] == {"consensus": ["dc", "cka"]}
    cost = 4.0 + 1.0 + 2.0 + 0.5 + extra["coarse_seconds"]["consensus"]
    assert rows["comflp_consensus_coarse"].search_seconds == pytest.approx(cost)
    # every pair of 6 layers is the reference set: each score standardised over all 15
    pairs = np.array(list(combinations(range(1, 7), 2)))
    z = [
        (b.scores(pairs) - b.scores(pairs).mean()) / b.scores(pairs).std()
        for b in consensus.scorers
    ]
    np.testing.assert_allclose(consensus.scores(pairs), np.mean(z, axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="2 or more scores of one depth"):
        ConsensusScorer([BlockScorer(np.eye(5)), BlockScorer(np.eye(6))])


def test_comflp_climbs_from_its_fine_search_where_its_ranking_fails(tmp_path):
    # the consensus of two scores that rank the layers backwards: its top 3 measure worse the
    # higher it scores them, so --refine auto climbs, one swap at a time, to the oracle
    cost = {1: 9.0, 2: 1.0, 3: 4.0, 4: 2.0, 5: 7.0, 6: 3.0}
    backwards = np.zeros((7, 7))
    for k, c in cost.items():  # the block (k-1, k) skipping layer k: higher where it costs more
        backwards[k - 1, k] = c
    matrices = {"dc": backwards, "cka": backwards * 2}
    exp = _experiment(tmp_path, matrices, consensus=True)
    scores = ["dc", "cka", "consensus"]
    runs = {}
    for mode in ("never", "auto"):
        stack = KnownStack(additive_cer)
        settings = SearchSettings(
            exp_dir=exp.root, scores=scores, top_k=3, refine=mode, fine_rules=[]
        )
        (runs[mode],) = (
            SEARCHES["comflp"]().run(SearchContext(settings, stack, [], exp), [2]).values()
        )
        assert len(stack.evaluated) == len(set(stack.evaluated))  # nothing evaluated twice
    fine, refined = runs["never"], runs["auto"]
    check = refined.extra["refine"]
    assert check["judged"] == "consensus" and check["spearman"] == pytest.approx(1.0)
    assert not fine.extra["refine"]["climbed"] and check["climbed"]
    assert fine.best_metric > 13.0  # the fine search alone: the dear layers' pairs
    assert refined.best_layers == (2, 4) and refined.best_metric == 13.0  # the oracle
    climbed = refined.candidates[len(fine.candidates) :]
    assert check["evaluations"] == len(climbed) > 0
    assert [r["refine_round"] for r in climbed] == sorted(r["refine_round"] for r in climbed)
    assert check["rounds"] == climbed[-1]["refine_round"]
    saved = {**refined.to_dict(), "stack": "encoder"}
    (row,) = [
        m
        for m in SEARCHES["comflp"]().methods(saved, ModelRef("native", "exp"))
        if m.name == "comflp"
    ]
    assert row.pruned == [2, 4] and row.evaluations == len(refined.candidates)
    assert f"({len(climbed)} of them by the local search, {check['rounds']} rounds)" in row.note
    for row in climbed:  # each one swap away from the best before its round
        assert additive_cer(tuple(row["layers"])) == row["metric"]
    extra = refined.extra
    parts = extra["dump_seconds"] + sum(extra["score_seconds"].values()) + check["seconds"]
    parts += sum(extra["coarse_seconds"].values()) + extra["fine_seconds"]
    assert check["seconds"] > 0 and refined.seconds == pytest.approx(parts, rel=1e-12)


def test_one_swap_climb_reaches_the_optimum_of_a_separable_metric():
    rng = np.random.default_rng(0)
    cost = dict(zip(range(1, 13), rng.permutation(12) + 1.0))
    metric = lambda layers: sum(cost[k] for k in layers)  # noqa: E731
    calls: list[tuple[int, ...]] = []

    def evaluate(candidates):
        calls.extend(candidates)
        return {c: metric(c) for c in candidates}

    start = (1, 2, 3, 4, 5, 6)
    layers, value, rounds = climb(start, metric(start), 12, evaluate, {start})
    assert layers == tuple(sorted(sorted(cost, key=cost.get)[:6])) and value == 21.0
    assert len(calls) == len(set(calls)) and start not in calls
    assert 1 <= rounds <= 7
    assert len(one_swap_neighbours(start, 12)) == 36
    assert all(len(set(n) ^ set(start)) == 2 for n in one_swap_neighbours(start, 12))
    # the check: too few or constant values judge nothing; auto climbs only above 0
    assert ranking_disagrees([1.0, 2.0], [3.0, 4.0]) is None
    assert ranking_disagrees([1.0, 1.0, 1.0], [3.0, 4.0, 5.0]) is None
    assert ranking_disagrees([3.0, 2.0, 1.0], [1.0, 2.0, 3.0]) == pytest.approx(-1.0)
    assert [should_refine("auto", v) for v in (None, -0.2, -0.01, 0.0, 0.1)] == [0, 0, 0, 1, 1]
    assert should_refine("always", None) and not should_refine("never", 1.0)
    with pytest.raises(ValueError, match="expected one of auto, never, always"):
        should_refine("sometimes", 0.5)


def test_consensus_standardises_large_sizes_over_nested_samples(monkeypatch):
    rng = np.random.default_rng(4)
    members = [BlockScorer(rng.random((9, 9))) for _ in range(2)]
    monkeypatch.setattr(consensus_module, "REFERENCE_PROPOSALS", 20)  # C(8, k) > 20 for 2 <= k <= 6
    consensus = ConsensusScorer(members, seed=3, max_size=4)
    chains = consensus_module.reference_chains(8, seed=3)
    assert chains.shape == (consensus_module.SAMPLED_PROPOSALS, 8)
    assert all(sorted(row) == list(range(1, 9)) for row in chains.tolist())
    combos = np.array(list(combinations(range(1, 9), 3)))
    ref = np.sort(chains[:, :3], axis=1)  # size 3: the first 3 layers of each ordering
    z = [(m.scores(combos) - m.scores(ref).mean()) / m.scores(ref).std() for m in members]
    np.testing.assert_allclose(consensus.scores(combos), np.mean(z, axis=0), rtol=1e-12)
    singles = np.arange(1, 9)[:, None]  # size 1: C(8, 1) = 8, every proposal
    z = [(m.scores(singles) - m.scores(singles).mean()) / m.scores(singles).std() for m in members]
    np.testing.assert_allclose(consensus.scores(singles), np.mean(z, axis=0), rtol=1e-12)
    # its extensions of a beam score as the extended sets do
    beam = np.array([[1, 5], [2, 8]])
    grid = consensus.extension_scores(beam)
    for entry, row in zip(beam.tolist(), grid, strict=True):
        for layer in sorted(set(range(1, 9)) - set(entry)):
            want = consensus.scores(np.array([sorted([*entry, layer])]))[0]
            assert row[layer - 1] == pytest.approx(want, abs=1e-12)


def _coarse(matrix, p, k):
    return coarse_search(matrix, p, top_k=k)


def test_comflp_refuses_scores_of_another_depth(tmp_path):
    exp = _experiment(tmp_path, {"dc": np.eye(5)})
    settings = SearchSettings(exp_dir=exp.root, scores=["dc"])
    with pytest.raises(
        ValueError, match="dc: scores of a 4-layer stack, but the model's encoder has 6"
    ):
        SEARCHES["comflp"]().run(SearchContext(settings, KnownStack(additive_cer), [], exp), [2])


def test_every_search_is_registered_with_a_module_of_its_own():
    assert SEARCHES.names() == ("comflp", "glp", "oracle")
    assert {SEARCHES[n].__module__ for n in SEARCHES} == {
        "comflp.prune.searches.comflp",
        "comflp.prune.searches.glp",
        "comflp.prune.searches.oracle",
    }

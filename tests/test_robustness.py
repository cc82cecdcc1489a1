"""The study across models (comflp/quality/robustness.py) on hand-made studies with known answers."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest
from scipy import stats

from comflp.quality.robustness import (
    across_models,
    calibration_shift,
    consensus,
    model_summary,
    variant_name,
)
from comflp.quality.stage import SummarySettings, summarize

PROPOSALS = [list(c) for c in combinations(range(1, 5), 2)]  # 6 proposals of 4 layers
DEFAULTS = ["residual_sum", "dc"]


def study(cer, scores: dict[str, list[float]], beams: dict[str, list[list[int]]]) -> dict:
    variants = [
        {"name": variant_name(s, 32), "scores": scores[s], "beam_layers": beams[s]} for s in scores
    ]
    return {
        "model_dir": "exp/m",
        "stack": "encoder",
        "reference": 32,
        "num_layers": 4,
        "results": [
            {
                "num_prune": 2,
                "exhaustive": True,
                "oracle_cer": min(cer),
                "proposals": [{"layers": p, "cer": c} for p, c in zip(PROPOSALS, cer)],
                "variants": variants,
                "glp": {"cer": 11.0, "seconds": 3.0, "layers": [1, 2]},
            }
        ],
    }


CER = [10.0, 12.0, 14.0, 11.0, 13.0, 15.0]
PERFECT = [-c for c in CER]  # ranks exactly as the CER
WORSE = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # unrelated to it


def test_one_model_scores_consensus_and_pipeline():
    s = study(
        CER,
        {"residual_sum": PERFECT, "dc": WORSE},
        {"residual_sum": [[2, 3], [1, 4]], "dc": [[3, 4], [2, 4]]},  # their beam top 2
    )
    s["results"][0]["variants"].append(
        {
            "name": "consensus/frames/N32",
            "score": "consensus",
            "options": {"of": ["residual_sum/frames/N32", "dc_b32/frames/N32"]},
            "scores": PERFECT,
            "beam_layers": [[1, 2]],
        }
    )
    m = model_summary(s, 2, DEFAULTS, top_k=2, score_top_k=1)
    assert m["scores"]["consensus of residual_sum+dc_b32/frames/N32"]["spearman"] == -1.0
    assert m["scores"]["residual_sum/frames/N32"]["spearman"] == pytest.approx(-1.0)
    rho = stats.spearmanr(WORSE, CER).statistic
    assert m["scores"]["dc_b32/frames/N32"]["spearman"] == pytest.approx(rho)
    want = stats.spearmanr(np.add(stats.zscore(PERFECT), stats.zscore(WORSE)), CER).statistic
    assert m["scores"]["consensus of residual_sum+dc (over the study's proposals)"][
        "spearman"
    ] == pytest.approx(want)
    # the consensus (z sums 0, -.59, -1.17, 1.17, .59, 0) ranks (2, 3) and (2, 4) first; with
    # each score's first beam proposal, (2, 3) and (3, 4): three evaluated, the best 11.0
    assert m["pipeline"] == {
        "cer": 11.0,
        "relative": pytest.approx(0.1),
        "evaluations": 3,
        "refine_spearman": None,  # two proposals judge nothing
    }
    # without a consensus, each beam's top 2: (2, 3), (1, 4), (3, 4), (2, 4)
    alone = model_summary(s, 2, DEFAULTS, top_k=2, use_consensus=False)
    assert alone["pipeline"]["cer"] == 11.0 and alone["pipeline"]["evaluations"] == 4
    # the consensus's top 4 alone adds (1, 2) and (3, 4) (sums 0): the oracle's (1, 2) at 10.0
    wider = model_summary(s, 2, DEFAULTS, top_k=4, score_top_k=0)
    assert wider["pipeline"]["cer"] == 10.0 and wider["pipeline"]["evaluations"] == 4
    assert consensus([np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0])]) == pytest.approx(
        [-1.2247, 0.6124, 0.6124], abs=1e-4
    )


def test_the_pipeline_climbs_where_the_consensus_ranks_backwards():
    backwards = list(CER)  # higher score, higher CER: the consensus's top 3 measure the worst
    s = study(
        CER,
        {"residual_sum": backwards, "dc": backwards},
        {"residual_sum": [[3, 4]], "dc": [[3, 4]]},
    )
    # top 3: (3, 4) 15, (1, 4) 14, (2, 4) 13; Spearman of their scores with their CERs +1
    never = model_summary(s, 2, DEFAULTS, top_k=3, score_top_k=0, refine="never")
    assert never["pipeline"]["cer"] == 13.0 and never["pipeline"]["evaluations"] == 3
    assert never["pipeline"]["refine_spearman"] == pytest.approx(1.0)
    # from (2, 4): round 1 adds (1, 2) 10 and (2, 3) 11 and moves to (1, 2); round 2 adds
    # (1, 3) 12, no better: the oracle in 3 + 3 evaluations
    auto = model_summary(s, 2, DEFAULTS, top_k=3, score_top_k=0, refine="auto")
    assert auto["pipeline"]["cer"] == 10.0 and auto["pipeline"]["relative"] == 0.0
    assert auto["pipeline"]["evaluations"] == 6
    right = study(CER, {"residual_sum": PERFECT, "dc": PERFECT}, _beams())
    kept = model_summary(right, 2, DEFAULTS, top_k=3, score_top_k=0, refine="auto")
    assert kept["pipeline"]["refine_spearman"] == pytest.approx(-1.0)
    assert kept["pipeline"]["evaluations"] == 4  # the ranking holds: no climb (3 + drop_top's)


def test_the_pipeline_evaluates_the_top_p_proposal_too():
    # (3, 4), the top 2 layers, is the oracle at 10.0 and the scores rank it last
    cer = [12.0, 13.0, 14.0, 11.5, 12.5, 10.0]
    wrong_about_top = [-12.0, -13.0, -14.0, -11.5, -12.5, -20.0]
    s = study(cer, {"residual_sum": wrong_about_top, "dc": wrong_about_top}, _beams())
    without = model_summary(s, 2, DEFAULTS, top_k=2, score_top_k=0, fine_rules=())
    assert without["pipeline"]["cer"] == 11.5 and without["pipeline"]["evaluations"] == 2
    default = model_summary(s, 2, DEFAULTS, top_k=2, score_top_k=0)  # drop_top joins
    assert default["pipeline"]["cer"] == 10.0 and default["pipeline"]["evaluations"] == 3
    assert default["pipeline"]["refine_spearman"] == without["pipeline"]["refine_spearman"]


def test_median_and_worst_across_models():
    a = model_summary(study(CER, {"residual_sum": PERFECT, "dc": PERFECT}, _beams()), 2, DEFAULTS)
    b = model_summary(study(CER, {"residual_sum": WORSE, "dc": PERFECT}, _beams()), 2, DEFAULTS)
    c = model_summary(study(CER, {"residual_sum": PERFECT, "dc": WORSE}, _beams()), 2, DEFAULTS)
    across = across_models({"a": a, "b": b, "c": c})
    rho = stats.spearmanr(WORSE, CER).statistic
    assert across["residual_sum/frames/N32"]["median_spearman"] == pytest.approx(-1.0)
    assert across["residual_sum/frames/N32"]["worst_spearman"] == pytest.approx(rho)
    assert across["dc_b32/frames/N32"]["worst_relative@10"] == pytest.approx(0.0)


def _beams():
    return {"residual_sum": [[1, 2]], "dc": [[1, 2]]}


def test_calibration_shift_compares_the_two_rankings():
    first = study(CER, {"residual_sum": PERFECT, "dc": WORSE}, _beams())
    second = study(CER, {"residual_sum": WORSE, "dc": WORSE}, _beams())
    shift = calibration_shift(first, second, 2, DEFAULTS)
    assert shift["dc"]["rank_agreement"] == pytest.approx(1.0)
    rho = stats.spearmanr(PERFECT, WORSE).statistic
    assert shift["residual_sum"]["rank_agreement"] == pytest.approx(rho)
    assert shift["residual_sum"]["spearman"] == pytest.approx(-1.0)


def test_summary_report_and_its_errors(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        s = study(CER, {"residual_sum": PERFECT, "dc": WORSE}, _beams())
        (tmp_path / label / "quality.json").write_text(json.dumps(s))
    out = tmp_path / "report.md"
    summarize(
        SummarySettings(
            studies=[f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"],
            calibration=[f"a={tmp_path / 'b'}"],
            num_prune=2,
            scores=[*DEFAULTS, "consensus"],
            top_k=1,
            output=out,
        )
    )
    text = out.read_text()
    assert "| residual_sum/frames/N32 | -1.000 | -1.000 | 0.0% | 0.0% |" in text
    # the consensus's top 1, (2, 3) at 11.0, both beams' first, (1, 2) at 10.0, and the top
    # 2 layers' (3, 4)
    assert "| a | 10.00 | 10.00 | 0.0% | 3 | - | 11.00 |" in text
    assert "merged, with the proposal of drop_top, one fine search" in text
    assert "the top 1 of the consensus of residual_sum, dc and the first 1" in text
    assert json.loads(out.with_suffix(".json").read_text())["num_prune"] == 2
    with pytest.raises(ValueError, match="--studies x: expected LABEL=DIR"):
        summarize(SummarySettings(studies=["x"], output=out))
    with pytest.raises(ValueError, match="has no P = 6"):
        summarize(SummarySettings(studies=[f"a={tmp_path / 'a'}"], output=out, scores=DEFAULTS))

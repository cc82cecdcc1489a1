"""Stages 7-8: the comparison table, fine-tuning, and their refusals of bad input."""

import json
import shutil

import pytest

from comflp.expdir import ExpDir
from comflp.prune.methods import MethodList, best_fine_measure
from comflp.prune.rules import drop_bottom, drop_top, every_other, random_layers

from .conftest import PYTHON, REPO, TINY_OPTIONS, run_cmd, run_sh


def test_fixed_rules():
    assert drop_top(12, 6) == (7, 8, 9, 10, 11, 12)
    assert drop_bottom(12, 2) == (1, 2)
    assert every_other(12, 6) == (2, 4, 6, 8, 10, 12)
    assert every_other(12, 4) == (3, 6, 9, 12)
    assert every_other(12, 3) == (4, 8, 12)
    assert random_layers(12, 6, 3) == random_layers(12, 6, 3)
    assert len(set(random_layers(12, 6, 3))) == 6
    with pytest.raises(ValueError, match="between 1 and 11"):
        drop_top(12, 12)


def test_best_fine_measure_averages_over_p_and_keeps_the_first_on_a_tie(tmp_path):
    exp = ExpDir(tmp_path)
    metrics = {"dc": (20.0, 30.0), "svcca": (22.0, 26.0), "cka": (21.0, 27.0)}
    for measure, values in metrics.items():
        for p, value in zip((2, 6), values, strict=True):
            exp.search(f"comflp_{measure}", p).mkdir(parents=True)
            exp.search_result(f"comflp_{measure}", p).write_text(json.dumps({"best_metric": value}))
    best, means = best_fine_measure(exp, ["dc", "svcca", "cka"], [2, 6])
    assert (best, means) == ("svcca", {"dc": 25.0, "svcca": 24.0, "cka": 24.0})
    assert best_fine_measure(exp, ["cka", "svcca"], [2, 6])[0] == "cka"
    assert best_fine_measure(exp, ["dc", "cka"], [2])[0] == "dc"
    with pytest.raises(FileNotFoundError, match="run stage 6 with --num_prune 4"):
        best_fine_measure(exp, ["dc"], [4])


def test_stages_7_and_8_write_the_table(compared):
    exp = compared["exp_dir"]
    results = (exp / "RESULTS.md").read_text()
    for method in (
        "unpruned",
        "comflp_dc_coarse",
        "comflp_dc_fine",
        "comflp_svcca_fine",
        "comflp_cka_fine",
        "drop_top",
        "interctc_on_demand",
        "drop_bottom",
        "every_other",
        "random",
        "glp",
        "oracle",
    ):
        assert f"| {method} |" in results, method
    # stage 8 fine-tunes the measure whose fine search did best (mean dev CER over P = 1, 2)
    means = {
        m: sum(
            json.loads((exp / f"search/comflp_{m}_prune{p}/search.json").read_text())["best_metric"]
            for p in (1, 2)
        )
        for m in ("dc", "svcca", "cka", "residual_sum")
    }
    best = min(means, key=means.get)
    assert f"| comflp_{best}_fine+finetune |" in results
    assert "3 seeds" in results and "run.sh --stage 7 --stop_stage 8" in results
    assert (exp / "compare/error_vs_prune.png").stat().st_size > 1000
    rows = json.loads((exp / "compare/results.json").read_text())["rows"]
    by = {(r["method"], r["num_prune"]): r for r in rows}
    assert by[("glp", 2)]["evaluations"] == 4 + 3
    assert by[("oracle", 2)]["evaluations"] == 6  # C(4, 2)
    assert by[("comflp_dc_fine", 1)]["evaluations"] == 4  # every 1-layer proposal of 4 layers
    assert by[("unpruned", 0)]["params"] > by[("drop_top", 2)]["params"]
    assert by[("drop_top", 2)]["errors"] == by[("interctc_on_demand", 2)]["errors"]
    # Two decoding parts per set, merged: every dev utterance scored once.
    unpruned = exp / "compare/decode/dev-clean/exp_baseline__prune_none"
    scores = json.loads((unpruned / "scores.json").read_text())
    assert scores["wer"]["snt"] == 8
    assert len(list(unpruned.glob("part*.json"))) == 2
    # The fine-tuned model starts from the fine-searched pruned model.
    ft = MethodList.load(exp / "compare/methods_finetuned.json").methods
    fine = json.loads((exp / f"search/comflp_{best}_prune2/search.json").read_text())
    assert [m.original_pruned for m in ft if m.num_prune == 2] == [fine["best_layers"]]


def test_stage_4_to_7_on_an_existing_experiment(compared, tmp_path):
    """Stages 4-7 need nothing but the trained experiment and the data directory."""
    work = tmp_path / "copy"
    shutil.copytree(compared["workdir"] / "data", work / "data")
    exp = work / "exp/baseline"
    exp.mkdir(parents=True)
    for name in ("config.yaml", "model.pt", "tokenizer.model", "tokens.txt", "cmvn.json"):
        shutil.copy(compared["exp_dir"] / name, exp / name)
    run_sh(
        work,
        "--stage",
        "4",
        "--stop_stage",
        "7",
        *TINY_OPTIONS,
        "--num_prune",
        "2",
        "--measures",
        "dc",
        "--dc_batch_size",
        "8",
        "--fine_num_utts",
        "8",
        "--random_seeds",
        "2",
        "--decode_nj",
        "1",
    )
    assert "| comflp_dc_fine | 2 |" in (exp / "RESULTS.md").read_text()


def test_decode_refuses_bad_input(compared, tmp_path, monkeypatch):
    monkeypatch.chdir(compared["workdir"])
    exp = compared["exp_dir"]
    base = [PYTHON, REPO / "bin/decode.py", "--output_dir", tmp_path / "out"]
    proc = run_cmd(
        [*base, "--model_dir", exp, "--cuts", "data/fbank/cuts_nope.jsonl.gz"], check=False
    )
    assert proc.returncode == 1 and "manifest not found" in proc.stderr
    # A pruned checkpoint whose config does not match its weights.
    broken = tmp_path / "broken"
    shutil.copytree(exp / "search/comflp_dc_prune2/pruned", broken)
    shutil.copy(exp / "model.pt", broken / "model.pt")
    proc = run_cmd(
        [*base, "--model_dir", broken, "--cuts", "data/fbank/cuts_dev-clean.jsonl.gz"], check=False
    )
    assert proc.returncode == 1 and "checkpoint does not fit the model config" in proc.stderr
    proc = run_cmd(
        [
            *base,
            "--model_dir",
            exp,
            "--prune_layers",
            "2 7",
            "--cuts",
            "data/fbank/cuts_dev-clean.jsonl.gz",
        ],
        check=False,
    )
    assert proc.returncode == 1 and "outside 1..4" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_num_prune_that_does_not_fit_the_model(compared, monkeypatch):
    monkeypatch.chdir(compared["workdir"])
    methods = compared["exp_dir"] / "compare/methods.json"
    before = methods.read_text()
    proc = run_cmd(
        [
            PYTHON,
            REPO / "bin/list_methods.py",
            "--exp_dir",
            compared["exp_dir"],
            "--num_prune",
            "2 4",
        ],
        check=False,
    )
    assert proc.returncode == 1 and "between 1 and 3 for the 4-layer model" in proc.stderr
    assert methods.read_text() == before

"""Stages 7-8: the comparison table, fine-tuning, and their refusals of bad input."""

import json
import shutil

import pytest

from comflp.errors import InputError
from comflp.prune.method_list import Method, MethodList
from comflp.prune.rules import RULES, drop_bottom, drop_top, every_other, random_layers, rules_for
from comflp.stages.compare import drop_stale_finetuned

from .conftest import PYTHON, REPO, TINY_OPTIONS, assert_drawn, run_cmd, run_sh


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


def test_rules_registry_fits_the_stack_and_the_model():
    every = ["drop_top", "interctc_on_demand", "drop_bottom", "every_other", "random"]
    assert list(RULES) == [*every, "distil_whisper"]  # Distil-Whisper's: decoders only
    assert rules_for(["all"], "encoder", has_interctc=True) == every
    # without intermediate CTC, pruning on demand is drop_top under another name: left out
    assert "interctc_on_demand" not in rules_for(["all"], "encoder", has_interctc=False)
    assert rules_for(["drop_top", "interctc_on_demand"], "encoder", False) == ["drop_top"]
    assert "interctc_on_demand" not in rules_for(["all"], "decoder", has_interctc=True)
    with pytest.raises(
        InputError, match="--rules interctc_on_demand: a rule for the encoder stack"
    ):
        rules_for(["interctc_on_demand"], "decoder", True)
    with pytest.raises(InputError, match="--rules: unknown rule drop_middle; choose from drop_top"):
        rules_for(["drop_middle"], "encoder", True)
    assert RULES["random"].choose(12, 6, 3) == random_layers(12, 6, 3)


def test_stages_7_and_8_write_the_table(compared):
    exp = compared["exp_dir"]
    results = (exp / "RESULTS.md").read_text()
    for method in (
        "unpruned",
        "comflp",
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
    # stage 8 fine-tunes the choice of the merged CoMFLP search
    assert "| comflp+finetune |" in results
    assert "3 seeds" in results and "run.sh --stage 7 --stop_stage 8" in results
    assert_drawn(exp / "compare/error_vs_prune.png")
    rows = json.loads((exp / "compare/results.json").read_text())["rows"]
    by = {(r["method"], r["num_prune"]): r for r in rows}
    assert by[("glp", 2)]["evaluations"] == 4 + 3
    assert by[("oracle", 2)]["evaluations"] == 6  # C(4, 2)
    assert by[("comflp_dc_fine", 1)]["evaluations"] == 4  # every 1-layer proposal of 4 layers
    assert by[("comflp", 1)]["evaluations"] == 4  # the four scores' top Ks: the same 4 proposals
    assert by[("unpruned", 0)]["params"] > by[("drop_top", 2)]["params"]
    assert by[("drop_top", 2)]["errors"] == by[("interctc_on_demand", 2)]["errors"]
    # the oracle's choice decodes the dev set (all 8 utterances, the fine search's) best of all
    for p in (1, 2):
        oracle = by[("oracle", p)]["errors"]["dev-clean"]["cer"]
        others = [r for r in rows if r["num_prune"] == p and "+finetune" not in r["method"]]
        assert all(oracle <= r["errors"]["dev-clean"]["cer"] + 1e-9 for r in others), p
        search = json.loads((exp / f"search/oracle_prune{p}/search.json").read_text())
        assert search["best_metric"] == pytest.approx(oracle)
    # Two decoding parts per set, merged: every dev utterance scored once.
    unpruned = exp / "compare/decode/dev-clean/exp_baseline__prune_none"
    scores = json.loads((unpruned / "scores.json").read_text())
    assert scores["wer"]["snt"] == 8
    assert len(list(unpruned.glob("part*.json"))) == 2
    # The fine-tuned model starts from the fine-searched pruned model.
    ft = MethodList.load(exp / "compare/methods_finetuned.json").methods
    fine = json.loads((exp / "search/comflp_prune2/search.json").read_text())
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
        "--scores",
        "dc",
        "--score_conf",
        "dc.batch_size=8",
        "--fine_num_utts",
        "8",
        "--random_seeds",
        "2",
        "--decode_nj",
        "1",
        "--search_methods",
        "comflp",
    )
    results = (exp / "RESULTS.md").read_text()
    assert "| comflp | 2 |" in results and "| comflp_dc_fine | 2 |" in results
    # the row decodes the search's choice, and its dev CER is what the fine search measured
    # on the same 8 dev utterances
    search = json.loads((exp / "search/comflp_prune2/search.json").read_text())
    rows = json.loads((exp / "compare/results.json").read_text())["rows"]
    comflp = next(r for r in rows if (r["method"], r["num_prune"]) == ("comflp", 2))
    assert comflp["pruned"] == " ".join(map(str, search["best_layers"]))
    assert comflp["errors"]["dev-clean"]["cer"] == pytest.approx(search["best_metric"])


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
    shutil.copytree(exp / "search/comflp_prune2/pruned", broken)
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
    # Stage 7's form: one name per set decoded, or one line and nothing written.
    decoded = sorted((exp / "compare/decode").rglob("part*.json"))
    stamps = [p.stat().st_mtime_ns for p in decoded]
    proc = run_cmd(
        [PYTHON, REPO / "bin/decode.py", "--exp_dir", exp, "--eval_sets", "dev-clean test-clean"]
        + ["--cuts", "data/fbank/cuts_dev-clean.jsonl.gz"],
        check=False,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith("--exp_dir needs one --eval_sets name per --cuts file (got 2 names for 1 files)")
    )
    assert [
        p.stat().st_mtime_ns for p in sorted((exp / "compare/decode").rglob("part*.json"))
    ] == stamps


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
    assert proc.returncode == 1 and "between 1 and 3 for the 4-layer encoder" in proc.stderr
    assert methods.read_text() == before


def test_stage_7_keeps_the_fine_tuned_rows_its_searches_still_choose(tmp_path):
    """A stage-7 run (even one whose decoding then fails) keeps stage 8's rows whose search
    still chooses the layers they were fine-tuned from, and drops the others."""
    searched = MethodList(
        [Method("comflp", 2, [3, 4], "exp"), Method("comflp", 3, [2, 3, 4], "exp")]
    )
    path = tmp_path / "methods_finetuned.json"
    drop_stale_finetuned(path, searched)  # no stage 8 yet: nothing written
    assert not path.exists()
    rows = [
        Method("comflp+finetune", 2, [], "ft2", original_pruned=[3, 4]),
        Method("comflp+finetune", 3, [], "ft3", original_pruned=[1, 2, 3]),
    ]
    MethodList(rows).save(path)
    drop_stale_finetuned(path, searched)
    assert [(m.name, m.num_prune) for m in MethodList.load(path).methods] == [
        ("comflp+finetune", 2)
    ]

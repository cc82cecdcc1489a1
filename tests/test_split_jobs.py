"""Stages 1, 4 and 7 split their work into parts (job arrays); merged, it equals one job's."""

import json
import shutil

import numpy as np

from comflp.asr.data import load_cuts
from comflp.prune.dump import load_layer_feats

from .conftest import PYTHON, REPO, TINY_OPTIONS, run_cmd, run_sh


def test_stage_1_in_parts_equals_one_job(pipeline, tmp_path):
    results = {}
    for nj in ("1", "3"):
        work = tmp_path / f"nj{nj}"
        (work / "data").mkdir(parents=True)
        for name in ("manifests", "builtin_corpus"):
            shutil.copytree(pipeline["workdir"] / "data" / name, work / "data" / name)
        run_sh(work, "--stage", "1", "--stop_stage", "1", *TINY_OPTIONS, "--nj", nj)
        cuts = {
            s: load_cuts(work / f"data/fbank/cuts_{s}.jsonl.gz")
            for s in ("train-clean-100", "dev-clean")
        }
        results[nj] = (work, cuts, json.loads((work / "data/fbank/cmvn.json").read_text()))
    (w1, one, cmvn1), (w3, three, cmvn3) = results["1"], results["3"]
    assert len(list((w3 / "data/fbank/parts").glob("cuts_dev-clean.*.jsonl.gz"))) == 3
    for subset in one:
        assert [c.id for c in one[subset]] == [c.id for c in three[subset]]
        for a, b in zip(one[subset], three[subset]):
            fa = a.with_features_path_prefix(str(w1)).load_features()
            fb = b.with_features_path_prefix(str(w3)).load_features()
            assert np.array_equal(fa, fb), a.id
    assert cmvn1["frames"] == cmvn3["frames"]
    assert np.allclose(cmvn1["mean"], cmvn3["mean"], rtol=0, atol=1e-9)
    assert np.allclose(cmvn1["std"], cmvn3["std"], rtol=0, atol=1e-9)


def test_stage_4_in_parts_equals_one_job(tiny_data, pipeline, tmp_path):
    dumps = {}
    for num_parts in (1, 2):
        exp = tmp_path / f"exp{num_parts}"  # stage outputs only: the model stays where it is
        for part in range(1, num_parts + 1):
            run_cmd(
                [
                    PYTHON,
                    REPO / "bin/dump_layers.py",
                    "--exp_dir",
                    exp,
                    "--model_dir",
                    pipeline["exp_dir"],
                    "--cuts",
                    tiny_data["train"],
                    "--calib_num_utts",
                    "20",
                    "--part",
                    str(part),
                    "--num_parts",
                    str(num_parts),
                    "--max_duration",
                    "15",
                ]
            )
        run_cmd(
            [PYTHON, REPO / "bin/merge_dump.py", "--exp_dir", exp, "--num_parts", str(num_parts)]
        )
        dumps[num_parts] = exp / "dump"
    assert not (tmp_path / "exp1/config.yaml").exists()
    info1, info2 = (json.loads((dumps[n] / "info.json").read_text()) for n in (1, 2))
    assert info1["utts"] == info2["utts"] and info2["num_parts"] == 2 and info2["num_utts"] == 20
    assert info1["num_rows"] == info2["num_rows"] > 20  # frames pooling: several rows per utterance
    for a, b in zip(load_layer_feats(dumps[1]), load_layer_feats(dumps[2])):
        assert a.shape == (info1["num_rows"], 32)
        assert np.allclose(a, b, atol=1e-5)


def test_stage_7_decoding_in_parts_equals_one_job(compared, tmp_path, monkeypatch):
    monkeypatch.chdir(compared["workdir"])
    merged = {}
    for num_parts in (1, 3):
        exp = tmp_path / f"exp{num_parts}"
        (exp / "compare").mkdir(parents=True)
        shutil.copy(compared["exp_dir"] / "compare/methods.json", exp / "compare")
        for part in range(1, num_parts + 1):
            run_cmd(
                [
                    PYTHON,
                    REPO / "bin/decode.py",
                    "--exp_dir",
                    exp,
                    "--eval_sets",
                    "dev-clean",
                    "--cuts",
                    "data/fbank/cuts_dev-clean.jsonl.gz",
                    "--part",
                    str(part),
                    "--num_parts",
                    str(num_parts),
                ]
            )
        out = exp / "compare/decode/dev-clean"
        merged[num_parts] = {
            key.name: [
                u for p in sorted(key.glob("part*.json")) for u in json.loads(p.read_text())["utts"]
            ]
            for key in out.iterdir()
        }
    assert merged[1].keys() == merged[3].keys() and len(merged[1]) > 3
    for key in merged[1]:
        assert sorted(merged[1][key], key=lambda u: u["id"]) == sorted(
            merged[3][key], key=lambda u: u["id"]
        )

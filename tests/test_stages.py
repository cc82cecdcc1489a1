"""Stages 0-3 of run.sh end to end on a tiny corpus, and their refusals of bad input."""

import json
import shutil

import pytest
from lhotse import CutSet

from comflp.adapters.native import NativeModel
from comflp.asr.data import load_cuts, load_eval_batches
from comflp.asr.features import load_cmvn
from comflp.asr.tokenizer import Tokenizer
from comflp.decoding import decode_set
from comflp.prune.evaluator import evaluate_model

from .conftest import PYTHON, REPO, independent_cer, run_cmd, run_sh


def test_stages_0_to_3(pipeline, tiny_data):
    w, exp = pipeline["workdir"], pipeline["exp_dir"]
    print("stage times (s):", {k: round(v, 1) for k, v in pipeline["times"].items()})
    # Stage 0: LibriSpeech layout read back by lhotse.
    flacs = list(tiny_data["corpus_dir"].glob("train-clean-100/*/*/*.flac"))
    assert len(flacs) == 48
    assert len(list(tiny_data["corpus_dir"].glob("dev-clean/*/*/*.trans.txt"))) >= 1
    for subset, n in (("train-clean-100", 48), ("dev-clean", 8), ("test-clean", 8)):
        cuts = CutSet.from_file(w / f"data/manifests/cuts_{subset}.jsonl.gz")
        assert len(cuts) == n
        assert all(c.sampling_rate == 16000 and c.supervisions[0].text for c in cuts)
    # Stage 1: features and CMVN.
    train_cuts = load_cuts(tiny_data["train"])
    assert all(c.has_features and c.num_features == 80 for c in train_cuts)
    mean, std = load_cmvn(tiny_data["cmvn"])
    assert mean.shape == (80,) and (std > 0).all()
    # Stage 2: tokenizer round-trips the transcripts.
    tok = Tokenizer(tiny_data["lang_dir"] / "tokenizer.model")
    text = train_cuts[0].supervisions[0].text
    assert tok.decode(tok.encode(text)) == text
    assert (tiny_data["lang_dir"] / "tokens.txt").read_text().splitlines()[0] == "<blk> 0"
    # Stage 3: checkpoints, averaged model, logs, curves, TensorBoard.
    for name in (
        "config.yaml",
        "model.pt",
        "epoch-1.pt",
        "epoch-2.pt",
        "history.json",
        "training_curves.png",
        "tokenizer.model",
        "cmvn.json",
        "log/train.log",
    ):
        assert (exp / name).is_file(), name
    assert any((exp / "tensorboard").iterdir())
    history = json.loads((exp / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    assert all(r["dev_loss"] > 0 for r in history)
    dev = load_eval_batches(NativeModel.load(exp), tiny_data["dev"], 30)
    for record in history:  # each epoch's dev CER is its checkpoint's, decoded and recounted
        epoch = NativeModel.load(exp, f"epoch-{record['epoch']}.pt")
        assert record["dev_cer"] == pytest.approx(independent_cer(decode_set(epoch, dev).utts))
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert "dev CER" in (exp / "log/train.log").read_text()
    # Later stages rebuild the model from the experiment directory alone.
    model = NativeModel.load(exp)
    test = load_eval_batches(model, tiny_data["test"], 30)
    result = evaluate_model(model, test)
    assert result.num_utts == 8 and result.loss > 0
    assert result.cer == pytest.approx(independent_cer(decode_set(model, test).utts))


def test_stage_0_does_not_redo_a_complete_corpus(pipeline):
    before = {
        p: p.stat().st_mtime_ns
        for p in (pipeline["workdir"] / "data/builtin_corpus").rglob("*.flac")
    }
    proc = run_sh(
        pipeline["workdir"],
        "--stage",
        "0",
        "--stop_stage",
        "0",
        "--num_train",
        "48",
        "--num_dev",
        "8",
        "--num_test",
        "8",
    )
    assert "nothing to do" in proc.stderr
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after


@pytest.mark.parametrize(
    "options, message",
    [
        (["--no_such_option", "1"], "unknown option --no_such_option"),
        (["--stage", "3", "--stop_stage", "1"], "smaller than --stage"),
        (["--stage"], "needs a value"),
        (["stray"], "unexpected argument"),
        (["--token_type", "word"], "--token_type must be bpe or char"),
        (["--PATH", "/x"], "unknown option --PATH"),
        (["--stack", "decoder encoder"], '--stack must be encoder, decoder or "encoder decoder"'),
        (
            ["--stack", "encoder decoder", "--num_prune", "2 4"],
            "prunes the decoder of one encoder-pruned model: --num_prune must be one number",
        ),
    ],
)
def test_run_sh_rejects_bad_options(tmp_path, options, message):
    proc = run_sh(tmp_path, *options, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "data").exists()


def test_run_sh_help_lists_options(tmp_path):
    proc = run_sh(tmp_path, "--help")
    assert "--stop_stage" in proc.stdout and "--train_config" in proc.stdout


def test_missing_espeak_is_reported(tmp_path, env_without):
    env = env_without({"espeak-ng"})
    proc = run_cmd(
        [PYTHON, REPO / "local/make_corpus.py", "--corpus_dir", tmp_path / "c"],
        env=env,
        check=False,
    )
    assert proc.returncode == 1
    assert "espeak-ng not found" in proc.stderr and "apt-get install espeak-ng" in proc.stderr
    assert not (tmp_path / "c").exists()
    # The set-up script refuses too when it may not install it (not root).
    env = env_without({"espeak-ng"}, fake_uid=1000)
    proc = run_cmd([REPO / "utils/setup.sh"], env=env, check=False)
    assert proc.returncode == 1
    assert "sudo apt-get install espeak-ng" in proc.stderr


def _copy_corpus(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".complete"))
    return dst


def test_bad_utterances_are_refused_with_their_names(tmp_path, tiny_data):
    corpus = _copy_corpus(tiny_data["corpus_dir"], tmp_path / "corpus")
    flacs = sorted(corpus.glob("dev-clean/*/*/*.flac"))
    flacs[0].write_bytes(b"")  # empty file
    flacs[1].write_bytes(b"not audio at all" * 100)  # corrupt file
    trans = sorted(corpus.glob("test-clean/*/*/*.trans.txt"))[0]
    first_id = trans.read_text().split()[0]
    trans.write_text(f"{first_id}\n" + "\n".join(trans.read_text().splitlines()[1:]) + "\n")
    out = tmp_path / "manifests"
    out.mkdir()
    (out / "cuts_dev-clean.jsonl.gz").write_bytes(b"earlier output")
    proc = run_cmd(
        [
            PYTHON,
            REPO / "bin/prepare_data.py",
            "--corpus_dir",
            corpus,
            "--output_dir",
            out,
            "--subsets",
            "train-clean-100 dev-clean test-clean",
        ],
        check=False,
    )
    assert proc.returncode == 1
    assert "3 problem(s)" in proc.stderr
    assert f"{flacs[0]}: audio file is empty" in proc.stderr
    assert f"{flacs[1]}: not readable as audio" in proc.stderr
    assert f"empty transcript for {first_id}" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["cuts_dev-clean.jsonl.gz"]
    assert (out / "cuts_dev-clean.jsonl.gz").read_bytes() == b"earlier output"


@pytest.mark.parametrize(
    "corpus_dir, message",
    [("missing", "corpus directory does not exist"), ("empty", "subset directory missing")],
)
def test_bad_corpus_directories(tmp_path, corpus_dir, message):
    (tmp_path / "empty").mkdir()
    proc = run_cmd(
        [
            PYTHON,
            REPO / "bin/prepare_data.py",
            "--corpus_dir",
            tmp_path / corpus_dir,
            "--output_dir",
            tmp_path / "out",
            "--subsets",
            "dev-clean",
        ],
        check=False,
    )
    assert proc.returncode == 1 and message in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.interctc_layers=[9]", "interctc_layers"),
        ("model.stochastic_depth_rate=1.0", "rates must be in [0, 1)"),
        ("model.no_such_key=1", "unknown key(s) no_such_key"),
    ],
)
def test_train_refuses_bad_config(tmp_path, tiny_data, override, message):
    proc = run_cmd(
        [
            PYTHON,
            REPO / "bin/train.py",
            "--train_config",
            REPO / "conf/train_tiny.yaml",
            "--exp_dir",
            tmp_path / "exp",
            "--train_cuts",
            tiny_data["train"],
            "--dev_cuts",
            tiny_data["dev"],
            "--lang_dir",
            tiny_data["lang_dir"],
            "--cmvn",
            tiny_data["cmvn"],
            "--set",
            override,
        ],
        check=False,
    )
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "exp").exists()

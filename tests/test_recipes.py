"""The LibriSpeech and AISHELL-1 recipes (egs/*/run.sh) end to end on tiny corpora in the real
corpora's layouts, speed perturbation, the download option, and stage 0's refusals of bad
corpus directories."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import yaml
from lhotse import CutSet

from comflp.asr.config import load_config
from comflp.corpus.prepare import (
    DEFAULT_DOWNLOAD_URL,
    CorpusError,
    download_corpus,
    prepare_aishell_cuts,
    prepare_librispeech_cuts,
)
from comflp.train.distil import load_distil_config

from .conftest import PYTHON, REPO, decoded_utts, independent_cer, run_cmd, run_sh
from .corpora import AISHELL_TRANSCRIPT, build_aishell, build_librispeech

TINY = ["--nj", "1"]  # no process pool
SEARCH = [
    "--scores", "dc", "--num_prune", "1", "--calib_num_utts", "16", "--score_conf", "dc.batch_size=8",
    "--fine_num_utts", "6", "--top_k", "2", "--random_seeds", "2", "--search_methods", "comflp",
    "--decode_nj", "1",
]  # fmt: skip
LIBRISPEECH_SIZES = {
    "train-clean-100": 10,
    "train-clean-360": 10,
    "train-other-500": 10,
    "dev-clean": 6,
    "test-clean": 6,
}
AISHELL_SIZES = {"train": 30, "dev": 6, "test": 6}


def recipe_dir(tmp: Path, name: str) -> Path:
    """A working directory for egs/<name>: its run.sh, conf/ and local/ linked in; data/ and exp/
    go here."""
    work = tmp / "recipes" / name
    work.mkdir(parents=True)
    for part in ("run.sh", "conf", "local"):
        if (REPO / "egs" / name / part).exists():
            (work / part).symlink_to(REPO / "egs" / name / part)
    return work


def tiny_train_config(tmp: Path) -> Path:
    """The tiny config with 10 s batches: 30 training utterances then make ~9 steps per epoch,
    enough for the loss to fall over two epochs (30 s batches leave 3, all in the warm-up)."""
    config = yaml.safe_load((REPO / "conf/train_tiny.yaml").read_text())
    config["train"]["max_duration"] = 10
    path = tmp / "train_tiny_recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_recipe(work: Path, *options: str, check: bool = True):
    return run_cmd([work / "run.sh", *options], cwd=work, check=check)


def prepare_data(corpus: str, corpus_dir: Path, subsets: str, out: Path, *extra: str):
    return run_cmd(
        [PYTHON, REPO / "bin/prepare_data.py", "--layout", corpus, "--corpus_dir", corpus_dir,
         "--subsets", subsets, "--output_dir", out, *extra],
        check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def librispeech(tmp_path_factory) -> dict:
    """The LibriSpeech recipe, stages 0-3 then 4-7, on train-960 made of three tiny parts."""
    tmp = tmp_path_factory.mktemp("librispeech")
    corpus = build_librispeech(tmp / "LibriSpeech", LIBRISPEECH_SIZES)
    work = recipe_dir(tmp, "librispeech")
    options = ["--corpus_dir", str(corpus), "--test_sets", "test-clean", "--nbpe", "48", *TINY,
               "--train_config", str(tiny_train_config(tmp))]  # fmt: skip
    train = run_recipe(work, "--stage", "0", "--stop_stage", "3", *options)
    search = run_recipe(work, "--stage", "4", "--stop_stage", "7", *options, *SEARCH)
    return {"work": work, "corpus": corpus, "log": train.stderr + search.stderr}


@pytest.fixture(scope="module")
def aishell(tmp_path_factory) -> dict:
    """The AISHELL-1 recipe, stages 0-3 then 4-7 (speed perturbation off to stay fast)."""
    tmp = tmp_path_factory.mktemp("aishell")
    corpus = build_aishell(tmp / "aishell", AISHELL_SIZES)
    work = recipe_dir(tmp, "aishell")
    options = ["--corpus_dir", str(corpus), "--speed_perturb", "false", *TINY,
               "--train_config", str(tiny_train_config(tmp))]  # fmt: skip
    train = run_recipe(work, "--stage", "0", "--stop_stage", "3", *options)
    search = run_recipe(work, "--stage", "4", "--stop_stage", "7", *options, *SEARCH)
    return {"work": work, "corpus": corpus, "log": train.stderr + search.stderr}


def assert_training_loss_falls(exp: Path) -> None:
    history = json.loads((exp / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]


@pytest.mark.e2e
def test_librispeech_recipe(librispeech):
    work = librispeech["work"]
    train = CutSet.from_file(work / "data/manifests/cuts_train-960.jsonl.gz")
    assert len(train) == 30  # the three training parts in one cut set
    speakers = {c.supervisions[0].speaker for c in train}
    assert len(speakers) == 6
    assert all(c.id == c.supervisions[0].id for c in train)
    for subset, n in (("dev-clean", 6), ("test-clean", 6)):
        assert len(CutSet.from_file(work / f"data/manifests/cuts_{subset}.jsonl.gz")) == n
    assert (work / "data/lang_bpe48/tokenizer.model").is_file()
    assert_training_loss_falls(work / "exp/baseline")
    fine = json.loads((work / "exp/baseline/search/comflp_prune1/search.json").read_text())
    assert fine["metric"] == "wer"  # the recipe's task metric
    results = (work / "exp/baseline/RESULTS.md").read_text()
    assert "| dev-clean WER |" in results and "| test-clean WER |" in results
    assert "| comflp_dc_fine | 1 |" in results


@pytest.mark.e2e
def test_aishell_recipe(aishell):
    work = aishell["work"]
    train = CutSet.from_file(work / "data/manifests/cuts_train.jsonl.gz")
    assert len(train) == 30  # the wav without a transcript line is skipped
    assert "skipping 1 .wav files without a transcript line" in aishell["log"]
    assert "ignoring 1 lines without a .wav file" in aishell["log"]
    first = sorted(train, key=lambda c: c.id)[0]
    assert first.id == "BAC009S0002W0121" and first.supervisions[0].speaker == "S0002"
    text = first.supervisions[0].text
    assert " " not in text and all("\u4e00" <= ch <= "\u9fff" for ch in text)
    units = {line.rsplit(" ", 1)[0] for line in (work / "data/lang_char/tokens.txt").open()}
    assert set("".join(c.supervisions[0].text for c in train)) <= units  # one unit per character
    assert_training_loss_falls(work / "exp/baseline")
    fine = json.loads((work / "exp/baseline/search/comflp_prune1/search.json").read_text())
    assert fine["metric"] == "cer"
    results = (work / "exp/baseline/RESULTS.md").read_text()
    assert "| dev CER |" in results and "| test CER |" in results
    assert "WER" not in results.split("## Model config")[0]  # no word error rate for Mandarin
    scores = json.loads((work / "exp/baseline/compare/results.json").read_text())
    unpruned = next(r for r in scores["rows"] if r["method"] == "unpruned")
    utts = decoded_utts(work / "exp/baseline/compare/decode/test/exp_baseline__prune_none")
    assert unpruned["errors"]["test"]["cer"] == pytest.approx(independent_cer(utts))


@pytest.mark.e2e
def test_speed_perturbation_of_the_training_set(aishell, tmp_path):
    """Stage 1 of the AISHELL-1 recipe with its default --speed_perturb true."""
    work = recipe_dir(tmp_path, "aishell")
    shutil.copytree(aishell["work"] / "data/manifests", work / "data/manifests")
    run_recipe(work, "--stage", "1", "--stop_stage", "1", "--nj", "1")
    original = {c.id: c for c in CutSet.from_file(work / "data/manifests/cuts_train.jsonl.gz")}
    perturbed = {c.id: c for c in CutSet.from_file(work / "data/fbank/cuts_train.jsonl.gz")}
    assert len(perturbed) == 3 * len(original)
    for utt_id, cut in original.items():
        for factor in (0.9, 1.1):
            copy = perturbed[f"{utt_id}_sp{factor}"]
            assert copy.duration == pytest.approx(cut.duration / factor, abs=0.01)
            assert copy.supervisions[0].text == cut.supervisions[0].text
            assert copy.has_features
    dev = CutSet.from_file(work / "data/fbank/cuts_dev.jsonl.gz")
    assert not any("_sp" in c.id for c in dev)


def test_recipe_help_shows_its_settings(tmp_path):
    proc = run_recipe(recipe_dir(tmp_path, "librispeech"), "--help")
    assert "--train_set train-960" in proc.stdout and "--nbpe 5000" in proc.stdout
    assert "--stop_stage" in proc.stdout  # the driver's own options follow
    assert not (tmp_path / "recipes/librispeech/data").exists()


def test_whisper_recipe_passes_its_settings_and_the_user_s_to_the_driver(tmp_path):
    work = recipe_dir(tmp_path, "whisper")
    proc = run_recipe(work, "--help")
    assert "--model_type ctranslate2\n" in proc.stdout and "--model_dir tiny.en\n" in proc.stdout
    assert "--stop_stage" in proc.stdout  # the driver's own options follow
    proc = run_recipe(work, "--stage", "4", "--stacks", "decoder", "--scores", "nope", check=False)
    assert proc.returncode == 1 and "--scores nope: unknown nope" in proc.stderr
    assert not (work / "data").exists() and not (work / "exp").exists()  # nothing started
    cfg, train = load_distil_config(REPO / "egs/whisper/conf/distil.yaml", {})
    assert (cfg.kl_weight, cfg.ce_weight, cfg.max_pseudo_label_wer) == (0.8, 1.0, 10.0)
    assert cfg.pseudo_labels and train.num_epochs >= 1


def _driver_calls(tmp_path: Path, recipe: str, *options: str) -> list[str]:
    """The stage driver's calls that egs/<recipe>/run.sh makes, with a driver that records
    them (the real utils/recipe.sh, a stand-in ../../run.sh)."""
    root = tmp_path / "root"
    (root / "utils").mkdir(parents=True)
    (root / "utils/recipe.sh").symlink_to(REPO / "utils/recipe.sh")
    (root / "egs" / recipe).mkdir(parents=True)
    shutil.copy(REPO / "egs" / recipe / "run.sh", root / "egs" / recipe / "run.sh")
    calls = tmp_path / "calls.txt"
    (root / "run.sh").write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    (root / "run.sh").chmod(0o755)
    run_cmd([root / "egs" / recipe / "run.sh", *options])
    return [line.split(" --stage ", 1)[1] for line in calls.read_text().splitlines()]


def test_recipe_stage_loop_runs_stacks_in_turn_and_8_9_on_the_last(tmp_path):
    calls = _driver_calls(tmp_path / "all", "whisper")
    assert calls == [
        "0 --stop_stage 1",
        "4 --stop_stage 7 --stack encoder --exp_dir exp/encoder",
        "4 --stop_stage 9 --stack decoder --exp_dir exp/decoder",
    ]
    # one stack asked for: stages 8-9 stay the decoder's, the user's options come last
    calls = _driver_calls(tmp_path / "enc", "whisper", "--stage", "5", "--stacks", "encoder",
                          "--num_prune", "2")  # fmt: skip
    assert calls == ["5 --stop_stage 7 --stack encoder --exp_dir exp/encoder --num_prune 2"]
    calls = _driver_calls(tmp_path / "w2v", "wav2vec2", "--stage", "4", "--stop_stage", "8")
    assert calls == ["4 --stop_stage 8 --stack encoder --exp_dir exp/encoder"]


def test_wav2vec2_recipe_trains_its_model_then_prunes_it(pipeline, tmp_path):
    """Stage 3 of a recipe whose model another library trains (utils/recipe.sh), then stage 4 on
    that model: a tiny HuBERT for a few seconds on the tiny corpus."""
    work = recipe_dir(tmp_path, "wav2vec2")
    (work / "data").symlink_to(pipeline["workdir"] / "data")
    train = "--minutes 0.02 --architecture hubert --num_layers 2 --hidden_size 32 --num_heads 2"
    train += " --intermediate_size 64 --dev_num_utts 4 --max_duration 20"
    run_recipe(work, "--stage", "3", "--stop_stage", "4", "--train_args", train,
               "--model_dir", "exp/hubert", "--calib_num_utts", "8", "--nj", "1")  # fmt: skip
    config = json.loads((work / "exp/hubert/config.json").read_text())
    assert config["architectures"] == ["HubertForCTC"] and config["num_hidden_layers"] == 2
    history = json.loads((work / "exp/hubert/history.json").read_text())
    assert history[-1]["reason"] == "time budget spent" and history[-1]["num_utts"] == 4
    info = json.loads((work / "exp/encoder/dump/info.json").read_text())
    assert (info["model_type"], info["model_dir"]) == ("hf", "exp/hubert")
    assert info["num_layers"] == 2 and info["num_utts"] == 8
    assert "HubertForCTC: 2 layers" in (work / "exp/log/train_model.log").read_text()


@pytest.mark.parametrize("name", ["librispeech", "aishell"])
def test_recipe_configs_are_valid_and_paper_sized(name):
    for config, layers in (("train.yaml", 12), ("train_18layer.yaml", 18)):
        cfg = load_config(REPO / "egs" / name / "conf" / config)
        assert (cfg.model.num_layers, cfg.model.d_model, cfg.model.num_heads) == (layers, 256, 4)
        assert cfg.model.ffn_dim == 2048 and cfg.model.decoder_layers == 0
        assert cfg.model.interctc_weight == 0.3 and cfg.model.stochastic_depth_rate > 0
    load_config(REPO / "egs" / name / "conf/finetune.yaml")
    assert "No result has been produced yet" in (REPO / "egs" / name / "RESULTS.md").read_text()


def test_download_offline_fails_clearly(tmp_path):
    corpus_dir = tmp_path / "download/LibriSpeech"
    url = "http://127.0.0.1:9/resources"  # nothing listens there
    proc = prepare_data(
        "librispeech", corpus_dir, "train-960 dev-clean", tmp_path / "out",
        "--download", "true", "--download_url", url,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"could not download {url}/12/train-clean-100.tar.gz" in proc.stderr
    assert f"{url}/12/dev-clean.tar.gz" in proc.stderr and "--download false" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "download").glob("*.tar.gz"))  # no empty partial archives left


def test_download_refusals(tmp_path):
    with pytest.raises(CorpusError, match="must end with /aishell"):
        download_corpus("aishell", tmp_path / "corpus", ["train"], DEFAULT_DOWNLOAD_URL)
    with pytest.raises(CorpusError, match="lhotse can download librispeech or aishell, not kaldi"):
        download_corpus("kaldi", tmp_path / "corpus", ["train"], DEFAULT_DOWNLOAD_URL)
    for options, message in (
        (["--download", "true"], "--download true needs --corpus librispeech or aishell"),
        (["--corpus", "timit"], "--corpus must be builtin, librispeech, aishell or kaldi"),
        (["--corpus", "kaldi"], "--corpus kaldi needs --corpus_dir"),
    ):
        proc = run_sh(tmp_path, *options, check=False)
        assert proc.returncode != 0 and message in proc.stderr
    assert not list(tmp_path.iterdir())


# --- refusals ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_librispeech(tmp_path_factory) -> Path:
    return build_librispeech(
        tmp_path_factory.mktemp("small") / "LibriSpeech", {"dev-clean": 3, "test-clean": 3}
    )


@pytest.fixture(scope="module")
def small_aishell(tmp_path_factory) -> Path:
    return build_aishell(
        tmp_path_factory.mktemp("small") / "aishell", {"train": 2, "dev": 2, "test": 2}
    )


def test_librispeech_transcript_line_without_audio_is_refused(small_librispeech, tmp_path, caplog):
    corpus = shutil.copytree(small_librispeech, tmp_path / "LibriSpeech")
    flac = sorted(corpus.glob("test-clean/*/*/*.flac"))[0]
    flac.unlink()
    extra = sorted(corpus.glob("dev-clean/*/*"))[0] / "orphan.flac"
    shutil.copy(sorted(corpus.glob("dev-clean/*/*/*.flac"))[0], extra)
    caplog.set_level(logging.INFO)
    with pytest.raises(
        CorpusError, match=f"1 problem.*\n  {re.escape(str(flac))}: audio file missing"
    ):
        prepare_librispeech_cuts(corpus, ["dev-clean", "test-clean"], 1)
    assert "skipping 1 .flac files without a transcript line" in caplog.text


def damage_aishell(corpus: Path, damage: str) -> None:
    """Break a copy of the small AISHELL-1 corpus in one way."""
    wav_dir = corpus / "data_aishell/wav"
    transcript = corpus / AISHELL_TRANSCRIPT
    if damage == "no_dir":
        shutil.rmtree(corpus)
    elif damage == "no_transcript":
        transcript.unlink()
    elif damage == "no_test":
        shutil.rmtree(wav_dir / "test")
    elif damage == "renamed":  # no dev wav matches a transcript line
        for wav in wav_dir.glob("dev/*/*.wav"):
            wav.rename(wav.with_name("x" + wav.name))
    elif damage == "empty_wav":
        sorted(wav_dir.glob("train/*/*.wav"))[0].write_bytes(b"")
    elif damage == "empty_text":
        lines = transcript.read_text().splitlines()
        cut = [
            "BAC009S0764W0121" if line.startswith("BAC009S0764W0121") else line for line in lines
        ]
        transcript.write_text("\n".join(cut) + "\n")


@pytest.mark.parametrize(
    "damage, message",
    [
        ("no_dir", "corpus directory does not exist (expected <corpus_dir>/data_aishell/wav/"),
        ("no_transcript", "transcript file missing (expected"),
        ("no_test", "data_aishell/wav/test: subset directory does not exist"),
        ("renamed", "no .wav file with a line in"),
        ("empty_wav", "audio file is empty"),
        ("empty_text", "empty transcript for BAC009S0764W0121"),
    ],
)
def test_bad_aishell_directories(small_aishell, tmp_path, damage, message):
    corpus = shutil.copytree(small_aishell, tmp_path / "aishell")
    damage_aishell(corpus, damage)
    with pytest.raises(CorpusError, match=re.escape(message)):
        prepare_aishell_cuts(corpus, ["train", "dev", "test"], 1)


def test_aishell_refuses_librispeech_subset_names(small_aishell):
    with pytest.raises(
        CorpusError, match="AISHELL-1 subsets are train, dev, test; got train-clean-100"
    ):
        prepare_aishell_cuts(small_aishell, ["train-clean-100", "dev"], 1)


def test_stage_0_exits_1_and_keeps_earlier_output(small_aishell, tmp_path):
    corpus = shutil.copytree(small_aishell, tmp_path / "aishell")
    damage_aishell(corpus, "empty_wav")
    out = tmp_path / "out"
    out.mkdir()
    (out / "cuts_dev.jsonl.gz").write_bytes(b"earlier output")
    proc = prepare_data("aishell", corpus, "train dev test", out)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "1 problem(s) in this AISHELL-1 corpus" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["cuts_dev.jsonl.gz"]
    assert (out / "cuts_dev.jsonl.gz").read_bytes() == b"earlier output"


def test_recipe_stage_0_refuses_a_missing_corpus(tmp_path):
    work = recipe_dir(tmp_path, "aishell")
    missing = str(tmp_path / "nope")
    proc = run_recipe(
        work, "--stage", "0", "--stop_stage", "0", "--corpus_dir", missing, check=False
    )
    assert proc.returncode != 0
    assert "corpus directory does not exist" in (work / "exp/log/prepare_data.log").read_text()
    assert not (work / "data/manifests").exists()

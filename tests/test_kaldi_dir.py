"""Kaldi data directories as input (``--corpus kaldi``): import through lhotse's Kaldi import,
plain paths and ``cmd |`` pipes, segments, resampling, and the refusal of bad directories."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from lhotse import CutSet

from comflp.corpus.prepare import CorpusError, prepare_kaldi_cuts

from .conftest import PYTHON, REPO, run_cmd, run_sh
from .corpora import build_kaldi_dir, build_librispeech


@pytest.fixture(scope="module")
def kaldi(tmp_path_factory) -> dict:
    """train and test: one recording per utterance (paths and pipes); dev: 8 kHz recordings
    of two utterances each, cut apart by segments."""
    tmp = tmp_path_factory.mktemp("kaldi")
    audio = build_librispeech(
        tmp / "audio", {"train-clean-100": 6, "dev-clean": 4, "test-clean": 2}
    )
    expected = {
        "train": build_kaldi_dir(tmp / "data/train", audio / "train-clean-100"),
        "dev": build_kaldi_dir(tmp / "data/dev", audio / "dev-clean", segments=True),
        "test": build_kaldi_dir(tmp / "data/test", audio / "test-clean"),
    }
    return {"root": tmp / "data", "expected": expected, "tmp": tmp}


@pytest.mark.e2e
def test_stages_0_and_1_on_kaldi_directories(kaldi, tmp_path, monkeypatch):
    before = {p: p.read_bytes() for p in kaldi["root"].rglob("*") if p.is_file()}
    run_sh(
        tmp_path, "--stage", "0", "--stop_stage", "1", "--corpus", "kaldi",
        "--corpus_dir", str(kaldi["root"]), "--train_set", "train", "--dev_set", "dev",
        "--test_sets", "test", "--nj", "1",
    )  # fmt: skip
    monkeypatch.chdir(tmp_path)  # manifests hold paths relative to where run.sh ran
    for subset, expected in kaldi["expected"].items():
        cuts = CutSet.from_file(tmp_path / f"data/manifests/cuts_{subset}.jsonl.gz")
        assert sorted(c.id for c in cuts) == sorted(expected)  # cut id = utterance id
        for cut in cuts:
            text, duration = expected[cut.id]
            assert cut.supervisions[0].text == text and cut.supervisions[0].id == cut.id
            assert cut.duration == pytest.approx(duration, abs=0.01)
            assert cut.sampling_rate == 16000
        with_feats = CutSet.from_file(tmp_path / f"data/fbank/cuts_{subset}.jsonl.gz")
        assert len(with_feats) == len(expected)
        for cut in with_feats:
            assert cut.load_features().shape == (cut.num_frames, 80)
            assert cut.num_frames == pytest.approx(cut.duration * 100, abs=2)
    train = CutSet.from_file(tmp_path / "data/manifests/cuts_train.jsonl.gz")
    assert {c.recording.sources[0].type for c in train} == {"file", "command"}
    dev = CutSet.from_file(tmp_path / "data/manifests/cuts_dev.jsonl.gz")
    resampled = {
        (t.source_sampling_rate, t.target_sampling_rate)
        for c in dev
        for t in c.recording.transforms
    }
    assert resampled == {(8000, 16000)}  # the 8 kHz recordings, resampled on reading
    after = {p: p.read_bytes() for p in kaldi["root"].rglob("*") if p.is_file()}
    assert after == before  # the Kaldi directories are only read


def prepare(corpus_dir: Path, subsets: str, out: Path):
    return run_cmd(
        [PYTHON, REPO / "bin/prepare_data.py", "--layout", "kaldi", "--corpus_dir", corpus_dir,
         "--subsets", subsets, "--output_dir", out, "--nj", "1"],
        check=False,
    )  # fmt: skip


def edit_lines(path: Path, edit) -> None:
    path.write_text(
        "".join(edit(line) + "\n" for line in path.read_text().splitlines() if edit(line))
    )


def test_bad_utterances_are_all_listed(kaldi, tmp_path):
    root = shutil.copytree(kaldi["root"], tmp_path / "data")
    ids = sorted(kaldi["expected"]["train"])
    failing = "sox /no/such/file.flac -t wav -"
    low_rate = tmp_path / "low.wav"
    run_cmd(["sox", kaldi["tmp"] / "data/dev/audio/rec000.wav", low_rate])  # 8 kHz

    def damage_wav_scp(line: str) -> str:
        utt = line.split()[0]
        return {
            ids[0]: f"{utt} {failing} |",
            ids[1]: f"{utt} /no/such/audio.wav",
            ids[2]: f"{utt} {low_rate}",
        }.get(utt, line)

    edit_lines(root / "train/wav.scp", damage_wav_scp)
    edit_lines(
        root / "train/text", lambda line: line.split()[0] if line.startswith(ids[3]) else line
    )
    edit_lines(root / "train/utt2spk", lambda line: "" if line.startswith(ids[4]) else line)
    edit_lines(root / "dev/segments", lambda line: line.rsplit(" ", 1)[0] + " 99.0")
    out = tmp_path / "out"
    out.mkdir()
    (out / "cuts_train.jsonl.gz").write_bytes(b"earlier output")
    proc = prepare(root, "train dev", out)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        f"{root}/train/wav.scp: {ids[0]}: command `{failing}` failed (exit status 2" in proc.stderr
    )
    assert f"{ids[1]}: /no/such/audio.wav: audio file missing" in proc.stderr
    assert "different sampling rates (2 at 16000 Hz, 1 at 8000 Hz)" in proc.stderr
    assert f"text: empty or missing transcript for {ids[3]}" in proc.stderr
    assert f"wav.scp: {ids[4]} has no line in utt2spk" in proc.stderr
    assert "ends at 99.0 s, after the end of rec000" in proc.stderr
    assert "problem(s) in this Kaldi-format corpus" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["cuts_train.jsonl.gz"]
    assert (out / "cuts_train.jsonl.gz").read_bytes() == b"earlier output"


def test_a_command_without_audio_output_is_refused(kaldi, tmp_path):
    root = shutil.copytree(kaldi["root"], tmp_path / "data")
    utt = sorted(kaldi["expected"]["test"])[0]
    edit_lines(
        root / "test/wav.scp", lambda line: f"{utt} echo hello |" if line.startswith(utt) else line
    )
    with pytest.raises(CorpusError, match=f"{utt}: output of `echo hello` is not audio"):
        prepare_kaldi_cuts(root, ["test"], 1)


@pytest.mark.parametrize(
    "subsets, remove, message",
    [
        (
            ["train"],
            "train/text",
            "train: text missing (expected <corpus_dir>/<subset>/ holding wav.scp",
        ),
        (["train", "eval"], None, "eval: Kaldi data directory does not exist"),
    ],
)
def test_bad_directory_layouts(kaldi, tmp_path, subsets, remove, message):
    root = shutil.copytree(kaldi["root"], tmp_path / "data")
    if remove:
        (root / remove).unlink()
    with pytest.raises(CorpusError, match=re.escape(message)):
        prepare_kaldi_cuts(root, subsets, 1)

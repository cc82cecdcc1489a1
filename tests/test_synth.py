"""The built-in corpus: seeded text, reproducible audio, resizing without resynthesis."""

import random

import numpy as np
import pytest
import soundfile as sf

from comflp.corpus.synth import (
    ACCENTS,
    VARIANTS,
    SentenceGenerator,
    plan_utterance,
    plural,
    speak,
    synthesize_subset,
    trim_silence,
    vocabulary,
)


def test_sentences_are_seeded_and_use_the_vocabulary():
    a = [SentenceGenerator(random.Random(7)).sentence() for _ in range(3)]
    b = [SentenceGenerator(random.Random(7)).sentence() for _ in range(3)]
    assert a == b
    texts = [plan_utterance(0, "train-clean-100", i).text for i in range(4000)]
    assert len(set(texts)) == 3996  # seed 0: four short sentences drawn twice, no others
    produced = {w for t in texts for w in t.split()}
    assert produced == vocabulary()  # every word reachable, nothing outside the vocabulary
    assert len(produced) == 441
    assert (
        plural("BOX") == "BOXES" and plural("CHILD") == "CHILDREN" and plural("STORY") == "STORIES"
    )


def test_plans_depend_only_on_seed_subset_and_index():
    assert plan_utterance(1, "train-clean-100", 5) == plan_utterance(1, "train-clean-100", 5)
    assert plan_utterance(1, "train-clean-100", 5) != plan_utterance(2, "train-clean-100", 5)
    plans = [plan_utterance(0, "train-clean-100", i) for i in range(2000)]
    voices = {f"{a}+{v}" for a in ACCENTS for v in VARIANTS}
    assert {p.voice for p in plans} == voices  # every voice used, nothing else
    speaker_of = {p.voice: p.speaker for p in plans}  # one speaker id per voice, and back
    assert all(speaker_of[p.voice] == p.speaker for p in plans)
    assert len(set(speaker_of.values())) == len(voices)
    assert {p.speed for p in plans} == set(range(140, 201))  # words per minute, every value
    assert {p.pitch for p in plans} == set(range(25, 76))


def test_same_input_gives_the_same_audio(tmp_path):
    for name in ("a.flac", "b.flac"):
        speak("THE OLD MAN WALKED", "en-us+m3", 170, 50, tmp_path / name)
    assert (tmp_path / "a.flac").read_bytes() == (tmp_path / "b.flac").read_bytes()
    audio, rate = sf.read(tmp_path / "a.flac")
    assert rate == 16000 and audio.ndim == 1
    # The kept silence at each end (50 ms) is quiet, the speech between is not.
    assert np.abs(audio[:400]).max() < 0.02 and np.abs(audio[-400:]).max() < 0.02
    assert np.sqrt(np.mean(audio**2)) > 0.02
    # The duration goes as 1 / speed (within 10%), and the voice changes the audio.
    speak("THE OLD MAN WALKED", "en-us+m3", 120, 50, tmp_path / "slow.flac")
    speak("THE OLD MAN WALKED", "en-gb+f2", 170, 50, tmp_path / "other.wav")
    slower = len(sf.read(tmp_path / "slow.flac")[0]) / len(audio)
    assert slower == pytest.approx(170 / 120, rel=0.1)
    other, rate = sf.read(tmp_path / "other.wav")
    assert rate == 16000 and (len(other) != len(audio) or not np.allclose(other, audio, atol=1e-3))


def test_trim_silence_keeps_50_ms_at_each_end():
    rate = 16000
    tone = 0.3 * np.sin(np.arange(rate // 2) * 2 * np.pi * 440 / rate)  # 0.5 s
    audio = np.concatenate([np.zeros(rate), tone, np.zeros(rate // 4)]).astype(np.float32)
    trimmed = trim_silence(audio)
    assert len(trimmed) == rate // 2 + 2 * 800
    assert np.abs(trimmed[:800]).max() == 0 and np.abs(trimmed[-800:]).max() == 0
    # Speech at the very start gets zeros in front of it; silence alone gives nothing.
    assert len(trim_silence(tone.astype(np.float32))) == rate // 2 + 2 * 800
    assert trim_silence(np.zeros(rate, dtype=np.float32)).size == 0


def test_resizing_keeps_what_fits(tmp_path):
    synthesize_subset(tmp_path, "dev-clean", 3, seed=4, nj=2)
    first = {p: p.stat().st_mtime_ns for p in tmp_path.glob("dev-clean/*/*/*.flac")}
    assert len(first) == 3
    synthesize_subset(tmp_path, "dev-clean", 5, seed=4, nj=2)
    grown = {p: p.stat().st_mtime_ns for p in tmp_path.glob("dev-clean/*/*/*.flac")}
    assert len(grown) == 5 and all(grown[p] == t for p, t in first.items())
    synthesize_subset(tmp_path, "dev-clean", 2, seed=4, nj=2)
    kept = sorted(p.stem for p in tmp_path.glob("dev-clean/*/*/*.flac"))
    assert kept == sorted(plan_utterance(4, "dev-clean", i).utt_id for i in range(2))
    listed = sorted(
        line.split()[0]
        for t in tmp_path.glob("dev-clean/*/*/*.trans.txt")
        for line in t.read_text().splitlines()
    )
    assert listed == kept

"""The built-in corpus: seeded text, reproducible audio, resizing without resynthesis."""

import random

from comflp.synth import (
    SentenceGenerator,
    plan_utterance,
    plural,
    speak,
    synthesize_subset,
    vocabulary,
)


def test_sentences_are_seeded_and_use_the_vocabulary():
    a = [SentenceGenerator(random.Random(7)).sentence() for _ in range(3)]
    b = [SentenceGenerator(random.Random(7)).sentence() for _ in range(3)]
    assert a == b
    words = vocabulary()
    assert 300 <= len(words) <= 600
    texts = [plan_utterance(0, "dev-clean", i).text for i in range(200)]
    assert len(set(texts)) > 190  # varied
    assert all(set(t.split()) <= words for t in texts)
    assert (
        plural("BOX") == "BOXES" and plural("CHILD") == "CHILDREN" and plural("STORY") == "STORIES"
    )


def test_plans_depend_only_on_seed_subset_and_index():
    assert plan_utterance(1, "train-clean-100", 5) == plan_utterance(1, "train-clean-100", 5)
    assert plan_utterance(1, "train-clean-100", 5) != plan_utterance(2, "train-clean-100", 5)
    voices = {plan_utterance(0, "train-clean-100", i).voice for i in range(300)}
    speeds = {plan_utterance(0, "train-clean-100", i).speed for i in range(300)}
    assert len(voices) > 50 and len(speeds) > 30


def test_same_input_gives_the_same_audio(tmp_path):
    for name in ("a.flac", "b.flac"):
        speak("THE OLD MAN WALKED", "en-us+m3", 170, 50, tmp_path / name)
    assert (tmp_path / "a.flac").read_bytes() == (tmp_path / "b.flac").read_bytes()


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

"""Distil-Whisper's recovery (comflp/train/distil.py) on a tiny random Whisper: the frozen
encoder, the pseudo-label filter, the loss, and stage 8's record."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

pytest.importorskip("transformers")

from comflp.adapters import load_prunable  # noqa: E402
from comflp.asr.config import ConfigError, TrainConfig  # noqa: E402
from comflp.expdir import DISTIL_RESULT  # noqa: E402
from comflp.train.distil import (  # noqa: E402
    DistilConfig,
    distil_loss,
    distil_stage,
    encode_batches,
    prepare,
    pseudo_labelled,
    recover,
)

from .test_whisper import TEXTS, make_cuts, tiny_whisper  # noqa: E402

KEEP_ALL = DistilConfig(max_pseudo_label_wer=1e9, batch_size=3)
TRAIN = TrainConfig(num_epochs=4, lr=3e-3, warmup_steps=0, lr_schedule="cosine", seed=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distil")
    teacher = load_prunable("whisper", tiny_whisper(root / "model"))
    teacher.hf.generation_config.max_length = 6
    cuts = make_cuts(root / "audio", [1.0, 2.5, 3.9, 1.7], TEXTS)
    return teacher, cuts, encode_batches(teacher, cuts, batch_size=2)


def test_pseudo_labels_are_the_teachers_transcripts_filtered_by_wer(setup):
    teacher, _, batches = setup
    labelled, counts = pseudo_labelled(teacher, batches, KEEP_ALL)
    assert counts == {"utterances": 4, "kept": 4, "max_wer": 1e9}
    assert [len(b["ids"]) for b in labelled] == [3, 1]  # regrouped into full batches
    hyps = {i: h for b in batches for i, h in zip(b["ids"], teacher.greedy_decode(b["memory"]))}
    for batch in labelled:
        for i, uid in enumerate(batch["ids"]):
            n = int(batch["target_lens"][i])
            assert batch["targets"][i, :n].tolist() == hyps[uid]
    refs, _ = pseudo_labelled(teacher, batches, dataclasses.replace(KEEP_ALL, pseudo_labels=False))
    assert refs[0]["texts"] == labelled[0]["texts"] and not torch.equal(
        refs[0]["targets"], labelled[0]["targets"]
    )
    none, counts = pseudo_labelled(teacher, batches, DistilConfig(max_pseudo_label_wer=0.0))
    assert none == [] and counts["kept"] == 0  # a random teacher's transcripts are all wrong
    with pytest.raises(ConfigError, match="no training utterance left"):
        recover(teacher, teacher, none, KEEP_ALL, TRAIN)


def test_loss_is_kl_plus_cross_entropy_per_token(setup):
    teacher, _, batches = setup
    labelled, _ = pseudo_labelled(teacher, batches, KEEP_ALL)
    batch = labelled[0]
    with torch.no_grad():
        loss, parts = distil_loss(teacher, teacher, batch, KEEP_ALL)
        assert parts["kl"] == pytest.approx(0.0, abs=1e-6)  # a student equal to its teacher
        tokens = int(batch["target_lens"].sum()) + len(batch["ids"])  # each ends with <eos>
        nll = teacher.teacher_forced_nll(batch["memory"], batch).item() / tokens
        assert parts["ce"] == pytest.approx(nll, rel=1e-5)
        student = teacher.prune_decoder([2, 3])
        loss, parts = distil_loss(student, teacher, batch, KEEP_ALL)
        assert parts["kl"] > 0.01
        assert loss.item() == pytest.approx(0.8 * parts["kl"] + 1.0 * parts["ce"], rel=1e-5)


def test_recovery_trains_the_decoder_alone_and_lowers_its_loss(setup):
    teacher, _, batches = setup
    labelled, _ = pseudo_labelled(teacher, batches, KEEP_ALL)
    student = teacher.prune_decoder([2, 3])
    before = copy.deepcopy(student.hf.state_dict())
    history = recover(student, teacher, labelled, KEEP_ALL, TRAIN)
    after = student.hf.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(".decoder." in k or k.startswith("proj_out") for k in changed)
    assert len(history) == TRAIN.num_epochs * len(labelled)
    first = sum(h["loss"] for h in history[: len(labelled)])
    last = sum(h["loss"] for h in history[-len(labelled) :])
    assert last < 0.7 * first


def test_stage_8_with_a_teacher_writes_the_model_and_its_record(setup, tmp_path):
    teacher, cuts, _ = setup
    config = tmp_path / "distil.yaml"
    config.write_text(
        "distil:\n  max_pseudo_label_wer: 100000.0\n  num_utts: 0\n  batch_size: 3\n"
        "train:\n  num_epochs: 2\n  lr: 0.003\n  warmup_steps: 0\n"
    )
    student = teacher.prune_decoder([1, 2])
    prepared = prepare(teacher, cuts, cuts, config, {})
    distil_stage(student, teacher, prepared, tmp_path / "out")
    record = json.loads((tmp_path / "out" / DISTIL_RESULT).read_text())
    assert record["filter"]["kept"] == 4 and record["steps"] == 4
    assert record["dev"]["num_utts"] == 4
    again = load_prunable("whisper", tmp_path / "out")
    assert again.num_decoder_layers == 2
    encoder_pruned = teacher.prune([1])
    with pytest.raises(ConfigError, match="must keep the teacher's encoder"):
        distil_stage(encoder_pruned, teacher, prepared, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()

"""Training: exact resume, refusal of incompatible checkpoints, averaging."""

import pytest
import torch

from comflp.asr.checkpoint import load_checkpoint, load_model
from comflp.asr.config import ConfigError, load_config
from comflp.asr.data import load_cuts
from comflp.asr.features import load_cmvn
from comflp.asr.tokenizer import Tokenizer
from comflp.train.trainer import train

from .conftest import REPO


def _train(exp_dir, tiny_data, stop_after_steps=0, **model_overrides):
    cfg = load_config(
        REPO / "conf/train_tiny.yaml", {f"model.{k}": v for k, v in model_overrides.items()}
    )
    cfg.train.num_workers = 1  # exercise the worker-process path too
    tok = Tokenizer(tiny_data["lang_dir"] / "tokenizer.model")
    cfg.model.vocab_size = tok.vocab_size
    return train(
        cfg,
        exp_dir,
        load_cuts(tiny_data["train"]),
        load_cuts(tiny_data["dev"]),
        tok,
        load_cmvn(tiny_data["cmvn"]),
        stop_after_steps=stop_after_steps,
    )


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_gives_the_same_parameters(tmp_path, tiny_data):
    assert _train(tmp_path / "straight", tiny_data)
    # Interrupted twice: in the middle of epoch 1 and in epoch 2, then resumed each time.
    assert not _train(tmp_path / "resumed", tiny_data, stop_after_steps=2)
    assert load_checkpoint(tmp_path / "resumed/checkpoint-latest.pt")["batches_done"] == 2
    assert not _train(tmp_path / "resumed", tiny_data, stop_after_steps=5)
    assert _train(tmp_path / "resumed", tiny_data)
    for name in ("epoch-1.pt", "epoch-2.pt", "model.pt"):
        _assert_same_weights(
            load_checkpoint(tmp_path / "straight" / name)["model"],
            load_checkpoint(tmp_path / "resumed" / name)["model"],
        )
    straight = load_checkpoint(tmp_path / "straight/epoch-2.pt")
    resumed = load_checkpoint(tmp_path / "resumed/epoch-2.pt")
    assert straight["step"] == resumed["step"]
    assert [r["train_loss"] for r in straight["history"]] == pytest.approx(
        [r["train_loss"] for r in resumed["history"]]
    )
    # The averaged model is the mean of the last two epochs, computed here tensor by tensor,
    # and loads from the directory alone.
    first, second = (load_checkpoint(tmp_path / f"straight/epoch-{e}.pt")["model"] for e in (1, 2))
    averaged = load_checkpoint(tmp_path / "straight/model.pt")["model"]
    for k, value in averaged.items():
        if value.is_floating_point():
            want = ((first[k].double() + second[k].double()) / 2).float()
            torch.testing.assert_close(value, want, rtol=0, atol=0)
        else:  # integer buffers (e.g. BatchNorm's batch count) are the first checkpoint's
            assert torch.equal(value, first[k]), k
    model = load_model(tmp_path / "straight")
    assert not model.training and model.cfg.num_layers == 4


def test_resume_with_another_shape_is_refused(tmp_path, tiny_data):
    exp = tmp_path / "exp"
    assert not _train(exp, tiny_data, stop_after_steps=1)
    before = {p.name: p.read_bytes() for p in exp.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="shape mismatch"):
        _train(exp, tiny_data, d_model=48)
    after = {p.name: p.read_bytes() for p in exp.iterdir() if p.is_file()}
    assert before == after


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path, tiny_data):
    exp = tmp_path / "exp"
    assert _train(exp, tiny_data)
    cfg = load_config(REPO / "conf/train_tiny.yaml")
    tok = Tokenizer(tiny_data["lang_dir"] / "tokenizer.model")
    cfg.model.vocab_size = tok.vocab_size
    with pytest.raises(ConfigError, match="--resume true"):
        train(
            cfg,
            exp,
            load_cuts(tiny_data["train"]),
            load_cuts(tiny_data["dev"]),
            tok,
            load_cmvn(tiny_data["cmvn"]),
            resume=False,
        )

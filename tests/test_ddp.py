"""Training in several processes (DDP, gloo on CPU) under torchrun.

- DDP on 2 processes, each given half of every batch, takes the same steps as one process on
  the whole batch: the loss is a per-utterance mean and DDP averages the gradients, so with
  equal utterance counts per rank the averaged gradient is the whole batch's.
- bin/train.py under torchrun: both ranks end with identical parameters, rank 0 alone
  evaluates, and an interrupted run resumed under torchrun ends where an uninterrupted one does.

The torchrun workers run this module (``python -m torch.distributed.run ... -m tests.test_ddp``).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from comflp.asr.checkpoint import load_checkpoint
from comflp.asr.config import ModelConfig
from comflp.asr.data import pad_sequences
from comflp.asr.model import ASRModel

from .conftest import PYTHON, REPO, run_cmd

VOCAB = 20
UTTS_PER_RANK = 2
STEPS = 3


def tiny_model() -> ASRModel:
    """A small ASRModel with every random part off (dropout, stochastic depth)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        num_heads=2,
        ffn_dim=64,
        num_layers=4,
        dropout=0.0,
        subsampling_channels=8,
        interctc_layers=[2],
        interctc_weight=0.3,
        stochastic_depth_rate=0.0,
        decoder_layers=1,
        ctc_weight=0.7,
    )
    return ASRModel(cfg)


def utterances(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed (features, tokens) pairs of different lengths."""
    g = torch.Generator().manual_seed(1)
    utts = []
    for _ in range(n):
        frames = int(torch.randint(40, 90, (), generator=g))
        tokens = torch.randint(
            1, VOCAB - 1, (int(torch.randint(2, 7, (), generator=g)),), generator=g
        )
        utts.append((torch.randn(frames, 80, generator=g), tokens))
    return utts


def batch(utts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    feats, feat_lens = pad_sequences([f for f, _ in utts])
    targets, target_lens = pad_sequences([t for _, t in utts], 0)
    return feats, feat_lens, targets, target_lens


def train_steps(world_size: int, ranks_simulated: list[int]) -> dict:
    """STEPS SGD steps on global batches of 2 * UTTS_PER_RANK utterances; this process takes
    the parts of ``ranks_simulated`` of every batch.

    SGD rather than the trainer's Adam: Adam scales every gradient to a step of about the
    learning rate, even rounding noise where the true gradient is zero (the attention key
    bias: softmax ignores a shift shared by all keys), so runs that sum in another order
    part ways there.
    """
    model = tiny_model()
    wrapped = model
    if world_size > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    utts = utterances(STEPS * 2 * UTTS_PER_RANK)
    for step in range(STEPS):
        chosen = []
        for r in ranks_simulated:
            start = (step * 2 + r) * UTTS_PER_RANK
            chosen += utts[start : start + UTTS_PER_RANK]
        loss, _ = wrapped(*batch(chosen))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
    return model.state_dict()


def torchrun(cwd: Path, *args: str, check: bool = True):
    """Two CPU processes of this module's worker entry point."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "tests.test_ddp", *args]
    return run_cmd(command, cwd=cwd, env=env, check=check, timeout=300)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ddp_matches_one_process_on_the_whole_batch(tmp_path):
    torchrun(tmp_path, "steps", str(tmp_path))
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert_same(rank0, rank1)
    whole = train_steps(1, [0, 1])
    for k in whole:
        torch.testing.assert_close(rank0[k], whole[k], rtol=1e-5, atol=1e-5, msg=k)
    # The check can fail: one process seeing only rank 0's halves ends elsewhere.
    half = train_steps(1, [0])
    assert max((rank0[k] - half[k]).abs().max().item() for k in half) > 1e-3


def train_args(workdir: Path, exp_dir: Path) -> list[str]:
    """bin/train.py's arguments for the tiny pipeline's data (paths relative to ``workdir``)."""
    return [
        "--train_config",
        str(REPO / "conf/train_tiny.yaml"),
        "--train_cuts",
        "data/fbank/cuts_train-clean-100.jsonl.gz",
        "--dev_cuts",
        "data/fbank/cuts_dev-clean.jsonl.gz",
        "--lang_dir",
        "data/lang_bpe48",
        "--cmvn",
        "data/fbank/cmvn.json",
        "--device",
        "cpu",
        "--exp_dir",
        str(exp_dir),
    ]


@pytest.fixture(scope="module")
def straight(pipeline, tmp_path_factory) -> dict:
    """bin/train.py of the tiny config on two ranks, uninterrupted; rank 1 dumps its final
    weights (rank 0 ends holding the averaged ones; its final training state is epoch-2.pt)."""
    out = tmp_path_factory.mktemp("ddp_straight")
    exp_dir = out / "exp"
    proc = torchrun(
        pipeline["workdir"], "train", str(out), *train_args(pipeline["workdir"], exp_dir)
    )
    return {"exp_dir": exp_dir, "rank1": torch.load(out / "rank1.pt"), "log": proc.stderr}


def test_train_py_ranks_end_identical(straight):
    exp_dir = straight["exp_dir"]
    assert_same(load_checkpoint(exp_dir / "epoch-2.pt")["model"], straight["rank1"])
    assert (exp_dir / "model.pt").is_file() and (exp_dir / "history.json").is_file()
    # Rank 0 alone evaluates and logs: 2 epochs and the averaged model.
    assert straight["log"].count("dev CER") == 3


def test_train_py_resumes_exactly_under_torchrun(straight, pipeline, tmp_path):
    """Stopped in the middle of epoch 2, then resumed: the weights of the uninterrupted run."""
    workdir, resumed = pipeline["workdir"], tmp_path / "exp"
    args = train_args(workdir, resumed)
    proc = torchrun(workdir, "train", str(tmp_path), *args, "--stop_after_steps", "7", check=False)
    assert proc.returncode != 0, "a stopped run must not look finished"
    assert load_checkpoint(resumed / "checkpoint-latest.pt")["step"] == 7
    assert not (resumed / "model.pt").exists()
    torchrun(workdir, "train", str(tmp_path), *args)
    for name in ("epoch-1.pt", "epoch-2.pt", "model.pt"):
        assert_same(
            load_checkpoint(straight["exp_dir"] / name)["model"],
            load_checkpoint(resumed / name)["model"],
        )


def _steps_worker(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    state = train_steps(dist.get_world_size(), [rank])
    torch.save(state, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _train_worker(out: str, *train_args: str) -> None:
    """Run bin/train.py, then save this rank's final weights (bin/train.py keeps them in memory)."""
    import comflp.train.trainer

    models = []

    class Recorded(ASRModel):
        def __init__(self, cfg):
            super().__init__(cfg)
            models.append(self)

    comflp.train.trainer.ASRModel = Recorded
    sys.argv = [str(REPO / "bin/train.py"), *train_args]
    runpy.run_path(sys.argv[0], run_name="__main__")
    torch.save(models[-1].state_dict(), Path(out) / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    {"steps": _steps_worker, "train": _train_worker}[sys.argv[1]](*sys.argv[2:])

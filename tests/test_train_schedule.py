"""The trainer's learning-rate schedule, checkpoint selection and pruning, and how DDP ranks
share an epoch: checked against values worked out by hand."""

from __future__ import annotations

import pytest
import torch
from lhotse import CutSet, MonoCut, SupervisionSegment

from comflp.asr.config import TrainConfig
from comflp.asr.data import train_sampler
from comflp.train.trainer import _prune_old_checkpoints, lr_lambda, select_for_average


def test_noam_schedule_warms_up_then_decays_as_inverse_square_root():
    factor = lr_lambda(TrainConfig(lr=1e-3, warmup_steps=100, min_lr=1e-5), total_steps=10_000)
    assert factor(0) == factor(1) == pytest.approx(0.01)  # step 0 counts as step 1
    assert factor(50) == pytest.approx(0.5)
    assert factor(100) == pytest.approx(1.0)
    assert factor(400) == pytest.approx(0.5)  # sqrt(100 / 400)
    assert factor(10**9) == pytest.approx(0.01)  # never below min_lr / lr


def test_cosine_schedule_reaches_min_lr_at_the_end():
    train = TrainConfig(lr=1e-3, warmup_steps=10, min_lr=1e-5, lr_schedule="cosine")
    factor = lr_lambda(train, total_steps=110)
    floor = 1e-5 / 1e-3
    assert factor(5) == pytest.approx(0.5)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(floor + (1 - floor) * 0.5)  # half way: cos(pi/2) = 0
    assert factor(110) == pytest.approx(floor)
    assert factor(500) == pytest.approx(floor)


def _epoch_files(tmp_path, epochs):
    for e in epochs:
        torch.save({"model": {}}, tmp_path / f"epoch-{e}.pt")


def test_checkpoint_selection_last_or_lowest_dev_loss(tmp_path):
    _epoch_files(tmp_path, [1, 2, 3, 4, 5])
    history = [{"epoch": e, "dev_loss": loss} for e, loss in zip(range(1, 6), [5, 2, 4, 1, 3])]
    last = select_for_average(tmp_path, history, 2, "last")
    assert [p.name for p in last] == ["epoch-4.pt", "epoch-5.pt"]
    best = select_for_average(tmp_path, history, 3, "best")
    assert [p.name for p in best] == ["epoch-2.pt", "epoch-4.pt", "epoch-5.pt"]  # losses 2, 1, 3
    (tmp_path / "epoch-4.pt").unlink()  # a pruned checkpoint is never selected
    assert [p.name for p in select_for_average(tmp_path, history, 2, "best")] == [
        "epoch-2.pt",
        "epoch-5.pt",
    ]


def test_old_checkpoints_are_pruned_but_the_averaged_ones_kept(tmp_path):
    _epoch_files(tmp_path, range(1, 8))
    _prune_old_checkpoints(tmp_path, keep_last_n=2, average_n=3)
    assert sorted(p.name for p in tmp_path.glob("epoch-*.pt")) == [
        "epoch-5.pt",
        "epoch-6.pt",
        "epoch-7.pt",
    ]
    _prune_old_checkpoints(tmp_path, keep_last_n=0, average_n=1)  # 0: keep everything
    assert len(list(tmp_path.glob("epoch-*.pt"))) == 3


def _cuts(n: int) -> CutSet:
    cuts = []
    for i in range(n):
        duration = 1.0 + (i % 7) * 0.5
        cut = MonoCut(f"u{i:03d}", 0.0, duration, 0, recording=None)
        cut.supervisions = [SupervisionSegment(f"u{i:03d}", f"u{i:03d}", 0.0, duration, text="a")]
        cuts.append(cut)
    return CutSet.from_cuts(cuts)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_ranks_share_an_epoch_disjointly(world_size):
    """Each utterance on one rank; together the ranks see the whole epoch. lhotse repeats a
    cut (id suffix _dupN) so that no rank runs out of batches before the others."""
    cuts = _cuts(60)
    per_rank = []
    for rank in range(world_size):
        sampler = train_sampler(cuts, 6.0, 4, 42, world_size, rank)
        sampler.set_epoch(1)
        per_rank.append([c.id for batch in sampler for c in batch])
    originals = [{i for i in ids if "_dup" not in i} for ids in per_rank]
    assert sum(len(o) for o in originals) == len(set().union(*originals))  # disjoint
    assert set().union(*originals) == {c.id for c in cuts}  # the whole epoch
    repeats = [i for ids in per_rank for i in ids if "_dup" in i]
    assert len(repeats) < world_size
    assert all(i.split("_dup")[0] in {c.id for c in cuts} for i in repeats)
    again = train_sampler(cuts, 6.0, 4, 42, world_size, 0)
    again.set_epoch(1)
    assert [c.id for batch in again for c in batch] == per_rank[0]  # deterministic

"""Batches for training and evaluation: lhotse cuts -> normalised, padded features and tokens."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from lhotse import CutSet
from lhotse.dataset import DynamicBucketingSampler, SimpleCutSampler
from torch.utils.data import DataLoader

from comflp.asr.layers import subsampled_lengths
from comflp.asr.tokenizer import Tokenizer

# seconds of audio per evaluation batch (dump, searches, decoding, the study): --max_duration
EVAL_MAX_DURATION = 100.0
# How load_eval_batches orders the dev batches, recorded beside the CERs measured on them
# (batching can move a CER by float noise, so cached CERs of another order are not reused).
EVAL_ORDER = "longest_first"


def load_cuts(path: str | Path) -> CutSet:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (run the stage that writes it)")
    return CutSet.from_file(path).to_eager()


def pad_sequences(
    seqs: list[torch.Tensor], value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (T_i, ...) tensors into (B, T_max, ...) and return their lengths."""
    lengths = torch.tensor([s.size(0) for s in seqs], dtype=torch.long)
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value), lengths


def transcripts(cuts: CutSet, encode: Callable[[str], list[int]]) -> dict:
    """The keys every batch has: ``texts``, ``targets`` (B, U) token ids padded with 0,
    ``target_lens``, ``ids`` and ``seconds`` (the audio duration of the batch)."""
    texts = [cut_text(c) for c in cuts]
    targets, target_lens = pad_sequences(
        [torch.tensor(encode(t), dtype=torch.long) for t in texts], 0
    )
    if targets.size(1) == 0:  # every transcript empty
        targets = torch.zeros(len(texts), 1, dtype=torch.long)
    return {
        "texts": texts,
        "targets": targets,
        "target_lens": target_lens,
        "ids": [c.id for c in cuts],
        "seconds": sum(c.duration for c in cuts),
    }


class AsrDataset(torch.utils.data.Dataset):
    """Maps a CutSet (one batch from a sampler) to a dict of tensors: ``feats`` (B, T, 80)
    CMVN-normalised fbank, ``feat_lens`` and the keys of :func:`transcripts`. Utterances come
    longest first."""

    def __init__(self, tokenizer: Tokenizer, cmvn: tuple[torch.Tensor, torch.Tensor]):
        self.tokenizer = tokenizer
        self.mean, self.std = cmvn

    def __getitem__(self, cuts: CutSet) -> dict:
        cuts = cuts.sort_by_duration(ascending=False)
        feats = [(torch.from_numpy(c.load_features()) - self.mean) / self.std for c in cuts]
        feats, feat_lens = pad_sequences(feats)
        return {"feats": feats, "feat_lens": feat_lens, **transcripts(cuts, self.tokenizer.encode)}


def cut_text(cut) -> str:
    return " ".join(s.text for s in cut.supervisions if s.text)


def ctc_feasible(cuts: CutSet, tokenizer: Tokenizer, what: str, ctc_upsample: int = 1) -> CutSet:
    """Drop utterances whose token count exceeds their CTC frame count (encoder frames after
    subsampling, times the CTC head's ``ctc_upsample``)."""

    def ok(cut) -> bool:
        frames = int(subsampled_lengths(torch.tensor(cut.num_frames))) * ctc_upsample
        return len(tokenizer.encode(cut_text(cut))) <= frames

    kept = cuts.filter(ok).to_eager()
    removed = len(cuts) - len(kept)
    if removed:
        logging.info(f"{what}: removed {removed} utterances with more tokens than encoder frames")
    return kept


def random_subset(cuts: CutSet, num_utts: int, seed: int) -> CutSet:
    """``num_utts`` utterances drawn at random (all if there are fewer), in id order."""
    if num_utts < 2:
        raise ValueError(f"a subset needs at least 2 utterances, got {num_utts}")
    ids = sorted(c.id for c in cuts)
    if num_utts < len(ids):
        rng = np.random.default_rng(seed)
        ids = sorted(rng.choice(ids, size=num_utts, replace=False).tolist())
    return cuts.subset(cut_ids=ids)


def part_of(cuts: CutSet, part: int, num_parts: int) -> CutSet:
    """Part ``part`` (1-based) of ``num_parts`` contiguous parts of ``cuts`` in id order,
    the same for every caller: the pieces a job array works on."""
    if not 1 <= part <= num_parts:
        raise ValueError(f"part {part} is not between 1 and num_parts {num_parts}")
    ids = sorted(c.id for c in cuts)
    size, extra = divmod(len(ids), num_parts)
    start = (part - 1) * size + min(part - 1, extra)
    return cuts.subset(cut_ids=ids[start : start + size + (part <= extra)])


class SkipFirst:
    """Iterate a sampler from its ``skip``-th batch on (for resuming mid-epoch)."""

    def __init__(self, sampler, skip: int = 0):
        self.sampler = sampler
        self.skip = skip

    def __iter__(self) -> Iterator[CutSet]:
        for i, batch in enumerate(self.sampler):
            if i >= self.skip:
                yield batch


# The cut sets here are small enough to hold in memory; lhotse warns about that needlessly.
warnings.filterwarnings(
    "ignore", message="You are using DynamicBucketingSampler with an eagerly read CutSet"
)


def train_sampler(
    cuts: CutSet,
    max_duration: float,
    num_buckets: int,
    seed: int,
    world_size: int = 1,
    rank: int = 0,
) -> DynamicBucketingSampler:
    """Shuffled duration-bucketed batches; deterministic given ``seed`` and the epoch."""
    return DynamicBucketingSampler(
        cuts,
        max_duration=max_duration,
        num_buckets=min(num_buckets, max(1, len(cuts) // 4)),
        shuffle=True,
        drop_last=False,
        seed=seed,
        world_size=world_size,
        rank=rank,
    )


def eval_loader(
    cuts: CutSet, dataset: torch.utils.data.Dataset, max_duration: float, num_workers: int = 0
) -> DataLoader:
    """Batches in manifest order, for evaluation and decoding."""
    sampler = SimpleCutSampler(cuts, max_duration=max_duration, shuffle=False, world_size=1, rank=0)
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers)


def length_sorted_loader(
    cuts: CutSet, dataset: torch.utils.data.Dataset, max_duration: float
) -> DataLoader:
    """Batches of similar lengths, longest first, for the passes whose result does not depend on
    the order (stage 4's dump, merged in id order; the metric searches' corpus-level CER): in
    manifest order a random subset of the built-in corpus pads to about twice its frames (and
    three times its attention)."""
    return eval_loader(cuts.sort_by_duration(ascending=False), dataset, max_duration)


def load_eval_batches(
    model,
    cuts: CutSet | str | Path,
    max_duration: float = EVAL_MAX_DURATION,
    num_utts: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Evaluation batches of ``cuts`` (a CutSet or a manifest path) in the input format of
    ``model`` (anything with a ``dataset()``, e.g. a :class:`PrunableModel`), held in memory
    for the searches that go over them many times, length-sorted (:data:`EVAL_ORDER`);
    ``num_utts``: a random subset first."""
    if not isinstance(cuts, CutSet):
        cuts = load_cuts(cuts)
    if num_utts is not None:
        if num_utts > len(cuts):
            logging.info(f"{len(cuts)} of {num_utts} requested utterances: the set has no more")
        cuts = random_subset(cuts, num_utts, seed)
    return list(length_sorted_loader(cuts, model.dataset(), max_duration))

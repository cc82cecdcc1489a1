"""Stage 1: 80-dim fbank features stored with lhotse, length filtering, global CMVN statistics."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from lhotse import CutSet, Fbank, FbankConfig, LilcomChunkyWriter

from comflp.asr.layers import MIN_INPUT_FRAMES
from comflp.utils import atomic_path, atomic_write_json

NUM_MEL_BINS = 80
SPEED_FACTORS = (0.9, 1.1)


def add_speed_perturbation(cuts: CutSet, factors: tuple[float, ...] = SPEED_FACTORS) -> CutSet:
    """``cuts`` plus one speed-perturbed copy per factor (lhotse's perturb_speed: resampled
    audio, so pitch and duration change); copies' ids end with ``_sp<factor>``."""
    combined = cuts
    for factor in factors:
        combined = combined + cuts.perturb_speed(factor)
    return combined.to_eager()


def filter_lengths(cuts: CutSet, max_duration: float, what: str) -> CutSet:
    """Drop utterances too short for the x4 subsampling or longer than ``max_duration`` s."""
    kept, too_short, too_long = [], 0, 0
    for cut in cuts:
        if cut.num_frames is not None and cut.num_frames < MIN_INPUT_FRAMES:
            too_short += 1
        elif cut.duration > max_duration:
            too_long += 1
        else:
            kept.append(cut)
    logging.info(
        f"{what}: kept {len(kept)} utterances; removed {too_short} shorter than "
        f"{MIN_INPUT_FRAMES} frames and {too_long} longer than {max_duration} s"
    )
    return CutSet.from_cuts(kept)


def compute_fbank(cuts: CutSet, out_dir: Path, name: str, nj: int, max_duration: float) -> CutSet:
    """Compute and store fbank for ``cuts``; write and return ``out_dir/cuts_<name>.jsonl.gz``.

    Features go to a fresh archive first, which replaces the old one only once the whole
    subset succeeded, so an interrupted rerun never breaks existing manifests.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"feats_{name}"
    staging = out_dir / f".feats_{name}.new"
    for path in (staging, staging.with_suffix(".new.lca")):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    extractor = Fbank(FbankConfig(num_mel_bins=NUM_MEL_BINS))
    with_feats = cuts.compute_and_store_features(
        extractor=extractor,
        storage_path=staging,
        num_jobs=nj,
        storage_type=LilcomChunkyWriter,
    )
    # LilcomChunkyWriter appends ".lca" to the storage path; with several jobs it writes a
    # directory of per-job archives instead.
    produced = {c.features.storage_path for c in with_feats}
    renames = {p: p.replace(str(staging), str(final), 1) for p in produced}
    for old, new in renames.items():
        Path(new).parent.mkdir(parents=True, exist_ok=True)
        if Path(new).exists() and Path(new).is_dir():
            shutil.rmtree(new)
        Path(old).replace(new)
    if staging.is_dir():
        shutil.rmtree(staging)

    def relocate(cut):
        cut.features.storage_path = renames[cut.features.storage_path]
        return cut

    with_feats = filter_lengths(with_feats.map(relocate), max_duration, name).to_eager()
    with atomic_path(out_dir / f"cuts_{name}.jsonl.gz") as tmp:
        with_feats.to_file(tmp)
    return with_feats


def compute_cmvn(cuts: CutSet) -> dict:
    """Global per-dimension mean and standard deviation of the features of ``cuts``."""
    total = np.zeros(NUM_MEL_BINS, dtype=np.float64)
    total_sq = np.zeros(NUM_MEL_BINS, dtype=np.float64)
    frames = 0
    for cut in cuts:
        feats = cut.load_features().astype(np.float64)
        total += feats.sum(0)
        total_sq += (feats**2).sum(0)
        frames += feats.shape[0]
    if frames == 0:
        raise ValueError("cannot compute CMVN statistics from zero frames")
    mean = total / frames
    std = np.sqrt(np.maximum(total_sq / frames - mean**2, 1e-10))
    return {"mean": mean.tolist(), "std": std.tolist(), "frames": frames}


def save_cmvn(stats: dict, path: Path) -> None:
    atomic_write_json(path, stats)


def load_cmvn(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: CMVN statistics not found (run stage 1)")
    stats = json.loads(Path(path).read_text())
    return torch.tensor(stats["mean"], dtype=torch.float32), torch.tensor(
        stats["std"], dtype=torch.float32
    )

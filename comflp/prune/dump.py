"""Stage 4: capture the encoder input and every layer's output over a calibration subset.

One forward pass per batch through the model's front end (index 0) and each encoder layer in
turn (index k = 1..L), the same calls every evaluation makes. Each batch is pooled and written at once to one Kaldi archive
per layer index (``layerKK.ark`` + ``layerKK.scp``, one key per utterance), so memory stays
that of one batch however many utterances are dumped. Pooling:

- ``mean``: the utterance-level mean over its valid (non-padding) frames, a (D,) vector;
- ``frames``: the valid frames, (T', D), or a random sample of ``frames_per_utt`` of them
  (the same frames at every layer index, drawn from a generator seeded by the utterance id).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import kaldiio
import numpy as np
import torch
from tqdm import tqdm

from comflp.adapters.base import PrunableModel
from comflp.expdir import DUMP_INFO
from comflp.utils import atomic_write_json, atomic_write_text, eval_mode

POOLINGS = ("mean", "frames")


def layer_file(dump_dir: Path, index: int) -> Path:
    return Path(dump_dir) / f"layer{index:02d}"


def _frame_sample(utt_id: str, num_frames: int, frames_per_utt: int, seed: int) -> np.ndarray:
    if frames_per_utt <= 0 or frames_per_utt >= num_frames:
        return np.arange(num_frames)
    digest = hashlib.sha1(f"{seed}/{utt_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return np.sort(rng.choice(num_frames, size=frames_per_utt, replace=False))


def _pool(
    hidden: list[torch.Tensor],
    lengths: torch.Tensor,
    ids: list[str],
    pooling: str,
    frames_per_utt: int,
    seed: int,
):
    """Per utterance of a batch: its id and one pooled array per layer index."""
    for i, utt_id in enumerate(ids):
        n = int(lengths[i])
        if pooling == "mean":
            yield utt_id, [h[i, :n].mean(0).numpy() for h in hidden]
        else:
            keep = torch.from_numpy(_frame_sample(utt_id, n, frames_per_utt, seed))
            yield utt_id, [h[i, keep].numpy() for h in hidden]


@torch.no_grad()
def dump_layers(
    model: PrunableModel,
    batches: Iterable[dict],
    out_dir: Path,
    pooling: str = "mean",
    frames_per_utt: int = 0,
    seed: int = 0,
    extra_info: dict | None = None,
) -> dict:
    """Write every layer index's pooled outputs for the utterances of ``batches`` to ``out_dir``.

    The archives are written to a staging directory that replaces ``out_dir`` only when
    complete. Returns the ``info.json`` contents (settings, utterance ids, dimensions).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    num_indices = model.num_layers + 1
    writers = [
        kaldiio.WriteHelper(f"ark,scp:{layer_file(staging, k)}.ark,{layer_file(staging, k)}.scp")
        for k in range(num_indices)
    ]
    ids: list[str] = []
    rows, dim = 0, 0
    try:
        with eval_mode(model.module):
            for batch in tqdm(batches, desc="dump layers", unit="batch", mininterval=10):
                h = model.embed(batch)
                hidden = [h.x.float().cpu()]
                for k in range(1, num_indices):
                    h = model.forward_layers(h, [k])
                    hidden.append(h.x.float().cpu())
                dim = hidden[0].size(-1)
                for utt_id, pooled in _pool(
                    hidden, h.lengths, batch["ids"], pooling, frames_per_utt, seed
                ):
                    for writer, array in zip(writers, pooled):
                        writer(utt_id, array)
                    ids.append(utt_id)
                    rows += 1 if pooling == "mean" else len(pooled[0])
    finally:
        for writer in writers:
            writer.close()
    # The scp files name their archives by path: point them at the final directory.
    for k in range(num_indices):
        scp = layer_file(staging, k).with_suffix(".scp")
        scp.write_text(scp.read_text().replace(str(staging), str(out_dir)))
    info = {
        "num_layers": model.num_layers,
        "d_model": dim,
        "pooling": pooling,
        "frames_per_utt": frames_per_utt,
        "seed": seed,
        "num_utts": len(ids),
        "num_rows": rows,
        "utts": ids,
        "seconds": time.perf_counter() - start,
        **(extra_info or {}),
    }
    atomic_write_json(staging / DUMP_INFO, info)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    logging.info(f"{out_dir}: {num_indices} layer indices x {rows} rows ({pooling} pooling)")
    return info


def load_layer_feats(dump_dir: Path) -> list[np.ndarray]:
    """The L+1 (N, D) arrays of a dump, in layer-index order, rows in utterance order."""
    dump_dir = Path(dump_dir)
    info_path = dump_dir / DUMP_INFO
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path}: not found (run stage 4, the layer dump)")
    info = json.loads(info_path.read_text())
    feats = []
    for k in range(info["num_layers"] + 1):
        table = kaldiio.load_scp(str(layer_file(dump_dir, k).with_suffix(".scp")))
        arrays = [np.atleast_2d(table[utt]) for utt in info["utts"]]
        feats.append(np.concatenate(arrays, axis=0))
    return feats


def merge_dumps(part_dirs: list[Path], out_dir: Path) -> dict:
    """Combine the dumps of a job array's parts into one dump in ``out_dir``.

    The per-layer scp files are concatenated in part order (the archives stay in the part
    directories); ``info.json`` lists every utterance, sorted by id so that the rows' order (and
    so the batches of a batched correlation) does not depend on how the work was split, and sums
    the rows and compute seconds.
    """
    infos = []
    for d in part_dirs:
        path = Path(d) / DUMP_INFO
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (run the layer dump for every part)")
        infos.append(json.loads(path.read_text()))
    settings = ("num_layers", "d_model", "pooling", "frames_per_utt", "seed")
    for d, info in zip(part_dirs, infos):
        if any(info[k] != infos[0][k] for k in settings):
            raise ValueError(f"{d}: dumped with other settings than {part_dirs[0]}")
    for k in range(infos[0]["num_layers"] + 1):
        text = "".join(layer_file(d, k).with_suffix(".scp").read_text() for d in part_dirs)
        atomic_write_text(layer_file(out_dir, k).with_suffix(".scp"), text)
    info = {
        **infos[0],
        "num_utts": sum(i["num_utts"] for i in infos),
        "num_rows": sum(i["num_rows"] for i in infos),
        "utts": sorted(u for i in infos for u in i["utts"]),
        "seconds": sum(i["seconds"] for i in infos),
        "num_parts": len(part_dirs),
    }
    atomic_write_json(Path(out_dir) / DUMP_INFO, info)
    logging.info(f"{out_dir}: merged {len(part_dirs)} part(s), {info['num_utts']} utterances")
    return info

"""Stage 4: capture a layer stack's input and every layer's output over a calibration subset.

One forward pass per batch through the stack (:meth:`LayerStack.states`: for the encoder, the
front end (index 0) and each layer in turn (index k = 1..L), the same calls every evaluation
makes). Each batch is pooled and written at once to one Kaldi archive
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

from comflp.errors import InputError
from comflp.expdir import DUMP_INFO
from comflp.prune.stacks import LayerStack
from comflp.utils import atomic_write_json, atomic_write_text, eval_mode

POOLINGS = ("mean", "frames")
POOLING = "frames"  # stage 4's --pooling
FRAMES_PER_UTT = 25  # frames pooling: rows kept per utterance (--frames_per_utt; 0: all)


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


class DumpError(InputError):
    """A layer dump that is missing, damaged or does not fit what reads it."""


def _write_pooled(
    stack: LayerStack,
    batches: Iterable[dict],
    staging: Path,
    pooling: str,
    frames_per_utt: int,
    seed: int,
) -> tuple[list[str], int, int]:
    """One archive per layer index in ``staging``; the utterance ids, rows and dimension."""
    writers = [
        kaldiio.WriteHelper(f"ark,scp:{layer_file(staging, k)}.ark,{layer_file(staging, k)}.scp")
        for k in range(stack.num_layers + 1)
    ]
    ids: list[str] = []
    rows, dim = 0, 0
    try:
        with eval_mode(stack.model.module):
            for batch in tqdm(batches, desc="dump layers", unit="batch", mininterval=10):
                states, lengths = stack.states(batch)
                hidden = [h.float().cpu() for h in states]
                dim = hidden[0].size(-1)
                for utt_id, pooled in _pool(
                    hidden, lengths, batch["ids"], pooling, frames_per_utt, seed
                ):
                    for writer, array in zip(writers, pooled, strict=True):
                        writer(utt_id, array)
                    ids.append(utt_id)
                    rows += 1 if pooling == "mean" else len(pooled[0])
    finally:
        for writer in writers:
            writer.close()
    return ids, rows, dim


@torch.no_grad()
def dump_layers(
    stack: LayerStack,
    batches: Iterable[dict],
    out_dir: Path,
    pooling: str = POOLING,
    frames_per_utt: int = FRAMES_PER_UTT,
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
    ids, rows, dim = _write_pooled(stack, batches, staging, pooling, frames_per_utt, seed)
    # The scp files name their archives by path: point them at the final directory.
    for k in range(stack.num_layers + 1):
        scp = layer_file(staging, k).with_suffix(".scp")
        scp.write_text(scp.read_text().replace(str(staging), str(out_dir)))
    info = {
        "stack": stack.name,
        "num_layers": stack.num_layers,
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
    logging.info(
        f"{out_dir}: {stack.num_layers + 1} layer indices x {rows} rows ({pooling} pooling)"
    )
    return info


def read_dump_info(dump_dir: Path) -> dict:
    """A dump's ``info.json``; DumpError when there is none."""
    path = Path(dump_dir) / DUMP_INFO
    if not path.is_file():
        raise DumpError(f"{path}: not found (run stage 4, the layer dump)")
    return json.loads(path.read_text())


def read_layer(dump_dir: Path, index: int, utts: list[str]) -> list[np.ndarray]:
    """One layer index's pooled arrays of ``utts``; DumpError names the file when it is
    missing, truncated or lacks an utterance."""
    scp = layer_file(dump_dir, index).with_suffix(".scp")
    try:  # in file order, each archive opened once (the scp lists them archive by archive)
        table = dict(kaldiio.load_scp_sequential(str(scp)))
        return [np.atleast_2d(table[utt]) for utt in utts]
    except (OSError, EOFError, ValueError, KeyError, AssertionError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DumpError(
            f"{scp}: cannot read layer {index} of the dump ({reason}); rerun stage 4"
        ) from None


def load_layer_feats(dump_dir: Path) -> list[np.ndarray]:
    """The L+1 (N, D) arrays of a dump, in layer-index order, rows in utterance order."""
    info = read_dump_info(dump_dir)
    return [
        np.concatenate(read_layer(dump_dir, k, info["utts"]), axis=0)
        for k in range(info["num_layers"] + 1)
    ]


def merge_dumps(part_dirs: list[Path], out_dir: Path) -> dict:
    """Combine the dumps of a job array's parts into one dump in ``out_dir``.

    The per-layer scp files are concatenated in part order (the archives stay in the part
    directories); ``info.json`` lists every utterance, sorted by id so that the rows' order (and
    so the batches of a batched correlation) does not depend on how the work was split, and sums
    the rows and compute seconds.
    """
    infos = [read_dump_info(d) for d in part_dirs]
    settings = ("stack", "num_layers", "d_model", "pooling", "frames_per_utt", "seed")
    for d, info in zip(part_dirs, infos, strict=True):
        if any(info[k] != infos[0][k] for k in settings):
            raise DumpError(f"{d}: dumped with other settings than {part_dirs[0]}")
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

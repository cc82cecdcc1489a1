"""Distil-Whisper's recovery of a decoder-pruned encoder-decoder (Gandhi et al. 2023): the
encoder frozen, so each utterance's encoder output is computed once and shared by teacher and
student; pseudo-labels from the teacher's greedy transcripts, dropping utterances whose
pseudo-label WER against the reference exceeds a threshold (10%, after the model's scoring
normaliser); loss = ``kl_weight`` x KL(teacher || student) over the decoder's next-token
distributions + ``ce_weight`` x cross-entropy on the targets, both per target token.

The same loop, with ``kl_weight: 0`` and ``pseudo_labels: false``, is plain fine-tuning on the
references, and with the unpruned model as the student it fine-tunes the teacher: the three
recoveries of the comparison see the same utterances and the same steps
(``egs/whisper/local/recovery.py``). Stage 8 runs it when the fine-tuning config has a
``distil:`` section (``conf/distil.yaml`` of egs/whisper). It sees models only through
:class:`~comflp.adapters.base.DecoderModel`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lhotse import CutSet
from tqdm import tqdm

from comflp.adapters.base import IGNORE, DecoderModel, Hidden
from comflp.asr.config import ConfigError, TrainConfig, build_section, read_sections
from comflp.asr.data import random_subset
from comflp.asr.scoring import error_stats
from comflp.expdir import DISTIL_RESULT
from comflp.train.trainer import lr_lambda
from comflp.utils import atomic_write_json, eval_mode


@dataclass
class DistilConfig:
    """The ``distil:`` section of a stage-8 config."""

    kl_weight: float = 0.8  # Distil-Whisper's
    ce_weight: float = 1.0
    pseudo_labels: bool = True  # targets: the teacher's transcripts (false: the references)
    max_pseudo_label_wer: float = 10.0  # drop utterances above this WER (%); Distil-Whisper's
    num_utts: int = 400  # training utterances drawn from the training set (0: all)
    batch_size: int = 16  # utterances per step (Whisper pads each to its whole window)

    def validate(self, where: str) -> None:
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise ConfigError(f"{where}: kl_weight and ce_weight must be >= 0, not both 0")
        if self.num_utts < 0 or self.batch_size < 1:
            raise ConfigError(f"{where}: num_utts must be >= 0 and batch_size >= 1")


def load_distil_config(path: Path, overrides: dict) -> tuple[DistilConfig, TrainConfig] | None:
    """The ``distil:`` and ``train:`` sections of ``path``; None when it has no ``distil:``."""
    data = read_sections(path, ("train", "distil"), overrides)
    if "distil" not in data:
        return None
    cfg = build_section(DistilConfig, data["distil"], f"{path}: distil")
    cfg.validate(f"{path}: distil")
    train = build_section(TrainConfig, data.get("train"), f"{path}: train")
    train.validate(f"{path}: train")
    return cfg, train


def has_distil_section(path: Path) -> bool:
    """Whether stage 8's config asks for a teacher (its other sections are checked by the
    loader that reads them: this one or the fine-tuning trainer's)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
    return isinstance(data, dict) and "distil" in data


@torch.no_grad()
def encode_batches(model: DecoderModel, cuts: CutSet, batch_size: int) -> list[dict]:
    """Batches of ``batch_size`` utterances with their encoder output (``memory``), computed
    once: the frozen encoder's work for every epoch and every recovery."""
    out = []
    dataset = model.dataset()
    ids = [c.id for c in cuts]
    with eval_mode(model.module):
        for start in tqdm(range(0, len(ids), batch_size), desc="encoder outputs", leave=False):
            batch = dataset[cuts.subset(cut_ids=ids[start : start + batch_size])]
            batch["memory"] = model.encode(batch)
            out.append(batch)
    return out


def _regroup(rows: list[tuple[dict, int, list[int]]], batch_size: int) -> list[dict]:
    """Training batches of ``batch_size`` kept utterances: (source batch, row, targets) each,
    their encoder outputs padded to the longest."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        frames = max(b["memory"].x.size(1) for b, _, _ in chunk)
        x = torch.stack(
            [
                torch.nn.functional.pad(b["memory"].x[r], (0, 0, 0, frames - b["memory"].x.size(1)))
                for b, r, _ in chunk
            ]
        )
        lens = torch.tensor([len(t) for _, _, t in chunk], dtype=torch.long)
        audio = {  # the inputs, for a student whose encoder trains (stage 9)
            key: torch.stack([b[key][r] for b, r, _ in chunk])
            for key in ("input_features", "frames")
        }
        targets = torch.zeros(len(chunk), max(1, int(lens.max())), dtype=torch.long)
        for i, (_, _, t) in enumerate(chunk):
            targets[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        out.append(
            {
                "ids": [b["ids"][r] for b, r, _ in chunk],
                "texts": [b["texts"][r] for b, r, _ in chunk],
                "targets": targets,
                "target_lens": lens,
                "memory": Hidden(x, torch.stack([b["memory"].lengths[r] for b, r, _ in chunk])),
                **audio,
            }
        )
    return out


@torch.no_grad()
def pseudo_labelled(
    teacher: DecoderModel, batches: list[dict], cfg: DistilConfig
) -> tuple[list[dict], dict]:
    """Training batches of the utterances whose pseudo-label (the teacher's greedy
    transcript) is within ``max_pseudo_label_wer`` of the reference, regrouped into batches of
    ``batch_size``, with the pseudo-labels as targets (or, without pseudo-labels, the
    references of the same utterances); and the filter's counts."""
    kept, total = [], 0
    with eval_mode(teacher.module):
        for batch in tqdm(batches, desc="pseudo-labels", leave=False):
            hyps = teacher.greedy_decode(batch["memory"])
            total += len(hyps)
            for r, (ref, hyp) in enumerate(zip(batch["texts"], hyps, strict=True)):
                if (
                    error_stats([ref], [teacher.decode_ids(hyp)], "word").err
                    > cfg.max_pseudo_label_wer
                ):
                    continue
                reference = batch["targets"][r, : int(batch["target_lens"][r])].tolist()
                kept.append((batch, r, hyp if cfg.pseudo_labels else reference))
    filtered = {"utterances": total, "kept": len(kept), "max_wer": cfg.max_pseudo_label_wer}
    return _regroup(kept, cfg.batch_size), filtered


def _log_probs(model: DecoderModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, outputs, lengths = model.teacher_forcing(batch)
    h = model.decoder_embed(batch["memory"], inputs, lengths)
    return model.decoder_readout(model.decoder_forward_layers(h)), outputs


def distil_loss(
    student: DecoderModel, teacher: DecoderModel | None, batch: dict, cfg: DistilConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`token_loss` of ``student`` against ``teacher``, both decoding the batch's cached
    encoder output."""
    log_probs, outputs = _log_probs(student, batch)
    target = None
    if cfg.kl_weight > 0 and teacher is not None:
        with torch.no_grad():
            target, _ = _log_probs(teacher, batch)
    return token_loss(log_probs, target, outputs, cfg)


def token_loss(
    log_probs: torch.Tensor, target: torch.Tensor | None, outputs: torch.Tensor, cfg: DistilConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """``kl_weight`` x KL(teacher || student) + ``ce_weight`` x cross-entropy, each the mean
    over the predicted tokens (``outputs`` other than :data:`IGNORE`); ``target``: the
    teacher's log-probabilities (None: no KL term)."""
    valid = outputs != IGNORE
    ce = torch.nn.functional.nll_loss(log_probs[valid], outputs[valid])
    loss, parts = cfg.ce_weight * ce, {"ce": ce.item()}
    if target is not None:
        kl = torch.nn.functional.kl_div(
            log_probs[valid], target[valid], log_target=True, reduction="batchmean"
        )
        loss = loss + cfg.kl_weight * kl
        parts["kl"] = kl.item()
    return loss, parts


def recover(
    student: DecoderModel,
    teacher: DecoderModel | None,
    batches: list[dict],
    cfg: DistilConfig,
    train: TrainConfig,
) -> list[dict]:
    """Train ``student``'s decoder (the encoder frozen) on ``batches`` for ``train.num_epochs``
    epochs in a seeded order; the loss history, a row per step."""
    if not batches:
        raise ConfigError("no training utterance left after the pseudo-label filter")
    torch.manual_seed(train.seed)
    params = [p for n, p in student.module.named_parameters() if _trains(student, n)]
    for name, p in student.module.named_parameters():
        p.requires_grad_(_trains(student, name))
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    total = train.num_epochs * len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train, total))
    history = []
    student.module.train()
    bar = tqdm(total=total, desc="recovery", leave=False)
    for epoch in range(train.num_epochs):
        for i in torch.randperm(len(batches)).tolist():
            loss, parts = distil_loss(student, teacher, batches[i], cfg)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
            optimizer.step()
            scheduler.step()
            history.append({"epoch": epoch + 1, "loss": loss.item(), **parts})
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    student.module.eval()
    for p in student.module.parameters():
        p.requires_grad_(True)
    return history


def _trains(model: DecoderModel, name: str) -> bool:
    """The decoder trains; the encoder (frozen: its outputs are cached) does not."""
    return not any(part == "encoder" for part in name.split("."))


@torch.no_grad()
def cached_error_rates(model: DecoderModel, batches: list[dict]) -> dict[str, float]:
    """WER and CER of greedy decoding from the batches' cached encoder outputs."""
    refs, hyps = [], []
    with eval_mode(model.module):
        for batch in batches:
            refs += batch["texts"]
            hyps += [model.decode_ids(h) for h in model.greedy_decode(batch["memory"])]
    return {
        "wer": error_stats(refs, hyps, "word").err,
        "cer": error_stats(refs, hyps, "char").err,
        "num_utts": len(refs),
    }


def same_encoder(a: DecoderModel, b: DecoderModel) -> bool:
    """Whether ``a`` and ``b`` have the same encoder weights (a decoder-pruned student)."""
    sa = {n: p for n, p in a.module.named_parameters() if not _trains(a, n)}
    sb = {n: p for n, p in b.module.named_parameters() if not _trains(b, n)}
    return sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)


@dataclass
class Prepared:
    """What every P of stage 8 shares: the configs, the pseudo-labelled training batches and
    the dev batches, each encoder output computed once."""

    cfg: DistilConfig
    train: TrainConfig
    batches: list[dict]
    filtered: dict
    dev: list[dict]
    seconds: float


def prepare(
    teacher: DecoderModel, train_cuts: CutSet, dev_cuts: CutSet, config: Path, overrides: dict
) -> Prepared:
    """The teacher's encoder outputs and pseudo-labels for ``config``'s ``distil:`` section."""
    cfg, train = load_distil_config(config, overrides)
    start = time.perf_counter()
    if cfg.num_utts:
        train_cuts = random_subset(train_cuts, cfg.num_utts, train.seed)
    labelled, filtered = pseudo_labelled(
        teacher, encode_batches(teacher, train_cuts, cfg.batch_size), cfg
    )
    logging.info(
        f"pseudo-labels: {filtered['kept']} of {filtered['utterances']} utterances within "
        f"{cfg.max_pseudo_label_wer:g}% WER"
    )
    dev = encode_batches(teacher, dev_cuts, cfg.batch_size)
    return Prepared(cfg, train, labelled, filtered, dev, time.perf_counter() - start)


def distil_stage(
    student: DecoderModel, teacher: DecoderModel, prepared: Prepared, out_dir: Path
) -> None:
    """Stage 8 with a teacher: recover ``student`` into ``out_dir`` (its own format), with
    :data:`DISTIL_RESULT` recording the filter, the loss history and dev error rates."""
    if not same_encoder(student, teacher):
        raise ConfigError(
            "Distil-Whisper's recovery freezes the encoder, so the student must keep the "
            "teacher's encoder (a decoder-pruned model); this one differs"
        )
    start = time.perf_counter()
    history = recover(student, teacher, prepared.batches, prepared.cfg, prepared.train)
    result = cached_error_rates(student, prepared.dev)
    logging.info(f"after recovery: dev WER {result['wer']:.2f}, CER {result['cer']:.2f}")
    student.save(out_dir, {"finetuned_from": str(student.source), "teacher": str(teacher.source)})
    atomic_write_json(
        out_dir / DISTIL_RESULT,
        {
            "distil": dataclasses.asdict(prepared.cfg),
            "train": dataclasses.asdict(prepared.train),
            "filter": prepared.filtered,
            "steps": len(history),
            "final_loss": history[-1]["loss"] if history else math.nan,
            "dev": result,
            "seconds": time.perf_counter() - start,
            "shared_seconds": prepared.seconds,  # encoder outputs and pseudo-labels, once
        },
    )

"""Stage 9 on Whisper: L0 structured pruning of both stacks with layerwise distillation from
the unpruned model, then physical pruning and the model written in its own format
(:mod:`comflp.structured.whisper`).

The config has three sections: ``structured`` (:class:`StructuredConfig`: gates, target size,
multipliers), ``distil`` (:class:`~comflp.train.distil.DistilConfig`: the pseudo-labels, the KL
and cross-entropy weights, the training utterances) and ``train`` (epochs, learning rate).
Loss per batch, on the gated student:

    kl_weight KL(teacher || student) + ce_weight CE(pseudo-labels)      (Distil-Whisper's)
    + distill_weight x layerwise distillation, the mean of both stacks' (:mod:`.distill`)
    + lambda1 (s - t) + lambda2 (s - t)^2                                (:mod:`.lagrangian`)

with ``s`` the expected sparsity of both stacks' layer parameters. The encoder trains, so each
step runs both models on whole 30 s windows: the budget is the utterances and steps of the
config. A checkpoint after every epoch lets a stopped run continue (``--resume``).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path

import torch
from lhotse import CutSet
from tqdm import tqdm

from comflp.adapters.whisper import WhisperAdapter
from comflp.asr.config import ConfigError, TrainConfig, build_section, read_sections
from comflp.asr.data import random_subset
from comflp.expdir import FINAL_DEV, HISTORY, LATEST_CHECKPOINT, STRUCTURE
from comflp.structured.config import StructuredConfig
from comflp.structured.distill import LayerDistiller, default_layers
from comflp.structured.lagrangian import Lagrangian, constant_lr, target_at
from comflp.structured.masked import Gates
from comflp.structured.params import layout_parameters
from comflp.structured.plan import kept_parameters, meet_budget, module_plans
from comflp.structured.whisper import (
    STACKS,
    WhisperMasker,
    layer_parameters,
    physically_prune_whisper,
    whisper_gates,
    whisper_layout,
)
from comflp.train.distil import (
    DistilConfig,
    cached_error_rates,
    encode_batches,
    pseudo_labelled,
    token_loss,
)
from comflp.train.trainer import lr_lambda
from comflp.utils import atomic_save, atomic_write_json


def load_whisper_structured_config(
    path: Path, overrides: dict
) -> tuple[StructuredConfig, DistilConfig, TrainConfig]:
    """The three sections of ``path`` (``overrides``: ``"section.key"`` -> value)."""
    data = read_sections(path, ("structured", "distil", "train"), overrides)
    sp = build_section(StructuredConfig, data.get("structured"), f"{path}: structured")
    distil = build_section(DistilConfig, data.get("distil"), f"{path}: distil")
    distil.validate(f"{path}: distil")
    train = build_section(TrainConfig, data.get("train"), f"{path}: train")
    train.validate(f"{path}: train")
    return sp, distil, train


def distilled_layers(model: WhisperAdapter, sp: StructuredConfig) -> list[str]:
    """The labels of the layers distilled: ``distill_layers`` (or L/3, 2L/3, L) of each stack."""
    depth = {"encoder": model.num_layers, "decoder": model.num_decoder_layers}
    return [
        f"{prefix}{k}"
        for stack, prefix in STACKS.items()
        for k in (sp.distill_layers or default_layers(depth[stack]))
        if k <= depth[stack]
    ]


def _hidden(model: WhisperAdapter, batch: dict, layers: list[str] | None = None):
    """Log-probabilities, targets and, for ``layers``, each layer's output (run one layer at a
    time: a teacher's outputs without hooks)."""
    out, h = {}, model.embed(batch)
    for k in range(1, model.num_layers + 1):
        h = model.forward_layers(h, [k])
        out[f"e{k}"] = h.x
    inputs, outputs, lengths = model.teacher_forcing(batch)
    d = model.decoder_embed(model.memory(h), inputs.to(h.x.device), lengths)
    for k in range(1, model.num_decoder_layers + 1):
        d = model.decoder_forward_layers(d, [k])
        out[f"d{k}"] = d.x
    log_probs = model.decoder_readout(d)
    keep = layers if layers is not None else list(out)
    return log_probs, outputs.to(log_probs.device), {k: out[k] for k in keep}, lengths, h.x.size(1)


class WhisperPruner:
    """The gated student, its teacher, the distillation maps and the optimiser of one run."""

    def __init__(
        self,
        student: WhisperAdapter,
        teacher: WhisperAdapter,
        sp: StructuredConfig,
        distil: DistilConfig,
        train: TrainConfig,
        total_steps: int,
    ):
        self.student, self.teacher, self.sp, self.distil = student, teacher, sp, distil
        hf = student.hf
        self.gates: Gates = whisper_gates(hf, sp.gates, sp.init_log_alpha)
        self.layers = distilled_layers(student, sp)
        d = hf.config.d_model
        self.distillers = torch.nn.ModuleDict(
            {
                stack: LayerDistiller(d, [k for k in self.layers if k.startswith(prefix)])
                for stack, prefix in STACKS.items()
            }
        )
        self.lagrangian = Lagrangian()
        self.masker = WhisperMasker(hf, self.gates, capture=self.layers)
        self.prunable = int(
            round(float(layout_parameters(self.gates.layout, self.gates.sizes, {})))
        )
        self.total_steps = total_steps
        self.warmup_steps = round(sp.warmup_fraction * total_steps)
        self.params = list(hf.parameters())
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.params, "weight_decay": train.weight_decay},
                {"params": self.distillers.parameters(), "weight_decay": 0.0},
                {"params": self.gates.parameters(), "lr": sp.gate_lr, "weight_decay": 0.0},
                {
                    "params": self.lagrangian.parameters(),
                    "lr": sp.lambda_lr,
                    "weight_decay": 0.0,
                    "maximize": True,
                },
            ],
            lr=train.lr,
        )
        schedule = lr_lambda(train, total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, [schedule, schedule, constant_lr, constant_lr]
        )
        self.grad_clip = train.grad_clip
        self.step = 0

    def expected_sparsity(self) -> torch.Tensor:
        remaining = layout_parameters(
            self.gates.layout, self.gates.sizes, self.gates.probabilities()
        )
        return 1 - remaining / self.prunable

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimiser step on ``batch``; the loss and its parts."""
        self.student.hf.train()
        log_probs, outputs, _, lengths, frames = _hidden(self.student, batch, [])
        with torch.no_grad():
            self.teacher.hf.eval()
            target, _, teacher, _, _ = _hidden(self.teacher, batch, self.layers)
        kl_target = target if self.distil.kl_weight > 0 else None
        tokens, parts = token_loss(log_probs, kl_target, outputs, self.distil)
        full = torch.full_like(lengths, frames)
        enc = self.distillers["encoder"](self.masker.hidden, teacher, full)
        dec = self.distillers["decoder"](self.masker.hidden, teacher, lengths)
        expected = self.expected_sparsity()
        target_sparsity = target_at(self.step, self.warmup_steps, self.sp.target_sparsity)
        loss = (
            tokens
            + self.sp.distill_weight * (enc + dec) / 2
            + self.lagrangian(expected, target_sparsity)
        )
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.gates.clamp_()
        self.step += 1
        return {
            "loss": loss.item(),
            **parts,
            "distill": ((enc + dec) / 2).item(),
            "expected_sparsity": expected.item(),
            "target_sparsity": target_sparsity,
        }

    def state(self) -> dict:
        return {
            "model": self.student.hf.state_dict(),
            "gates": self.gates.state_dict(),
            "distillers": self.distillers.state_dict(),
            "lagrangian": self.lagrangian.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
        }

    def restore(self, ckpt: dict) -> None:
        self.student.hf.load_state_dict(ckpt["model"])
        self.gates.load_state_dict(ckpt["gates"])
        self.distillers.load_state_dict(ckpt["distillers"])
        self.lagrangian.load_state_dict(ckpt["lagrangian"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = ckpt["step"]


def _settings(sp: StructuredConfig, distil: DistilConfig, train: TrainConfig) -> dict:
    return {
        "structured": sp.to_dict(),
        "distil": dataclasses.asdict(distil),
        "train": dataclasses.asdict(train),
    }


def _resume(pruner: WhisperPruner, path: Path, settings: dict) -> tuple[int, list[dict]]:
    """The epochs done and their history from ``path`` (none when it does not exist)."""
    if not path.is_file():
        return 0, []
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt["settings"] != settings:
        raise ConfigError(
            f"--resume {path}: written with another config; resume with the same config or "
            "use a new --exp_dir"
        )
    pruner.restore(ckpt)
    logging.info(f"{path}: resuming after epoch {ckpt['epoch']} (step {pruner.step})")
    return ckpt["epoch"], ckpt["history"]


def structured_whisper(
    student: WhisperAdapter,
    teacher: WhisperAdapter,
    train_cuts: CutSet,
    dev_cuts: CutSet,
    config: tuple[StructuredConfig, DistilConfig, TrainConfig],
    out_dir: Path,
    resume: bool = True,
    where: str = "structured",
) -> dict:
    """Prune ``student`` (a copy of ``teacher``) to ``config``'s target sparsity into
    ``out_dir``: the model in its format, :data:`STRUCTURE`, :data:`HISTORY`, :data:`FINAL_DEV`;
    the structure record. ``where`` names the config in errors."""
    sp, distil, train = config
    depth = max(student.num_layers, student.num_decoder_layers)
    sp.check(whisper_layout(student.hf), depth, where, "Whisper")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cuts = random_subset(train_cuts, distil.num_utts, train.seed) if distil.num_utts else train_cuts
    batches, filtered = pseudo_labelled(
        teacher, encode_batches(teacher, cuts, distil.batch_size), distil
    )
    if not batches:
        raise ConfigError("no training utterance left after the pseudo-label filter")
    for batch in batches:
        del batch["memory"]  # the student's encoder trains: each step encodes again
    logging.info(
        f"pseudo-labels: {filtered['kept']} of {filtered['utterances']} utterances within "
        f"{distil.max_pseudo_label_wer:g}% WER"
    )
    pruner = WhisperPruner(student, teacher, sp, distil, train, train.num_epochs * len(batches))
    settings = _settings(sp, distil, train)
    checkpoint = out_dir / LATEST_CHECKPOINT
    done, history = _resume(pruner, checkpoint, settings) if resume else (0, [])
    torch.manual_seed(train.seed)
    orders = [torch.randperm(len(batches)).tolist() for _ in range(train.num_epochs)]
    bar = tqdm(total=pruner.total_steps, initial=pruner.step, desc="structured", leave=False)
    for epoch in range(done, train.num_epochs):
        rows = []
        for i in orders[epoch]:
            rows.append(pruner.train_step(batches[i]))
            bar.update()
            bar.set_postfix(
                loss=f"{rows[-1]['loss']:.3f}", s=f"{rows[-1]['expected_sparsity']:.2f}"
            )
        history.append(
            {"epoch": epoch + 1, **{k: statistics.fmean(r[k] for r in rows) for k in rows[0]}}
        )
        logging.info(
            f"epoch {epoch + 1}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items() if k != "epoch")
        )
        state = {**pruner.state(), "epoch": epoch + 1, "history": history, "settings": settings}
        atomic_save(lambda tmp, state=state: torch.save(state, tmp), checkpoint)
    bar.close()
    structure = finish(pruner, dev_cuts, out_dir, history, filtered, time.perf_counter() - start)
    checkpoint.unlink()  # the model is written: the training state is no longer needed
    return structure


def finish(
    pruner: WhisperPruner,
    dev_cuts: CutSet,
    out_dir: Path,
    history: list[dict],
    filtered: dict,
    seconds: float,
) -> dict:
    """Physically prune at the target, score on dev, write the model and its records."""
    pruner.masker.remove()
    sp, student = pruner.sp, pruner.student
    values = meet_budget(pruner.gates, sp.target_sparsity)
    pruned = student._with(physically_prune_whisper(student.hf, pruner.gates, values=values))
    dev = cached_error_rates(pruned, encode_batches(pruned, dev_cuts, pruner.distil.batch_size))
    kept = kept_parameters(pruner.gates, values)
    removed = module_plans(pruner.gates, values)[1]
    structure = {
        "target_sparsity": sp.target_sparsity,
        "sparsity": 1 - kept / pruner.prunable,
        "expected_sparsity": float(pruner.expected_sparsity().detach()),
        "prunable_parameters": pruner.prunable,
        "layer_parameters": kept,  # the structure's count; a module with nothing left goes
        "stored_layer_parameters": layer_parameters(pruned.hf),  # + one zero head per such module
        "parameters": pruned.num_parameters(),
        "unpruned_parameters": pruner.teacher.num_parameters(),
        "kept_layers": {  # numbered as in the unpruned model
            stack: [int(k[1:]) for k in pruner.gates.layout if k[0] == p and k not in removed]
            for stack, p in STACKS.items()
        },
        "layers": whisper_layout(pruned.hf),  # heads and units of each layer kept, renumbered
        "num_layers": pruned.num_layers,
        "num_decoder_layers": pruned.num_decoder_layers,
        "pseudo_labels": filtered,
        "steps": pruner.step,
        "seconds": seconds,
    }
    pruned.save(out_dir, {"structured": sp.to_dict(), "teacher": str(pruner.teacher.source)})
    atomic_write_json(out_dir / HISTORY, history)
    atomic_write_json(out_dir / STRUCTURE, structure)
    atomic_write_json(out_dir / FINAL_DEV, {"structured": True, **dev})
    logging.info(
        f"{out_dir}: {kept:,} of {pruner.prunable:,} layer parameters kept (sparsity "
        f"{structure['sparsity']:.3f}, target {sp.target_sparsity}); encoder "
        f"{pruned.num_layers} layers, decoder {pruned.num_decoder_layers}; dev WER "
        f"{dev['wer']:.2f}%, CER {dev['cer']:.2f}%"
    )
    return structure

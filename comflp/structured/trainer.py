"""Stage 9: L0 structured pruning of a trained model (Jiang et al. 2023), trained like any
other run (resume, checkpoints, progress bar, TensorBoard), physically pruned at the end.

The student starts as a copy of the teacher (the baseline) with hard-concrete gates on it
(:mod:`comflp.structured.masked`). Loss per batch:

    CTC (+ intermediate CTC, as configured)
    + distill_weight * layerwise distillation from the frozen teacher (:mod:`.distill`)
    + lambda1 (s - t) + lambda2 (s - t)^2    (:mod:`.lagrangian`)

with ``s`` the expected sparsity of the encoder layers' parameters (:mod:`.params`) and ``t``
ramped from 0 to ``target_sparsity`` over the first ``warmup_fraction`` of the steps. One Adam
optimiser holds four groups: the model and the distillation maps (the training config's
learning rate and schedule), the gates (``gate_lr``, constant) and the multipliers
(``lambda_lr``, constant, ``maximize=True``). At the end the gates become deterministic and the
model is physically pruned into ``model.pt`` (no checkpoint averaging: the gates of different
epochs choose different structures).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lhotse import CutSet

from comflp.adapters.native import NativeModel
from comflp.asr.checkpoint import save_model
from comflp.asr.config import ConfigError, ExperimentConfig
from comflp.asr.model import ASRModel, count_parameters
from comflp.asr.tokenizer import Tokenizer
from comflp.expdir import FINAL_DEV, MODEL, STRUCTURE, TRAINING_CURVES
from comflp.prune.evaluator import evaluate_model
from comflp.structured.config import StructuredConfig
from comflp.structured.distill import LayerDistiller, default_layers, teacher_hidden
from comflp.structured.lagrangian import Lagrangian, constant_lr, target_at
from comflp.structured.masked import GateSet, Masker
from comflp.structured.params import (
    encoder_layer_parameters,
    expected_parameters,
    prunable_parameters,
    sparsity,
)
from comflp.structured.physical import physically_prune
from comflp.train.distributed import Dist
from comflp.train.trainer import Trainer, lr_lambda
from comflp.utils import atomic_write_json


def check_teacher(teacher: ASRModel, student: ASRModel, where: str) -> None:
    """The student must start as the teacher: same architecture and parameter shapes."""
    t_shapes = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    s_shapes = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    if t_shapes != s_shapes:
        differ = sorted(set(t_shapes) ^ set(s_shapes)) or sorted(
            k for k in t_shapes if t_shapes[k] != s_shapes[k]
        )
        raise ConfigError(
            f"{where}: the teacher's shape differs from the student's initialisation "
            f"(first difference: {differ[0]}); distil from the model being pruned"
        )


class StructuredTrainer(Trainer):
    """A :class:`Trainer` whose model carries gates, with distillation and sparsity control."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        sp: StructuredConfig,
        exp_dir: Path,
        train_cuts: CutSet,
        dev_cuts: CutSet,
        tokenizer: Tokenizer,
        cmvn: tuple[torch.Tensor, torch.Tensor],
        teacher: ASRModel,
        device: str = "cpu",
    ):
        super().__init__(cfg, exp_dir, train_cuts, dev_cuts, tokenizer, cmvn, device, False, Dist())
        sp.validate(cfg.model)
        self.sp = sp
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.layers = sp.distill_layers or default_layers(cfg.model.num_layers)
        self.gates = GateSet(cfg.model, sp.gates, sp.init_log_alpha).to(device)
        self.distiller = LayerDistiller(cfg.model.d_model, self.layers).to(device)
        self.lagrangian = Lagrangian().to(device)
        self.masker = Masker(self.model, self.gates, capture=self.layers)
        self.prunable = prunable_parameters(cfg.model)
        self.warmup_steps = round(sp.warmup_fraction * self.total_steps)
        self.optimizer = torch.optim.Adam(
            [
                {"params": self.model.parameters(), "weight_decay": self.tc.weight_decay},
                {"params": self.distiller.parameters()},
                {"params": self.gates.parameters(), "lr": sp.gate_lr},
                {"params": self.lagrangian.parameters(), "lr": sp.lambda_lr, "maximize": True},
            ],
            lr=self.tc.lr,
            betas=(0.9, 0.98),
            eps=1e-9,
            fused=True,
        )
        schedule = lr_lambda(self.tc, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, [schedule, schedule, constant_lr, constant_lr]
        )

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """CTC of the gated student + distillation + the Lagrangian sparsity term."""
        feats = self.input_features(batch)
        loss, stats = self.model_loss(feats, batch)
        teacher, lengths = teacher_hidden(
            self.teacher, feats, batch["feat_lens"].to(self.device), self.layers
        )
        distill = self.distiller(self.masker.hidden, teacher, lengths)
        expected = self.expected_sparsity()
        target = target_at(self.step, self.warmup_steps, self.sp.target_sparsity)
        total = loss + self.sp.distill_weight * distill + self.lagrangian(expected, target)
        stats.update(
            ctc_total=stats["loss"],
            distill=distill.item(),
            expected_sparsity=expected.item(),
            target_sparsity=target,
            lambda1=self.lagrangian.lambda1.item(),
            lambda2=self.lagrangian.lambda2.item(),
            loss=total.item(),
        )
        return total, stats

    def expected_sparsity(self) -> torch.Tensor:
        """Expected fraction of the encoder layers' parameters the gates remove."""
        remaining = expected_parameters(self.cfg.model, self.gates.probabilities())
        return sparsity(remaining, self.prunable)

    def update(self, loss: torch.Tensor) -> torch.Tensor:
        grad_norm = super().update(loss)
        self.gates.clamp_()
        return grad_norm

    def checkpoint_state(self) -> dict:
        return {
            **super().checkpoint_state(),
            "gates": self.gates.state_dict(),
            "distiller": self.distiller.state_dict(),
            "lagrangian": self.lagrangian.state_dict(),
            "structured": self.sp.to_dict(),
        }

    def restore_state(self, ckpt: dict, path: Path) -> None:
        saved = ckpt.get("structured")
        if saved != self.sp.to_dict():
            changed = sorted(
                k for k in self.sp.to_dict() if (saved or {}).get(k) != getattr(self.sp, k)
            )
            raise ConfigError(
                f"--resume {path}: written with another structured config (differs in "
                f"{', '.join(changed)}); resume with the same config or use a new --exp_dir"
            )
        super().restore_state(ckpt, path)
        self.gates.load_state_dict(ckpt["gates"])
        self.distiller.load_state_dict(ckpt["distiller"])
        self.lagrangian.load_state_dict(ckpt["lagrangian"])

    def finish(self) -> dict:
        """Physically prune with the deterministic gates, score on dev, write ``model.pt``,
        ``structure.json``, ``final_dev.json`` and the curves."""
        self.masker.remove()
        pruned = physically_prune(self.model, self.gates, self.sp.target_sparsity)
        native = NativeModel(pruned, self.tokenizer, self.cmvn, self.exp_dir, self.cfg)
        metrics = evaluate_model(native, self.dev).to_dict()
        structure = self.structure(pruned)
        save_model(
            pruned,
            ExperimentConfig(model=pruned.cfg, train=self.tc),
            self.exp_dir,
            extra={"structured": self.sp.to_dict(), "dev": metrics},
        )
        atomic_write_json(self.exp_dir / STRUCTURE, structure)
        atomic_write_json(self.exp_dir / FINAL_DEV, {"structured": True, **metrics})
        logging.info(
            f"{self.exp_dir / MODEL}: {structure['encoder_layer_parameters']:,} of "
            f"{structure['prunable_parameters']:,} encoder-layer parameters kept (sparsity "
            f"{structure['sparsity']:.3f}, target {self.sp.target_sparsity}), "
            f"{structure['num_layers']} layers; dev CER {metrics['cer']:.2f}%, "
            f"dev WER {metrics['wer']:.2f}%"
        )
        from comflp.plots import plot_training_curves

        plot_training_curves(self.history, self.exp_dir / TRAINING_CURVES, final_cer=metrics["cer"])
        return metrics

    def structure(self, pruned: ASRModel) -> dict:
        """What the pruning kept: per layer sizes, parameter counts, sparsity."""
        kept = encoder_layer_parameters(pruned)
        return {
            "target_sparsity": self.sp.target_sparsity,
            "sparsity": float(sparsity(kept, self.prunable)),
            "expected_sparsity": float(self.expected_sparsity()),
            "prunable_parameters": self.prunable,
            "encoder_layer_parameters": kept,
            "parameters": count_parameters(pruned),
            "unpruned_parameters": count_parameters(self.teacher),
            "num_layers": pruned.cfg.num_layers,
            "kept_layers": pruned.cfg.kept_layers,
            "layer_shapes": pruned.cfg.layer_shapes,
        }


def structured_prune(
    cfg: ExperimentConfig,
    sp: StructuredConfig,
    exp_dir: Path,
    train_cuts: CutSet,
    dev_cuts: CutSet,
    tokenizer: Tokenizer,
    cmvn: tuple[torch.Tensor, torch.Tensor],
    init_state: dict,
    teacher: ASRModel,
    *,
    device: str = "cpu",
    resume: bool = True,
    stop_after_steps: int = 0,
) -> bool:
    """Prune ``cfg.model`` (initialised from ``init_state``) in ``exp_dir``. True when done
    (``model.pt`` is the physically pruned model), False when stopped with a checkpoint."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    trainer = StructuredTrainer(
        cfg, sp, exp_dir, train_cuts, dev_cuts, tokenizer, cmvn, teacher, device
    )
    check_teacher(teacher, trainer.model, "--teacher")
    trainer.restore(resume, init_state)
    return trainer.run(stop_after_steps)

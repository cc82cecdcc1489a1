"""Stage 3 (and 8): train a model, checkpoint every epoch, resume exactly, average at the end.

Resuming restores the model, optimiser, learning-rate schedule, the sampler's position in the
epoch and every random generator, so an interrupted run ends with the same parameters as an
uninterrupted one. Works in one process or under ``torchrun`` (DDP: gloo on CPU, nccl on GPU);
only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from contextlib import closing, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from lhotse import CutSet
from lhotse.dataset import SpecAugment
from torch.utils.data import DataLoader
from tqdm import tqdm

from comflp.adapters.base import PrunableModel
from comflp.adapters.native import NativeModel
from comflp.asr.checkpoint import (
    average_state_dicts,
    epoch_checkpoints,
    load_checkpoint,
    load_state_into,
    save_checkpoint,
    save_model,
)
from comflp.asr.config import ConfigError, ExperimentConfig, TrainConfig, save_config
from comflp.asr.data import AsrDataset, SkipFirst, eval_loader, train_sampler
from comflp.asr.model import ASRModel, count_parameters
from comflp.asr.tokenizer import Tokenizer
from comflp.expdir import (
    CONFIG,
    FINAL_DEV,
    HISTORY,
    LATEST_CHECKPOINT,
    MODEL,
    TENSORBOARD,
    TRAIN_CONFIG,
    TRAINING_CURVES,
)
from comflp.prune.evaluator import evaluate_model
from comflp.train.distributed import Dist
from comflp.utils import (
    atomic_write_json,
    atomic_write_text,
    rng_state,
    seed_everything,
    set_rng_state,
)


def lr_lambda(train: TrainConfig, total_steps: int):
    """Linear warm-up to the peak, then inverse square-root decay (noam) or a cosine decay
    reaching ``min_lr`` at ``total_steps`` (cosine); never below ``min_lr``."""
    floor = train.min_lr / train.lr
    warmup = train.warmup_steps

    def factor(step: int) -> float:
        step = max(step, 1)
        if step < warmup:
            return max(floor, step / warmup)
        if train.lr_schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return max(floor, math.sqrt(warmup / step)) if warmup else 1.0

    return factor


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Adam:
    """Adam as the trainer uses it; the fused kernel (one pass over all parameters) makes the
    update about 3x cheaper on CPU than torch's per-tensor loop."""
    return torch.optim.Adam(
        model.parameters(),
        lr=train.lr,
        betas=(0.9, 0.98),
        eps=1e-9,
        weight_decay=train.weight_decay,
        fused=True,
    )


def latest_checkpoint(exp_dir: Path) -> Path | None:
    """The checkpoint with the most optimiser steps: the newest epoch one or the mid-epoch one."""
    candidates = epoch_checkpoints(exp_dir)
    if (exp_dir / LATEST_CHECKPOINT).is_file():
        candidates.append(exp_dir / LATEST_CHECKPOINT)
    if not candidates:
        return None
    return max(candidates, key=lambda p: load_checkpoint(p)["step"])


class _StopRequest:
    """Turns SIGTERM/SIGINT into a request to checkpoint and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal stops at once
            raise KeyboardInterrupt
        logging.warning(f"signal {signum}: saving a checkpoint after this step, then stopping")
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _epoch_sampler(cuts: CutSet, tc: TrainConfig, dist_info: Dist, epoch: int):
    """This rank's batches of one epoch; ``max_duration`` is shared by the ranks."""
    sampler = train_sampler(
        cuts,
        tc.max_duration / dist_info.world_size,
        tc.num_buckets,
        tc.seed,
        dist_info.world_size,
        dist_info.rank,
    )
    sampler.set_epoch(epoch)
    return sampler


def _should_stop(signalled: bool, step_limit: bool, dist_info: Dist, device: str) -> bool:
    """Whether to checkpoint and stop now; under DDP every rank agrees (a signal may reach
    the ranks at different steps, and a rank leaving alone would hang the others)."""
    if dist_info.world_size == 1:
        return signalled or step_limit
    flag = torch.tensor([float(signalled or step_limit)], device=device)  # nccl needs it on the GPU
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class Trainer:
    """One training run in ``exp_dir``: restore, then ``train_one_epoch`` and ``validate``
    until the last epoch, saving a checkpoint after each; ``finish`` averages them."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        exp_dir: Path,
        train_cuts: CutSet,
        dev_cuts: CutSet,
        tokenizer: Tokenizer,
        cmvn: tuple[torch.Tensor, torch.Tensor],
        device: str,
        amp: bool,
        dist_info: Dist,
    ):
        self.cfg, self.tc, self.exp_dir = cfg, cfg.train, exp_dir
        self.train_cuts, self.tokenizer, self.cmvn = train_cuts, tokenizer, cmvn
        self.device, self.dist = device, dist_info
        seed_everything(self.tc.seed)
        self.model = self.build_model().to(device)
        self.optimizer = make_optimizer(self.model, self.tc)
        self.steps_per_epoch = sum(1 for _ in _epoch_sampler(train_cuts, self.tc, dist_info, 1))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.tc, self.total_steps)
        )
        self.epoch, self.batches_done, self.step = 1, 0, 0
        self.history: list[dict] = []
        self.sums: dict[str, float] = {}  # running sums of the logged losses over the epoch
        self.dataset = self.build_dataset()
        self.dev = eval_loader(dev_cuts, self.dataset, self.tc.max_duration, self.tc.num_workers)
        self.spec_augment = _spec_augment(self.tc)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if amp and device.startswith("cuda")
            else nullcontext()
        )
        self.writer = None
        self.ddp_model: torch.nn.Module = self.model

    def build_model(self) -> torch.nn.Module:
        """The network trained (comflp's own ASRModel of the config's model section)."""
        return ASRModel(self.cfg.model)

    def build_dataset(self) -> torch.utils.data.Dataset:
        """Maps a sampler's CutSet to a batch dict (features, targets)."""
        return AsrDataset(self.tokenizer, self.cmvn)

    def write_config(self) -> None:
        save_config(self.cfg, self.exp_dir / CONFIG)

    @property
    def total_steps(self) -> int:
        return self.tc.num_epochs * self.steps_per_epoch

    def restore(self, resume: bool, init_state: dict | None) -> None:
        """Continue from the latest checkpoint, or start from ``init_state`` / at random."""
        ckpt_path = latest_checkpoint(self.exp_dir) if resume else None
        if ckpt_path is None and any(self.exp_dir.glob("epoch-*.pt")):
            raise ConfigError(
                f"{self.exp_dir}: holds checkpoints of an earlier run; pass --resume true to "
                "continue it, or choose another experiment directory"
            )
        if ckpt_path is None:
            if init_state is not None:
                load_state_into(self.model, init_state, "initial weights")
            return
        ckpt = load_checkpoint(ckpt_path)
        self.restore_state(ckpt, ckpt_path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch, self.batches_done, self.step = ckpt["epoch"], ckpt["batches_done"], ckpt["step"]
        self.history, self.sums = ckpt["history"], ckpt["epoch_sums"]
        # Under DDP every rank resumes its own generators (dropout, stochastic depth and
        # SpecAugment draw different numbers on each rank).
        rank_states = ckpt.get("rng_per_rank") or []
        same_world = len(rank_states) == self.dist.world_size
        set_rng_state(rank_states[self.dist.rank] if same_world else ckpt["rng"])
        logging.info(
            f"resumed from {ckpt_path}: epoch {self.epoch}, {self.batches_done} batches into it, "
            f"step {self.step}"
        )

    def restore_state(self, ckpt: dict, path: Path) -> None:
        """Load what a checkpoint holds besides the optimiser, schedule and counters."""
        load_state_into(self.model, ckpt["model"], f"--resume {path}")

    def checkpoint_state(self) -> dict:
        """What a checkpoint holds besides the counters and random states."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": self.cfg.to_dict(),
        }

    def start(self) -> None:
        """Write the config, open TensorBoard, wrap the model for DDP."""
        self.first_step = self.step  # stop_after_steps counts from here
        if self.dist.is_main:
            self.write_config()
            logging.info(f"model: {count_parameters(self.model):,} parameters; {self.describe()}")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.exp_dir / TENSORBOARD), purge_step=self.step + 1)
        if self.dist.world_size > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.dist.local_rank] if self.device.startswith("cuda") else None,
                find_unused_parameters=True,  # stochastic depth skips whole layers
            )

    def describe(self) -> str:
        return str(self.cfg.model)

    def save(self, path: Path, epoch: int, batches_done: int) -> None:
        """Checkpoint everything needed to resume exactly (every rank's random state)."""
        rank_states = None
        if self.dist.world_size > 1:
            rank_states = [None] * self.dist.world_size
            dist.all_gather_object(rank_states, rng_state())
        if self.dist.is_main:
            save_checkpoint(
                {
                    **self.checkpoint_state(),
                    "epoch": epoch,
                    "batches_done": batches_done,
                    "step": self.step,
                    "rng": rng_state(),
                    "rng_per_rank": rank_states,
                    "history": self.history,
                    "epoch_sums": self.sums if batches_done else {},
                },
                path,
            )

    def input_features(self, batch: dict) -> torch.Tensor:
        """The batch's features on the device, SpecAugment applied when configured."""
        feats = batch["feats"]
        if self.spec_augment is not None:
            feats = _augment(self.spec_augment, feats, batch["feat_lens"])
        return feats.to(self.device)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The training loss of one batch and its parts for logging."""
        return self.model_loss(self.input_features(batch), batch)

    def model_loss(self, feats: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        """The model's own loss on these (possibly augmented) features."""
        with self.autocast:
            return self.ddp_model(
                feats,
                batch["feat_lens"].to(self.device),
                batch["targets"].to(self.device),
                batch["target_lens"].to(self.device),
            )

    def update(self, loss: torch.Tensor) -> torch.Tensor:
        """Back-propagate, clip, step the optimiser and the schedule; the gradient norm."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:
            logging.warning(f"step {self.step + 1}: non-finite gradient norm, update skipped")
        self.scheduler.step()
        return grad_norm

    def train_step(self, batch: dict) -> None:
        """One optimiser step on one batch, with its logging."""
        loss, stats = self.compute_loss(batch)
        grad_norm = self.update(loss)
        self.step += 1
        self.batches_done += 1
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if self.writer is not None and self.step % 10 == 0:
            for k, v in stats.items():
                self.writer.add_scalar(f"train/{k}", v, self.step)
            self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.step)
            self.writer.add_scalar("train/grad_norm", float(grad_norm), self.step)
        self.last_loss = stats["loss"]

    def train_one_epoch(self, stop: _StopRequest, stop_after_steps: int) -> bool:
        """The rest of the current epoch; False when stopped early (checkpoint written)."""
        sampler = _epoch_sampler(self.train_cuts, self.tc, self.dist, self.epoch)
        loader = DataLoader(
            self.dataset,
            sampler=SkipFirst(sampler, self.batches_done),
            batch_size=None,
            num_workers=self.tc.num_workers,
            worker_init_fn=_worker_init,
            generator=torch.Generator().manual_seed(self.tc.seed + self.epoch),
        )
        self.model.train()
        bar = tqdm(
            loader,
            desc=f"epoch {self.epoch}/{self.tc.num_epochs}",
            disable=not self.dist.is_main,
            initial=self.batches_done,
            mininterval=2 if os.isatty(2) else 60,
            unit="batch",
        )
        with closing(bar):
            for batch in bar:
                self.train_step(batch)
                lr = self.scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{self.last_loss:.2f}", lr=f"{lr:.2e}", refresh=False)
                if self.tc.save_every_n_steps and self.step % self.tc.save_every_n_steps == 0:
                    self.save(self.exp_dir / LATEST_CHECKPOINT, self.epoch, self.batches_done)
                step_limit = (
                    bool(stop_after_steps) and self.step - self.first_step >= stop_after_steps
                )
                if _should_stop(stop.requested, step_limit, self.dist, self.device):
                    self.save(self.exp_dir / LATEST_CHECKPOINT, self.epoch, self.batches_done)
                    logging.info(
                        f"stopped at step {self.step} (epoch {self.epoch}, batch "
                        f"{self.batches_done}); rerun with --resume true to continue"
                    )
                    return False
        return True

    def validate(self) -> dict:
        """Dev CTC loss, CER and WER of the current model (greedy CTC, every layer)."""
        native = NativeModel(self.model, self.tokenizer, self.cmvn, self.exp_dir, self.cfg)
        return evaluate_model(native, self.dev).to_dict()

    def end_epoch(self, train_time: float) -> None:
        """Validate, record the epoch, checkpoint it, move on to the next."""
        record = {
            "epoch": self.epoch,
            "step": self.step,
            "lr": self.scheduler.get_last_lr()[0],
            "train_time": train_time,
        }
        record.update({f"train_{k}": v / max(self.batches_done, 1) for k, v in self.sums.items()})
        if self.dist.is_main:
            dev = self.validate()
            record.update({f"dev_{k}": dev[k] for k in ("loss", "cer", "wer")})
            logging.info(
                f"epoch {self.epoch}: train loss {record.get('train_loss', float('nan')):.3f}, "
                f"dev loss {dev['loss']:.3f}, dev CER {dev['cer']:.2f}%, "
                f"dev WER {dev['wer']:.2f}%, {train_time:.0f} s"
            )
            for k in ("loss", "cer", "wer"):
                self.writer.add_scalar(f"dev/{k}", dev[k], self.epoch)
        self.history.append(record)
        self.epoch, self.batches_done, self.sums = self.epoch + 1, 0, {}
        self.save(self.exp_dir / f"epoch-{self.epoch - 1}.pt", self.epoch, 0)
        if self.dist.is_main:
            (self.exp_dir / LATEST_CHECKPOINT).unlink(missing_ok=True)
            atomic_write_json(self.exp_dir / HISTORY, self.history)
            _prune_old_checkpoints(self.exp_dir, self.tc.keep_last_n, self.tc.average_checkpoints)
        if self.dist.world_size > 1:
            dist.barrier()

    def run(self, stop_after_steps: int = 0) -> bool:
        """Every remaining epoch; True when all are done and ``model.pt`` is written."""
        self.start()
        try:
            with _StopRequest() as stop:
                while self.epoch <= self.tc.num_epochs:
                    t0 = time.time()
                    if not self.train_one_epoch(stop, stop_after_steps):
                        return False
                    self.end_epoch(time.time() - t0)
        finally:
            if self.writer is not None:
                self.writer.close()
        if self.dist.is_main:
            self.finish()
        return True

    def finish(self) -> dict:
        """Average the selected checkpoints into ``model.pt``, score it on dev, plot the curves."""
        chosen = select_for_average(
            self.exp_dir, self.history, self.tc.average_checkpoints, self.tc.average_by
        )
        self.model.load_state_dict(average_state_dicts(chosen))
        metrics = self.validate()
        averaged = [p.name for p in chosen]
        where = self.save_final({"averaged": averaged, "dev": metrics})
        logging.info(
            f"{where}: average of {', '.join(averaged)}; dev CER "
            f"{metrics['cer']:.2f}%, dev WER {metrics['wer']:.2f}%, dev CTC loss {metrics['loss']:.3f}"
        )
        atomic_write_json(self.exp_dir / FINAL_DEV, {"averaged": averaged, **metrics})
        from comflp.plots import plot_training_curves

        plot_training_curves(self.history, self.exp_dir / TRAINING_CURVES, final_cer=metrics["cer"])
        return metrics

    def save_final(self, info: dict) -> Path:
        """Write the averaged model; where it went."""
        save_model(self.model, self.cfg, self.exp_dir, extra=info)
        return self.exp_dir / MODEL


class AdapterTrainer(Trainer):
    """Fine-tunes a model trained elsewhere (a :class:`PrunableModel` such as a Hugging Face
    ``*ForCTC``) through its adapter, on its ``training_loss`` (CTC of the whole model unless
    the adapter trains more, e.g. an attention decoder). Everything else is the :class:`Trainer`'s: exact resume,
    checkpoint averaging, progress, TensorBoard, history and curves. The model's own
    augmentation applies (a wav2vec2-family model masks time steps in training mode), not
    comflp's SpecAugment; one process only. The averaged model is written in its own format
    (``PrunableModel.save``) into the experiment directory, the training section to
    ``train.yaml``."""

    def __init__(
        self,
        adapter: PrunableModel,
        cfg: ExperimentConfig,
        exp_dir: Path,
        train_cuts: CutSet,
        dev_cuts: CutSet,
        device: str,
    ):
        self.adapter = adapter.to(device)
        train = dataclasses.replace(cfg.train, spec_augment=False)
        cfg = dataclasses.replace(cfg, train=train)
        super().__init__(cfg, exp_dir, train_cuts, dev_cuts, None, None, device, False, Dist())

    def build_model(self) -> torch.nn.Module:
        return self.adapter.module

    def build_dataset(self) -> torch.utils.data.Dataset:
        return self.adapter.dataset()

    def write_config(self) -> None:
        atomic_write_text(
            self.exp_dir / TRAIN_CONFIG,
            yaml.safe_dump({"train": dataclasses.asdict(self.tc)}, sort_keys=False),
        )

    def describe(self) -> str:
        return f"{type(self.model).__name__} from {self.adapter.source}"

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return self.adapter.training_loss(batch)

    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "config": {"train": dataclasses.asdict(self.tc)}}

    def validate(self) -> dict:
        return evaluate_model(self.adapter, self.dev).to_dict()

    def save_final(self, info: dict) -> Path:
        self.adapter.save(self.exp_dir, {"finetuned_from": str(self.adapter.source), **info})
        return self.exp_dir


def _spec_augment(tc: TrainConfig) -> SpecAugment | None:
    if not tc.spec_augment:
        return None
    return SpecAugment(
        time_warp_factor=tc.time_warp_factor,
        num_feature_masks=tc.num_feature_masks,
        features_mask_size=tc.features_mask_size,
        num_frame_masks=tc.num_frame_masks,
        frames_mask_size=tc.frames_mask_size,
        p=1.0,
    )


def _augment(spec_augment: SpecAugment, feats: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    segments = torch.stack([torch.arange(feats.size(0)), torch.zeros_like(lens), lens], 1).int()
    return spec_augment(feats, segments)


def train(
    cfg: ExperimentConfig,
    exp_dir: Path,
    train_cuts: CutSet,
    dev_cuts: CutSet,
    tokenizer: Tokenizer,
    cmvn: tuple[torch.Tensor, torch.Tensor],
    *,
    device: str = "cpu",
    resume: bool = True,
    init_state: dict | None = None,
    stop_after_steps: int = 0,
    amp: bool = False,
    dist_info: Dist | None = None,
) -> bool:
    """Train ``cfg`` in ``exp_dir``. Returns True when every epoch is done (and ``model.pt``
    written), False when stopped early (``stop_after_steps`` or a signal) with a checkpoint.

    ``init_state`` initialises the weights of a fresh run (fine-tuning a pruned model).
    """
    exp_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(
        cfg, exp_dir, train_cuts, dev_cuts, tokenizer, cmvn, device, amp, dist_info or Dist()
    )
    trainer.restore(resume, init_state)
    return trainer.run(stop_after_steps)


def _prune_old_checkpoints(exp_dir: Path, keep_last_n: int, average_n: int) -> None:
    if keep_last_n <= 0:
        return
    for path in epoch_checkpoints(exp_dir)[: -max(keep_last_n, average_n)]:
        path.unlink()


def select_for_average(exp_dir: Path, history: list[dict], n: int, by: str) -> list[Path]:
    """The last ``n`` epoch checkpoints, or the ``n`` with the lowest dev loss."""
    available = {int(p.stem.split("-")[1]): p for p in epoch_checkpoints(exp_dir)}
    epochs = [r["epoch"] for r in history if r["epoch"] in available]
    if by == "best":
        epochs = sorted(
            epochs, key=lambda e: next(r["dev_loss"] for r in history if r["epoch"] == e)
        )[:n]
    else:
        epochs = epochs[-n:]
    return [available[e] for e in sorted(epochs)]

"""The training loop for a wall-clock budget of the recipes that train another library's model
from scratch (``egs/wav2vec2/local/train.py``, ``egs/whisper_scratch/local/train.py``).

AdamW at a linear warm-up, then a cosine decay over the wall time left; the dev CER every ``--eval_every`` steps (and, if
asked, after each epoch) and when the budget is spent; the best model saved in its own format
with the evaluations in ``history.json`` beside it."""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from comflp import expdir
from comflp.cli import positive_int
from comflp.prune.evaluator import evaluate_model
from comflp.utils import atomic_write_json


def budget_parser(
    description: str, lr: float, minutes: float
) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """A training script's parser with the data it reads (stage 0's manifests) and the options
    this loop reads (``lr``, ``minutes``: the script's defaults), and its "training" group, which
    the script adds its own options to."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("."), help="where data/ is")
    parser.add_argument("--manifest_dir", default="data/manifests", help="relative to --workdir")
    parser.add_argument("--train_set", default="train-clean-100")
    parser.add_argument("--dev_set", default="dev-clean")
    parser.add_argument("--dev_num_utts", type=int, default=200)
    train = parser.add_argument_group("training")
    train.add_argument("--out_dir", type=Path, required=True)
    train.add_argument("--minutes", type=float, default=minutes, help="wall-time budget")
    train.add_argument("--lr", type=float, default=lr)
    train.add_argument("--warmup_steps", type=positive_int, default=300)
    train.add_argument("--weight_decay", type=float, default=0.01)
    train.add_argument("--grad_clip", type=float, default=5.0)
    train.add_argument("--eval_every", type=int, default=0, help="also evaluate every N steps")
    train.add_argument("--log_every", type=positive_int, default=20)
    train.add_argument("--seed", type=int, default=0)
    return parser, train


def learning_rate(args: argparse.Namespace, step: int, elapsed: float, budget: float) -> float:
    """Linear warm-up over ``--warmup_steps``, then cosine decay over the wall time left."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(elapsed / budget, 1.0)))


class Evaluator:
    """Dev CER of the model now; the best one saved in ``args.out_dir``; ``loss_name``: what
    the evaluator's loss is, for the log."""

    def __init__(self, model, batches: list[dict], args: argparse.Namespace, loss_name: str):
        self.model, self.batches, self.args, self.loss_name = model, batches, args, loss_name
        self.history: list[dict] = []
        self.best = math.inf
        self.start = time.time()

    def __call__(self, epoch: int, step: int, reason: str) -> None:
        result = evaluate_model(self.model, self.batches)
        minutes = (time.time() - self.start) / 60
        row = {"epoch": epoch, "step": step, "minutes": minutes, "reason": reason}
        self.history.append({**row, **result.to_dict()})
        atomic_write_json(self.args.out_dir / expdir.HISTORY, self.history)
        logging.info(
            f"dev after {minutes:.1f} min (epoch {epoch}, step {step}, {reason}): "
            f"CER {result.cer:.2f}, WER {result.wer:.2f}, {self.loss_name} {result.loss:.2f}"
        )
        if result.cer < self.best:
            self.best = result.cer
            self.model.save(
                self.args.out_dir, {**row, "dev_cer": result.cer, "dev_wer": result.wer}
            )
            logging.info(f"best so far: saved to {self.args.out_dir}")
        self.model.module.train()


def train_for_budget(
    args: argparse.Namespace,
    evaluate: Evaluator,
    params: list[torch.nn.Parameter],
    epoch_batches: Callable[[int], Iterable[dict]],
    loss_of: Callable[[dict], tuple[torch.Tensor, str]],
    eval_each_epoch: bool = False,
) -> None:
    """Steps until ``args.minutes`` of wall time (counted from the evaluator's start) are
    spent: ``epoch_batches(epoch)`` gives an epoch's batches, ``loss_of(batch)`` the loss to
    minimise and what to log of it."""
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    budget = args.minutes * 60
    step = epoch = 0
    evaluate.model.module.train()
    while time.time() - evaluate.start < budget:
        epoch += 1
        for batch in epoch_batches(epoch):
            elapsed = time.time() - evaluate.start
            if elapsed >= budget:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args, step, elapsed, budget)
            loss, said = loss_of(batch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            optimizer.step()
            step += 1
            if step % args.log_every == 0:
                lr = optimizer.param_groups[0]["lr"]
                logging.info(
                    f"epoch {epoch} step {step}: {said}, lr {lr:.2e}, {elapsed / 60:.1f} min"
                )
            if args.eval_every and step % args.eval_every == 0:
                evaluate(epoch, step, f"every {args.eval_every} steps")
        else:
            if eval_each_epoch and time.time() - evaluate.start < budget:
                evaluate(epoch, step, f"end of epoch {epoch}")
    evaluate(epoch, step, "time budget spent")
    logging.info(
        f"done: {step} steps, {epoch} epoch(s) in {(time.time() - evaluate.start) / 60:.1f} min; "
        f"best dev CER {evaluate.best:.2f}, model in {args.out_dir}"
    )

"""Figures written next to the results they show (PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from comflp.utils import atomic_path  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_training_curves(history: list[dict], path: Path, final_cer: float | None = None) -> None:
    """Train/dev loss and dev CER per epoch."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_cer) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(
        epochs, [r.get("train_loss") for r in history], "o-", label="train (with augmentation)"
    )
    ax_loss.plot(epochs, [r.get("dev_loss") for r in history], "s-", label="dev (final-layer CTC)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss per utterance")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_cer.plot(
        epochs, [r.get("dev_cer") for r in history], "o-", color="C2", label="dev CER, epoch model"
    )
    if final_cer is not None:
        ax_cer.axhline(final_cer, color="C3", ls="--", label=f"averaged model: {final_cer:.2f}%")
    ax_cer.set_xlabel("epoch")
    ax_cer.set_ylabel("greedy CTC CER (%)")
    ax_cer.legend()
    ax_cer.grid(alpha=0.3)
    fig.suptitle("Baseline training")
    _save(fig, path)

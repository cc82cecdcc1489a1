"""Figures written next to the results they show (PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from comflp.utils import atomic_path  # noqa: E402


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
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
    save_figure(fig, path)


def plot_matrix(matrix, path: Path, title: str, pairs: bool = False) -> None:
    """Heatmap of an (L+1) x (L+1) layer correlation matrix, labelled 'in', 1..L; with
    ``pairs``, of an L x L matrix of scores for pruning the layers {i, j}, labelled 1..L."""
    n = matrix.shape[0]
    labels = [str(k) for k in range(1, n + 1)] if pairs else ["in"] + [str(k) for k in range(1, n)]
    size = max(5.0, 0.45 * n)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    # pair scores all lie near 1: colour their own range
    low, high = (
        (float(matrix.min()), float(matrix.max())) if pairs else (min(0.0, matrix.min()), 1.0)
    )
    image = ax.imshow(matrix, cmap="viridis", vmin=low, vmax=high)
    ax.set_xticks(range(n), labels, fontsize=8 if n <= 25 else 5)
    ax.set_yticks(range(n), labels, fontsize=8 if n <= 25 else 5)
    if pairs:
        ax.set_xlabel("pruned layer j (diagonal: layer i alone)")
        ax.set_ylabel("pruned layer i")
    else:
        ax.set_xlabel("layer index (output of layer k; 'in' = encoder input)")
        ax.set_ylabel("layer index")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                value = matrix[i, j]
                ax.text(
                    j,
                    i,
                    f"{value:.3f}" if pairs else f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if value > low + 0.6 * (high - low) else "white",
                )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def _error_bars(ax, pruned, test_set: str, unit: str, base_error: float | None) -> None:
    """One labelled bar per method at a single P, best at the top."""
    bars = sorted(((r.errors[test_set][unit], r.label) for r in pruned), reverse=True)
    drawn = ax.barh([m for _, m in bars], [e for e, _ in bars], color="tab:blue", alpha=0.8)
    ax.bar_label(drawn, fmt="%.1f", fontsize=6, padding=2)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel(f"{test_set} {unit.upper()} (%), P = {pruned[0].num_prune}")
    if base_error is not None:
        ax.axvline(base_error, color="black", ls="--", label="unpruned")
        ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3, axis="x")


def _error_lines(ax, pruned, test_set: str, unit: str, base_error: float | None) -> None:
    """One line per method over the pruned-layer counts."""
    for i, name in enumerate(sorted({r.label for r in pruned})):
        points = sorted((r.num_prune, r.errors[test_set][unit]) for r in pruned if r.label == name)
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="os^vD<>pP*hX"[i % 12], label=name)
    if base_error is not None:
        ax.axhline(base_error, color="black", ls="--", label="unpruned")
    ax.set_xticks(sorted({r.num_prune for r in pruned}))
    ax.set_xlabel("pruned layers P")
    ax.set_ylabel(f"{test_set} {unit.upper()} (%)")
    ax.grid(alpha=0.3)


def plot_error_vs_prune(
    rows, test_set: str, path: Path, metrics: tuple[str, ...] = ("wer", "cer")
) -> None:
    """Test error rates against the number of pruned layers, one line per method; with a
    single P, one bar per method instead, as lines of one point say little."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    base = next((r for r in rows if r.num_prune == 0), None)
    pruned = [r for r in rows if r.num_prune > 0]
    prunes = {r.num_prune for r in pruned}
    draw = _error_bars if len(prunes) == 1 else _error_lines
    for ax, unit in zip(axes[0], metrics):
        draw(ax, pruned, test_set, unit, None if base is None else base.errors[test_set][unit])
    if len(prunes) == 1:
        fig.suptitle(f"Error of each method with {prunes.pop()} layers pruned")
    else:
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
        fig.suptitle("Error against the number of pruned layers")
    fig.tight_layout()
    save_figure(fig, path)


def method_family(name: str) -> str:
    """The curve a row belongs to: structured pruning's targets form one curve."""
    return "structured_l0" if name.startswith("structured_l0") else name


# The curves of the trade-off plot: searches, the rules worth drawing, structured pruning.
TRADEOFF_FAMILIES = ("comflp", "glp", "oracle", "drop_top", "every_other", "structured_l0")


def plot_tradeoff(rows, sets: list[str], path: Path, unit: str = "cer") -> None:
    """Error against parameters and against decoding RTF, one curve per method family (rows
    sorted by size), one row of panels per set; the unpruned model a black star."""
    fig, axes = plt.subplots(len(sets), 2, figsize=(11, 3.8 * len(sets)), squeeze=False)
    base = next((r for r in rows if r.num_prune == 0), None)
    for axs, name in zip(axes, sets):
        for i, family in enumerate(TRADEOFF_FAMILIES):
            points = sorted(
                (r.params, r.rtf, r.errors[name][unit])
                for r in rows
                if r.num_prune > 0 and method_family(r.method) == family
            )
            if not points:
                continue
            params, rtf, err = zip(*points)
            marker = "os^vDP"[i % 6]
            axs[0].plot([p / 1e6 for p in params], err, marker=marker, label=family)
            axs[1].plot(rtf, err, marker=marker, ls="none", label=family)
        if base is not None:
            axs[0].plot(base.params / 1e6, base.errors[name][unit], "k*", ms=12, label="unpruned")
            axs[1].plot(base.rtf, base.errors[name][unit], "k*", ms=12, label="unpruned")
        axs[0].set_xlabel("parameters (M)")
        axs[1].set_xlabel("decoding RTF")
        for ax in axs:
            ax.set_ylabel(f"{name} {unit.upper()} (%)")
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Quality against size and speed")
    fig.tight_layout()
    save_figure(fig, path)

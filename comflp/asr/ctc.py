"""CTC on log-probabilities: the loss and greedy (best path) hypotheses, for every caller."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comflp.asr.layers import padding_mask


def ctc_loss(
    log_probs: torch.Tensor,
    lengths: torch.Tensor,
    targets: torch.Tensor,
    target_lens: torch.Tensor,
    blank: int = 0,
) -> torch.Tensor:
    """Summed CTC loss of (B, T, V) log-probabilities against (B, U) padded ``targets``."""
    flat = targets[~padding_mask(target_lens, targets.size(1))].to(log_probs.device)
    return F.ctc_loss(
        log_probs.transpose(0, 1).float(),
        flat,
        lengths,
        target_lens.to(log_probs.device),
        blank=blank,
        reduction="sum",
        zero_infinity=True,
    )


def ctc_greedy_search(
    log_probs: torch.Tensor, lengths: torch.Tensor, blank: int = 0
) -> list[list[int]]:
    """Best path per utterance: argmax per frame, repeats merged, blanks removed."""
    best = log_probs.argmax(-1).cpu()
    hyps = []
    for seq, n in zip(best, lengths.tolist(), strict=True):
        seq = torch.unique_consecutive(seq[:n])
        hyps.append(seq[seq != blank].tolist())
    return hyps

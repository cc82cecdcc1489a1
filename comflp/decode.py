"""Decoding: greedy CTC, and evaluation of a model's CTC loss and error rates on a set."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comflp.model import ASRModel, padding_mask
from comflp.scoring import error_stats
from comflp.tokenizer import Tokenizer


def ctc_greedy_search(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path per utterance: argmax per frame, repeats merged, blanks (id 0) removed."""
    best = log_probs.argmax(-1).cpu()
    hyps = []
    for seq, n in zip(best, lengths.tolist()):
        seq = torch.unique_consecutive(seq[:n])
        hyps.append(seq[seq != 0].tolist())
    return hyps


@torch.no_grad()
def evaluate_ctc(model: ASRModel, loader, tokenizer: Tokenizer, device: str | torch.device = "cpu") -> dict:
    """Mean CTC loss per utterance (final layer) and greedy-CTC CER and WER in percent."""
    was_training = model.training
    model.eval()
    total_loss, count = 0.0, 0
    refs, hyps = [], []
    for batch in loader:
        feats, feat_lens = batch["feats"].to(device), batch["feat_lens"].to(device)
        log_probs, lens = model.ctc_log_probs(feats, feat_lens)
        targets = batch["targets"][~padding_mask(batch["target_lens"], batch["targets"].size(1))]
        loss = F.ctc_loss(
            log_probs.transpose(0, 1).float(), targets.to(device), lens, batch["target_lens"].to(device),
            blank=0, reduction="sum", zero_infinity=True,
        )
        total_loss += loss.item()
        count += feats.size(0)
        refs += batch["texts"]
        hyps += [tokenizer.decode(h) for h in ctc_greedy_search(log_probs, lens)]
    model.train(was_training)
    return {
        "loss": total_loss / max(count, 1),
        "cer": error_stats(refs, hyps, "char").err,
        "wer": error_stats(refs, hyps, "word").err,
        "num_utts": count,
    }

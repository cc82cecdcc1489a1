"""Attention rescoring: CTC n-best hypotheses rescored by comflp's attention decoder."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from comflp.asr.layers import padding_mask
from comflp.asr.model import ASRModel


@torch.no_grad()
def attention_rescoring(
    model: ASRModel,
    encoder_out: torch.Tensor,
    nbest: list[tuple[list[int], float]],
    ctc_weight: float,
) -> tuple[list[int], list[float]]:
    """Rescore CTC n-best hypotheses with the attention decoder, all in one batch.

    ``encoder_out``: (T, D) encoder output of one utterance (its valid frames only).
    A hypothesis's attention score is the teacher-forced log-probability of its tokens
    followed by <sos/eos>; its score is ``ctc_weight * ctc + (1 - ctc_weight) * attention``.
    Returns the best hypothesis and the scores of all, in n-best order.
    """
    if model.decoder is None:
        raise ValueError("attention_rescoring needs a model with an attention decoder")
    if not nbest:
        raise ValueError("attention_rescoring: empty n-best list")
    device = encoder_out.device
    eos = torch.tensor([model.sos_eos])
    hyps = [torch.tensor(tokens, dtype=torch.long) for tokens, _ in nbest]
    ys_in = pad_sequence([torch.cat([eos, h]) for h in hyps], batch_first=True).to(device)
    ys_out = pad_sequence([torch.cat([h, eos]) for h in hyps], batch_first=True).to(device)
    lens = torch.tensor([len(h) + 1 for h in hyps], device=device)
    n = len(hyps)
    memory = encoder_out.unsqueeze(0).expand(n, -1, -1)
    memory_lens = torch.full((n,), encoder_out.size(0), device=device)
    log_probs = model.decoder(ys_in, lens, memory, memory_lens).float().log_softmax(-1)
    token_scores = log_probs.gather(-1, ys_out.unsqueeze(-1)).squeeze(-1)
    att = token_scores.masked_fill(padding_mask(lens, ys_out.size(1)), 0.0).sum(-1).cpu().double()
    ctc = torch.tensor([score for _, score in nbest], dtype=torch.float64)
    scores = ctc_weight * ctc + (1 - ctc_weight) * att
    return list(nbest[int(scores.argmax())][0]), scores.tolist()

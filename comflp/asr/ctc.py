"""CTC on log-probabilities: the loss, greedy (best path) hypotheses and prefix beam search,
for every caller."""

from __future__ import annotations

import math
from collections import defaultdict

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


NEG_INF = float("-inf")

Prefix = tuple[int, ...]


def _logaddexp(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) of two floats, exact for -inf."""
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def ctc_prefix_beam_search(
    log_probs: torch.Tensor, beam_size: int, top_k: int | None = None, blank: int = 0
) -> list[tuple[list[int], float]]:
    """CTC prefix beam search over one utterance's (T, V) log-probabilities.

    Each prefix (a label sequence, blanks removed, repeats merged) carries the log-probability
    of all alignments of the frames so far that collapse to it, split into those ending in a
    blank and those ending in its last label: a repeated label extends the prefix only after
    a blank. After each frame the ``beam_size`` most probable prefixes are kept.

    ``top_k``: when given, only the ``top_k`` most probable tokens of each frame (blank
    included) extend the prefixes, as WeNet does with ``top_k = beam_size``; much faster for
    large vocabularies, but no longer exact. ``None`` considers every token.

    Returns up to ``beam_size`` (token ids, log-probability) pairs, best first.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    frames = log_probs.detach().float().cpu()
    k = frames.size(-1) if top_k is None else min(top_k, frames.size(-1))
    values, indices = frames.topk(k, dim=-1)
    beams: dict[Prefix, tuple[float, float]] = {(): (0.0, NEG_INF)}
    for frame_ids, frame_values in zip(indices.tolist(), values.tolist(), strict=True):
        frame = list(zip(frame_ids, frame_values, strict=True))
        beams = _best_prefixes(_extend(beams, frame, blank), beam_size)
    return [(list(prefix), _logaddexp(*scores)) for prefix, scores in beams.items()]


def _extend(
    beams: dict[Prefix, tuple[float, float]], frame: list[tuple[int, float]], blank: int
) -> dict[Prefix, list[float]]:
    """One frame of prefix search: (blank-ending, label-ending) log-probabilities per prefix.

    ``frame``: the (token, log-probability) pairs of the frame that may extend a prefix.
    """
    out: dict[Prefix, list[float]] = defaultdict(lambda: [NEG_INF, NEG_INF])
    for prefix, (p_blank, p_label) in beams.items():
        p_total = _logaddexp(p_blank, p_label)
        last = prefix[-1] if prefix else None
        for token, lp in frame:
            if token == blank:
                same = out[prefix]
                same[0] = _logaddexp(same[0], p_total + lp)
            elif token == last:
                same = out[prefix]  # the repeat merges into the last label
                same[1] = _logaddexp(same[1], p_label + lp)
                longer = out[prefix + (token,)]  # a new label only after a blank
                longer[1] = _logaddexp(longer[1], p_blank + lp)
            else:
                longer = out[prefix + (token,)]
                longer[1] = _logaddexp(longer[1], p_total + lp)
    return out


def _best_prefixes(
    scores: dict[Prefix, list[float]], beam_size: int
) -> dict[Prefix, tuple[float, float]]:
    """The ``beam_size`` most probable prefixes, best first (impossible ones dropped)."""
    ranked = sorted(
        ((_logaddexp(*s), prefix, s) for prefix, s in scores.items()),
        key=lambda item: item[0],
        reverse=True,
    )
    return {prefix: (s[0], s[1]) for total, prefix, s in ranked[:beam_size] if total > NEG_INF}
